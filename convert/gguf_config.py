"""A Hugging Face `LlamaForCausalLM` config.json from a GGUF file's `llama.*` metadata.

llama.cpp stores the same hyper-parameters as config.json under its own key names. Two of
them need care:

* floats are stored as float32, so 1e-5 arrives as 9.999999747e-06; we write the shortest
  decimal that rounds to the same float32, which is what the original config said.
* Llama 3.x long-context RoPE is not in the metadata at all: llama.cpp bakes it into a
  `rope_freqs` tensor of per-frequency divisors. We recover the four `llama3` parameters from
  that tensor and check that they reproduce it, so the runtime's `llama3` RoPE computes the
  same frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mlx_llama.errors import MlxLlamaError

ARCH = "llama"


def float32_value(x: float) -> float:
    """The shortest decimal that is the same float32 (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _require(md: dict[str, Any], key: str, name: str) -> Any:
    if key not in md:
        raise MlxLlamaError(f"{name} has no '{key}' metadata: it is not a complete Llama GGUF file")
    value = md[key]
    if isinstance(value, (list, np.ndarray)):
        raise MlxLlamaError(
            f"{name} has per-layer values for '{key}', which Llama models do not have; "
            "this GGUF is not a plain Llama model"
        )
    return value


def _whole(md: dict[str, Any], key: str, name: str, default: int | None = None,
           minimum: int = 1) -> int:
    """An integer field, checked: a damaged or hand-edited file fails naming its key."""
    value = _require(md, key, name) if default is None or key in md else default
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.integer)) or (
            value != int(value)):
        raise MlxLlamaError(f"{name} has '{key}' = {value!r}, which is not a whole number: the "
                            "file is damaged; download or re-create it")
    if int(value) < minimum:
        raise MlxLlamaError(f"{name} has '{key}' = {value}, which must be at least {minimum}: "
                            "the file is damaged; download or re-create it")
    return int(value)


def _real(md: dict[str, Any], key: str, name: str, default: float) -> float:
    """A positive float field (epsilons, RoPE bases), checked like `_whole`."""
    value = _require(md, key, name) if key in md else default
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.floating)) or not (
            math.isfinite(value) and value > 0):
        raise MlxLlamaError(f"{name} has '{key}' = {value!r}, which is not a positive number: "
                            "the file is damaged; download or re-create it")
    return float32_value(value)


def build_config(
    md: dict[str, Any],
    name: str,
    vocab_size: int,
    tied: bool,
    attention_bias: bool,
    torch_dtype: str | None,
    rope_freqs: np.ndarray | None,
) -> dict[str, Any]:
    """config.json content for the model a GGUF describes (see module docstring)."""
    key = lambda k: f"{ARCH}.{k}"  # noqa: E731
    hidden = _whole(md, key("embedding_length"), name)
    heads = _whole(md, key("attention.head_count"), name)
    kv_heads = _whole(md, key("attention.head_count_kv"), name, default=heads)
    head_dim = _whole(md, key("attention.key_length"), name,
                      default=_whole(md, key("rope.dimension_count"), name,
                                     default=max(hidden // heads, 1)))
    _check_head_dims(md, head_dim, name)
    rope_theta = _real(md, key("rope.freq_base"), name, 10000.0)
    context = _whole(md, key("context_length"), name, default=2048)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _whole(md, key("feed_forward_length"), name),
        "num_hidden_layers": _whole(md, key("block_count"), name),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _real(md, key("attention.layer_norm_rms_epsilon"), name, 1e-5),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling(md, name, head_dim, rope_theta, rope_freqs),
        "max_position_embeddings": context,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": attention_bias,
        "mlp_bias": False,
    }
    if torch_dtype is not None:
        config["torch_dtype"] = torch_dtype
    for field, meta_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{meta_key}" in md:
            config[field] = _whole(md, f"tokenizer.ggml.{meta_key}", name, minimum=0)
    return config


def _check_head_dims(md: dict[str, Any], head_dim: int, name: str) -> None:
    """Llama rotates the whole head and uses one head size for keys and values."""
    for k in ("rope.dimension_count", "attention.value_length"):
        value = md.get(f"{ARCH}.{k}")
        if value is not None and _whole(md, f"{ARCH}.{k}", name) != head_dim:
            raise MlxLlamaError(
                f"{name} has {ARCH}.{k}={value} but a head size of {head_dim}; partial rotary or "
                "mismatched key/value sizes are not Llama: this model is not supported"
            )
    if _whole(md, f"{ARCH}.expert_count", name, default=0, minimum=0) > 0:
        raise MlxLlamaError(
            f"{name} is a mixture-of-experts model (llama.expert_count="
            f"{md[f'{ARCH}.expert_count']}); only dense Llama models are supported"
        )


def rope_scaling(
    md: dict[str, Any], name: str, head_dim: int, theta: float, rope_freqs: np.ndarray | None
) -> dict[str, Any] | None:
    """The config's `rope_scaling` from `llama.rope.scaling.*` or a `rope_freqs` tensor."""
    kind = md.get(f"{ARCH}.rope.scaling.type")
    factor = md.get(f"{ARCH}.rope.scaling.factor", md.get(f"{ARCH}.rope.scale_linear"))
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise MlxLlamaError(
                f"{name} has both a rope_freqs tensor and rope scaling '{kind}'; "
                "this combination is not supported"
            )
        original = md.get(f"{ARCH}.rope.scaling.original_context_length")
        return llama3_from_rope_freqs(
            np.asarray(rope_freqs, np.float64), head_dim, theta, name, original
        )
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": float32_value(factor)}
    raise MlxLlamaError(
        f"{name} uses '{kind}' RoPE scaling; supported are none, linear and Llama 3 (rope_freqs)"
    )


def llama3_divisors(params: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE (what llama.cpp stores as `rope_freqs`)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    smooth = (original / wavelen - low) / (high - low)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < original / high, 1.0, divisors)
    return np.where(wavelen > original / low, factor, divisors)


def llama3_from_rope_freqs(
    divisors: np.ndarray, head_dim: int, theta: float, name: str, original: int | None
) -> dict[str, Any] | None:
    """Recover `llama3` rope_scaling from llama.cpp's per-frequency divisors.

    In the smooth band, 1/divisor = (1-s)/factor + s with s = A/wavelen - B, where
    A = original/(high-low) and B = low/(high-low). Only A, B and factor shape the
    frequencies, so any (original, low, high) with the same A and B is exact; we keep the
    file's original context length (8192 when absent, Llama 3.1's) and solve for low/high.
    """
    if divisors.shape != (head_dim // 2,):
        raise MlxLlamaError(
            f"{name}: rope_freqs has shape {divisors.shape}, expected ({head_dim // 2},)"
        )
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-7):
        return None
    factor = float(divisors.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    original = int(original or 8192)
    if band.sum() >= 2:
        smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[band], smooth, 1)
        span = original / slope
        low = -intercept * span
        params = {"low_freq_factor": low, "high_freq_factor": low + span}
    else:
        # No frequency falls in the smooth band: any band inside the gap between the last
        # unscaled and the first scaled wavelength is exact. Take the middle half of that gap.
        ones, scaled = wavelen[divisors <= 1 + 1e-6], wavelen[divisors >= factor * (1 - 1e-6)]
        if not len(ones) or not len(scaled) or ones.max() >= scaled.min():
            raise MlxLlamaError(f"{name}: rope_freqs does not look like Llama 3 RoPE scaling")
        step = (scaled.min() / ones.max()) ** 0.25
        params = {
            "low_freq_factor": original / (scaled.min() / step),
            "high_freq_factor": original / (ones.max() * step),
        }
    result = {
        "rope_type": "llama3",
        "factor": float32_value(factor),
        "low_freq_factor": float(np.round(params["low_freq_factor"], 6)),
        "high_freq_factor": float(np.round(params["high_freq_factor"], 6)),
        "original_max_position_embeddings": original,
    }
    rebuilt = llama3_divisors(result, head_dim, theta)
    if not np.allclose(rebuilt, divisors, rtol=1e-5, atol=0):
        raise MlxLlamaError(
            f"{name}: rope_freqs does not match Llama 3 RoPE scaling; "
            "this RoPE variant is not supported"
        )
    return result
