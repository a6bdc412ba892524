"""Converting tiny Hugging Face checkpoints: numbers, layout, sharding, dtypes and memory."""

from __future__ import annotations

import argparse

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_hf_checkpoint, write_sp_tokenizer_files
from convert.api import convert
from convert.cli import parse_size
from convert.mapping import map_weights
from convert.quantize import QuantRecipe, plan_tensor, quantization_block
from convert.writer import plan_shards
from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError
from mlx_llama.loading import load_model

SEQ = 32


def tokens(vocab: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(1, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """transformers' float32 logits for the gqa and tied variants (one model load each)."""
    import torch
    from transformers import LlamaForCausalLM

    out = {}
    for variant in ("gqa", "tied"):
        model = LlamaForCausalLM.from_pretrained(tiny_checkpoints[variant], dtype=torch.float32)
        with torch.no_grad():
            out[variant] = model.eval()(torch.tensor(tokens())).logits.numpy()
    return out


def logits_of(folder: Path) -> np.ndarray:
    model, _ = load_model(folder, compute_dtype=mx.float32)
    return np.array(model(mx.array(tokens())))


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, array in mx.load(str(path)).items():
            out[name] = np.array(array.astype(mx.float32) if array.dtype == mx.bfloat16 else array)
    return out


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_float32_conversion_gives_transformers_logits(tiny_checkpoints, reference, tmp_path, variant):
    out = convert(tiny_checkpoints[variant], tmp_path / "out", progress=False)
    assert np.abs(logits_of(out) - reference[variant]).max() < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "float32"
    names = set(tensors_of(out))
    assert ("lm_head.weight" in names) == (variant != "tied")
    assert not any("inv_freq" in n for n in names)


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_quantized_logits_stay_close(tiny_checkpoints, reference, tmp_path, variant):
    ref = reference[variant]
    eight = logits_of(convert(tiny_checkpoints[variant], tmp_path / "q8", quantize=True, bits=8,
                              progress=False))
    assert np.abs(eight - ref).max() < 0.15 * ref.std()  # 8-bit: a few % of the spread
    assert (eight.argmax(-1) == ref.argmax(-1)).mean() > 0.9

    four = logits_of(convert(tiny_checkpoints[variant], tmp_path / "q4", quantize=True,
                             progress=False))
    assert (four.argmax(-1) == ref.argmax(-1)).mean() >= 0.6
    assert np.corrcoef(four.ravel(), ref.ravel())[0, 1] > 0.95
    assert np.abs(four - ref).max() > np.abs(eight - ref).max()  # 4-bit really is coarser


def test_quantization_block_and_high_precision_embeddings(tiny_checkpoints, tmp_path, capsys):
    out = convert(tiny_checkpoints["gqa"], tmp_path / "q4", quantize=True, bits=4, group_size=64)
    config = json.loads((out / "config.json").read_text())
    block = config["quantization"]
    assert block == config["quantization_config"]
    assert (block["bits"], block["group_size"], block["mode"]) == (4, 64, "affine")
    assert block["model.embed_tokens"] == {"group_size": 64, "bits": 8}
    assert block["lm_head"] == {"group_size": 64, "bits": 8}
    assert not any(k.startswith("model.layers") for k in block)  # defaults are not repeated
    weights = tensors_of(out)
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == np.uint32
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64 * 4 // 32)
    assert weights["model.embed_tokens.weight"].shape == (512, 64 * 8 // 32)
    assert "model.norm.scales" not in weights and weights["model.norm.weight"].dtype == np.float32
    printed = capsys.readouterr().out
    assert "bits per weight" in printed
    assert "bits per weight" in (out / "README.md").read_text()


def test_embeddings_can_stay_unquantized(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["gqa"], tmp_path / "q", quantize=True, embedding_bits=None,
                  progress=False)
    weights = tensors_of(out)
    assert "model.embed_tokens.scales" not in weights and "lm_head.scales" not in weights
    assert weights["model.embed_tokens.weight"].dtype == np.float32
    assert "model.layers.1.mlp.up_proj.scales" in weights
    assert "model.embed_tokens" not in json.loads((out / "config.json").read_text())["quantization"]
    load_model(out)


def test_group_size_that_does_not_divide_keeps_float(tiny_checkpoints, tmp_path, capsys):
    """hidden 64 is not a multiple of 128: only down_proj (input 128) is quantized, and the
    summary says how many matrices were kept in float and why."""
    out = convert(tiny_checkpoints["gqa"], tmp_path / "g128", quantize=True, group_size=128)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    cfg = json.loads((out / "config.json").read_text())
    kept = 7 * cfg["num_hidden_layers"] - cfg["num_hidden_layers"] + 2  # all but down_proj, tables
    assert f"{kept} matrices kept in float: rows not whole groups of 128" in summary
    weights = tensors_of(out)
    assert "model.layers.0.mlp.down_proj.scales" in weights
    assert "model.layers.0.mlp.up_proj.scales" not in weights
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == np.float32
    load_model(out)


def test_sharded_source_equals_single_file(tiny_checkpoints, tmp_path):
    from transformers import LlamaForCausalLM

    single = tiny_checkpoints["gqa"]
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(single / name, sharded / name)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    a = tensors_of(convert(single, tmp_path / "a", quantize=True, progress=False))
    b = tensors_of(convert(sharded, tmp_path / "b", quantize=True, progress=False))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)

    # A stale copy of a tensor in a shard the index does not name for it is skipped (as
    # transformers does); it was refused as "appears in more than one file".
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    home = index["model.norm.weight"]
    other = sorted(p for p in sharded.glob("*.safetensors") if p.name != home)[0]
    tensors = dict(mx.load(str(other)))
    tensors["model.norm.weight"] = mx.zeros_like(mx.load(str(sharded / home))["model.norm.weight"])
    mx.save_safetensors(str(other), tensors, metadata={"format": "pt"})
    c = tensors_of(convert(sharded, tmp_path / "c", quantize=True, progress=False))
    assert all(np.array_equal(a[k], c[k]) for k in a)
    (sharded / "model.safetensors.index.json").unlink()  # no index: which copy is meant?
    with pytest.raises(MlxLlamaError, match="model.norm.weight appears in more than one file"):
        convert(sharded, tmp_path / "d", quantize=True, progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sources_keep_their_dtype(sp_model_file, tmp_path, dtype):
    src = make_hf_checkpoint(tmp_path / "src", sp_model_file, seed=3, dtype=dtype)
    out = convert(src, tmp_path / "out", progress=False)
    stored = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {getattr(mx, dtype)}
    ref32 = make_hf_checkpoint(tmp_path / "ref", sp_model_file, seed=3, dtype="float32")
    close = np.abs(logits_of(out) - logits_of(convert(ref32, tmp_path / "o32", progress=False)))
    assert close.max() < 0.05


def test_dtype_option_casts_and_updates_config(tiny_checkpoints, tmp_path):
    out = convert(tiny_checkpoints["gqa"], tmp_path / "bf", dtype="bfloat16", quantize=True,
                  progress=False)
    stored = mx.load(str(out / "model.safetensors"))
    assert stored["model.norm.weight"].dtype == mx.bfloat16
    assert stored["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_small_shard_size_writes_several_shards_and_an_index(tiny_checkpoints, tmp_path):
    from safetensors import safe_open

    out = convert(tiny_checkpoints["gqa"], tmp_path / "out", shard_size=100_000, progress=False)
    shards = sorted(out.glob("*.safetensors"))
    count = len(shards)
    assert count > 3
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{count:05d}.safetensors"
                                        for i in range(1, count + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {}
    for path in shards:
        with safe_open(str(path), "numpy") as f:  # the reference reader accepts our files
            assert f.metadata() == {"format": "mlx"}
            stored.update({k: path.name for k in f.keys()})
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors_of(out).values())
    assert np.array_equal(logits_of(out), logits_of(convert(tiny_checkpoints["gqa"],
                                                            tmp_path / "one", progress=False)))


def test_tokenizer_generation_config_and_chat_template_are_copied(tiny_checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["gqa"], src)
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (src / "pytorch_model.bin").write_bytes(b"never read")
    out = convert(src, tmp_path / "out", progress=False)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "pytorch_model.bin").exists()
    card = (out / "README.md").read_text()
    assert "library_name: mlx" in card and str(src) in card


def test_peak_memory_stays_well_under_model_size(tmp_path, sp_model_file):
    """A 16-layer float32 checkpoint (~34 MB) converts with about one tensor's worth of memory."""
    hidden, inter, vocab, layers = 256, 512, 2048, 16
    folder = tmp_path / "mid"
    folder.mkdir()
    config = dict(model_type="llama", hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=vocab, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    write_sp_tokenizer_files(folder, sp_model_file)
    cfg = ModelConfig.from_dict(config)
    from convert.mapping import expected_shapes

    shapes = expected_shapes(cfg)
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: mx.random.normal(s) * 0.02 for k, s in shapes.items()})
    size = sum(math.prod(s) * 4 for s in shapes.values())
    largest = max(math.prod(s) * 4 for s in shapes.values())
    mx.clear_cache()
    for quantize in (False, True):
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        convert(folder, tmp_path / f"out{quantize}", quantize=quantize, progress=False)
        peak = mx.get_peak_memory() - base
        assert peak < 0.25 * size, (quantize, peak, size)
        assert peak < 3 * largest, (quantize, peak, largest)


def test_mapping_drops_buffers_prefixes_bare_names_and_refuses_strangers():
    cfg = ModelConfig.from_dict(dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=16,
                                     tie_word_embeddings=True))
    from convert.mapping import expected_shapes

    def weights():
        w = {k.removeprefix("model."): mx.zeros(s) for k, s in expected_shapes(cfg).items()}
        w["layers.0.self_attn.rotary_emb.inv_freq"] = mx.zeros((2,))
        w["lm_head.weight"] = mx.zeros((16, 8))
        return w

    source = weights()
    mapped = map_weights(source, cfg)
    assert set(mapped) == set(expected_shapes(cfg)) and not source
    extra = weights()
    extra["vision_tower.patch.weight"] = mx.zeros((2,))
    with pytest.raises(MlxLlamaError, match="does not use .*vision_tower"):
        map_weights(extra, cfg)
    short = weights()
    del short["layers.0.mlp.up_proj.weight"]
    with pytest.raises(MlxLlamaError, match="lacks 1 .*up_proj"):
        map_weights(short, cfg)
    bad = weights()
    bad["layers.0.mlp.up_proj.weight"] = mx.zeros((16, 9))
    with pytest.raises(MlxLlamaError, match="up_proj.weight has shape"):
        map_weights(bad, cfg)
    ints = weights()
    ints["norm.weight"] = mx.zeros((8,), mx.int32)
    with pytest.raises(MlxLlamaError, match="stored as"):
        map_weights(ints, cfg)


def test_recipe_decisions():
    recipe = QuantRecipe(bits=4, group_size=64)
    assert plan_tensor("model.layers.0.mlp.up_proj.weight", (128, 64), recipe).bits == 4
    assert plan_tensor("model.layers.0.mlp.up_proj.weight", (128, 96), recipe) is None
    assert plan_tensor("model.layers.0.input_layernorm.weight", (64,), recipe) is None
    assert plan_tensor("model.layers.0.mlp.up_proj.bias", (128,), recipe) is None
    assert plan_tensor("model.embed_tokens.weight", (512, 64), recipe).bits == 8
    assert plan_tensor("lm_head.weight", (512, 64), QuantRecipe(embedding_bits=None)) is None
    assert plan_tensor("lm_head.weight", (512, 64), QuantRecipe(bits=8, embedding_bits=6)).bits == 6
    for bad in (dict(bits=7), dict(group_size=48), dict(embedding_bits=1)):
        with pytest.raises(MlxLlamaError):
            QuantRecipe(**bad)
    specs = {"a": recipe.default, "b": plan_tensor("lm_head.weight", (8, 64), recipe)}
    assert quantization_block(specs, recipe.default) == {
        "group_size": 64, "bits": 4, "mode": "affine", "b": {"group_size": 64, "bits": 8}}


def test_plan_shards_and_sizes():
    assert plan_shards([("a", 40), ("b", 40), ("c", 40)], 100) == [["a", "b"], ["c"]]
    assert plan_shards([("big", 500), ("a", 1)], 100) == [["big"], ["a"]]
    assert plan_shards([("a", 1), ("big", 500), ("b", 1)], 100) == [["a"], ["big"], ["b"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30
    assert parse_size("1000") == 1000 and parse_size("1.5mb") == 1_500_000
    with pytest.raises(argparse.ArgumentTypeError, match="far too large"):  # was OverflowError
        parse_size("1" + "0" * 400)


def test_gguf_source_passes_quantized_blocks_through(smollm2_gguf_path, tmp_path):
    from convert.gguf import read_gguf

    out = convert(smollm2_gguf_path, tmp_path / "smol", progress=False)
    source = read_gguf(smollm2_gguf_path)
    expected = map_weights(source.weights, ModelConfig.from_dict(source.config))
    written = mx.load(str(out / "model.safetensors"))
    assert written.keys() == expected.keys()
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.scales",
                 "model.embed_tokens.biases", "model.norm.weight"):
        assert mx.array_equal(written[name], expected[name]).item(), name
    config = json.loads((out / "config.json").read_text())
    block = {k: v for k, v in config["quantization"].items() if k != "mode"}
    assert block == {k: v for k, v in source.quantization.items() if k != "mode"}
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    with pytest.raises(MlxLlamaError, match="already quantized"):
        convert(smollm2_gguf_path, tmp_path / "again", quantize=True, progress=False)
    assert not (tmp_path / "again").exists()


def test_mlx_folder_reconverts_losslessly(tiny_checkpoints, tmp_path):
    """An MLX folder is a valid source too: re-sharding keeps every tensor bit for bit."""
    first = convert(tiny_checkpoints["tied"], tmp_path / "a", quantize=True, progress=False)
    second = convert(first, tmp_path / "b", shard_size=50_000, progress=False)
    assert len(list(second.glob("*.safetensors"))) > 1
    a, b = tensors_of(first), tensors_of(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    config = json.loads((second / "config.json").read_text())
    assert config["quantization"] == json.loads((first / "config.json").read_text())["quantization"]


def test_streamed_safetensors_of_strided_arrays(tmp_path):
    """Transposed and sliced arrays (not row-major in memory) are written in row-major order."""
    from convert.writer import write_safetensors

    base = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    arrays = {"t": base.T, "bf": base.T.astype(mx.bfloat16), "slice": base[:, 1:3],
              "packed": mx.quantize(mx.random.normal((4, 64)), group_size=32, bits=4)[0]}
    slots = list(arrays.items())
    write_safetensors(tmp_path / "x.safetensors", slots, 0, len(slots))
    assert slots == [None] * len(arrays)  # consumed: nothing kept alive
    back = mx.load(str(tmp_path / "x.safetensors"))
    assert all(mx.array_equal(back[k], v).item() and back[k].dtype == v.dtype
               for k, v in arrays.items())


def test_every_data_file_of_the_packages_is_installed():
    """A wheel (a non-editable install) ships only the data files pyproject.toml lists: the
    calibration text once went missing that way, and `--bpw` failed on installed copies."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    for package in ("mlx_llama", "convert"):
        for path in (root / package).rglob("*"):
            relative = path.relative_to(root / package).as_posix()
            if path.is_dir() or path.suffix == ".py" or "__pycache__" in relative:
                continue
            patterns = listed.get(package, [])
            assert any(fnmatch.fnmatch(relative, p) for p in patterns), (package, relative)
    assert (root / "convert" / "data" / "calibration.txt").is_file()


def test_plain_quantization_does_not_load_numba(tiny_checkpoints, tmp_path):
    """Only conversions that search or measure need the compiled kernel (0.6 s to load, and
    a broken numba must not break plain -q)."""
    import subprocess
    import sys

    code = ("import sys; from convert.api import convert; "
            f"convert({str(tiny_checkpoints['gqa'])!r}, {str(tmp_path / 'q')!r}, quantize=True, "
            "progress=False); print('numba' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("block, match", [
    ({"bits": 8}, "does not fit the 8-bit, group size 64"),
    ({"group_size": 32}, "does not fit the 4-bit, group size 32"),
    ({"bits": 0}, "0-bit, group size 64, which MLX cannot read"),
])
def test_a_quantization_block_that_does_not_match_the_packed_weights(tiny_checkpoints, tmp_path,
                                                                     block, match):
    """A wrong `bits` in an MLX folder's config passed the checks and failed only in the final
    verification, with a 'please report this' naming the temporary folder."""
    first = convert(tiny_checkpoints["tied"], tmp_path / "a", quantize=True, progress=False)
    config = json.loads((first / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config[key] = {**config[key], **block}
    (first / "config.json").write_text(json.dumps(config))
    with pytest.raises(MlxLlamaError, match=match) as e:
        convert(first, tmp_path / "b", progress=False)
    assert "report" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "b").exists()
