"""Model hyper-parameters, read from a Hugging Face `config.json`.

Only the keys a Llama-family forward pass needs are kept; everything else in the file is
ignored so that configs written by newer versions of transformers still load. A model type
whose forward pass differs from Llama's is refused here, before any weight is read, with a
message that says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import MlxLlamaError

# model_type values whose forward pass is exactly Llama's (given the checks below).
LLAMA_COMPATIBLE = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Validate a config.json dict and keep what the model needs.

        A value of the wrong type (a string where a number belongs, a list for the whole file)
        is named in one line rather than left to fail deep inside the model."""
        if not isinstance(cfg, dict):
            raise MlxLlamaError(
                f"config.json holds a {type(cfg).__name__}, not an object of settings: "
                "re-export or re-convert the model"
            )
        try:
            return cls._from_dict(cfg)
        except (TypeError, ValueError, AttributeError) as e:
            raise MlxLlamaError(
                f"config.json has a value of the wrong type ({e}): fix it or re-convert the model"
            ) from None

    @classmethod
    def _from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type", "llama")
        if model_type not in LLAMA_COMPATIBLE:
            raise MlxLlamaError(
                f"unsupported model_type '{model_type}': mlx-llama runs Llama-architecture models "
                f"({', '.join(LLAMA_COMPATIBLE)}); use a runtime built for {model_type}"
            )
        if model_type == "mistral" and cfg.get("sliding_window"):
            raise MlxLlamaError(
                "unsupported Mistral config: sliding_window attention is not implemented; "
                "use a Mistral model without sliding_window (e.g. v0.2 or later)"
            )
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "vocab_size")
            if cfg.get(k) is None
        ]
        if missing:
            raise MlxLlamaError(
                f"config.json is missing {', '.join(missing)}: it is not a complete "
                "Llama config; re-export or re-convert the model"
            )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "vocab_size", "num_key_value_heads", "head_dim",
                    "max_position_embeddings"):
            _check_positive_int(cfg, key)
        for key in ("rms_norm_eps", "rope_theta"):
            _check_number(cfg, key)
        for key in ("bos_token_id", "eos_token_id"):
            _check_token_ids(cfg, key)
        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise MlxLlamaError(
                f"config.json has an unsupported hidden_act {act!r}: Llama's MLP is SwiGLU (silu); this model "
                "needs a runtime that implements its activation"
            )
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        hidden = int(cfg["hidden_size"])
        if heads % kv_heads:
            raise MlxLlamaError(
                f"config.json has {heads} attention heads but {kv_heads} key/value heads: "
                "the first must be a multiple of the second"
            )
        head_dim = cfg.get("head_dim") or hidden // heads
        rope_scaling = _rope_scaling(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (
            () if eos is None else (int(eos),))
        bos = cfg.get("bos_token_id")
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
        )


def _check_positive_int(cfg: dict[str, Any], key: str) -> None:
    """Sizes and counts must be whole and positive (absent or null: the default applies)."""
    value = cfg.get(key)
    if value is None:
        return
    if isinstance(value, float) and value.is_integer():  # 64.0: what some exporters write
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MlxLlamaError(
            f"config.json has {key}={value!r}: it must be a positive integer; fix it or "
            "re-convert the model"
        )


def _check_number(cfg: dict[str, Any], key: str) -> None:
    value = cfg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise MlxLlamaError(f"config.json has {key}={value!r}: it must be a positive number; "
                            "fix it or re-convert the model")


def _check_token_ids(cfg: dict[str, Any], key: str) -> None:
    value = cfg.get(key)
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                     for i in ids):
        raise MlxLlamaError(f"config.json has {key}={value!r}: it must be a token id or a list "
                            "of them; fix it or re-convert the model")


def _rope_theta(cfg: dict[str, Any]) -> float:
    """transformers < 5 writes `rope_theta` at the top level, >= 5 inside `rope_parameters`;
    where both are there and differ, the nested one is what transformers 5 runs with."""
    params = cfg.get("rope_parameters")
    nested = params.get("rope_theta") if isinstance(params, dict) else None
    return float(nested or cfg.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Normalise `rope_scaling` (transformers also calls it `rope_parameters`)."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise MlxLlamaError(f"config.json has rope_scaling={scaling!r}: it must be an object like "
                            '{"rope_type": "linear", "factor": 2.0}')
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise MlxLlamaError(
            f"unsupported rope_scaling type '{kind}': supported are {', '.join(ROPE_TYPES)}"
        )
    if kind == "default":
        return None
    factor = scaling.get("factor")
    if factor is None or not math.isfinite(float(factor)) or float(factor) <= 0:
        raise MlxLlamaError(f"rope_scaling '{kind}' needs a positive 'factor'; got {factor!r}")
    return {**scaling, "rope_type": kind}
