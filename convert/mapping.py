"""Checkpoint parameter names -> mlx-llama's, and a completeness check before anything is written.

Our parameter names are Hugging Face's, so mapping is mostly *removing* things: buffers some
exporters save (`rotary_emb.inv_freq`, recomputed by the forward pass) and the output head of
a model whose head is tied to the embedding. Checking names and shapes against the config here
turns "the writer produced a folder that fails to load" into one line naming the first bad
tensor, before any time is spent quantizing.
"""

from __future__ import annotations

import re

import mlx.core as mx

from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError

# Buffers recomputed at run time; some exporters save them anyway.
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)
QUANT_PARTS = (".scales", ".biases")
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
TIED_HEAD = ("lm_head.weight", "lm_head.scales", "lm_head.biases")


def normalize_name(name: str) -> str:
    """Bare `LlamaModel` checkpoints (no causal-LM wrapper) lack the `model.` prefix."""
    if name.startswith(("layers.", "embed_tokens.", "norm.")):
        return "model." + name
    return name


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter `Llama(cfg)` has, with its full-precision shape."""
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    linears = {
        "self_attn.q_proj": (q_out, hidden, cfg.attention_bias),
        "self_attn.k_proj": (kv_out, hidden, cfg.attention_bias),
        "self_attn.v_proj": (kv_out, hidden, cfg.attention_bias),
        "self_attn.o_proj": (hidden, q_out, cfg.attention_bias),
        "mlp.gate_proj": (inter, hidden, cfg.mlp_bias),
        "mlp.up_proj": (inter, hidden, cfg.mlp_bias),
        "mlp.down_proj": (hidden, inter, cfg.mlp_bias),
    }
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        for module, (out_dim, in_dim, bias) in linears.items():
            shapes[f"{prefix}.{module}.weight"] = (out_dim, in_dim)
            if bias:
                shapes[f"{prefix}.{module}.bias"] = (out_dim,)
    return shapes


def map_weights(weights: dict[str, mx.array], cfg: ModelConfig) -> dict[str, mx.array]:
    """Rename to our parameter names, drop what the model does not use, check the rest.

    Entries are moved out of `weights` (which is left empty) so that no second dict keeps the
    lazily loaded arrays alive once the writer has evaluated and released them.
    """
    mapped: dict[str, mx.array] = {}
    for name in list(weights):
        array = weights.pop(name)
        if name.endswith(DROPPED_SUFFIXES):
            continue
        mapped[normalize_name(name)] = array
    if cfg.tie_word_embeddings:
        for name in TIED_HEAD:
            mapped.pop(name, None)
    check_weights(mapped, cfg)
    return dict(sorted(mapped.items(), key=lambda kv: natural_key(kv[0])))


def check_weights(weights: dict[str, mx.array], cfg: ModelConfig) -> None:
    """Raise one line for the first missing, unexpected, misshapen or non-float tensor."""
    shapes = expected_shapes(cfg)
    quantized = {n[: -len(".scales")] for n in weights if n.endswith(".scales")}
    known = set(shapes) | {
        n.rsplit(".", 1)[0] + part for n in shapes if n.endswith(".weight") for part in QUANT_PARTS
    }
    unexpected = sorted((n for n in weights if n not in known), key=natural_key)
    if unexpected:
        raise MlxLlamaError(
            f"the checkpoint has {len(unexpected)} tensor(s) a Llama model does not use "
            f"(first: {unexpected[0]}): it is not a plain LlamaForCausalLM checkpoint "
            "(an adapter, a vision model or another architecture?)"
        )
    missing = sorted((n for n in shapes if n not in weights), key=natural_key)
    if missing:
        raise MlxLlamaError(
            f"the checkpoint lacks {len(missing)} tensor(s) its config.json needs (first: "
            f"{missing[0]}): the download is incomplete or the weights belong to another model"
        )
    for name, shape in shapes.items():
        array = weights[name]
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            ok = array.dtype == mx.uint32 and array.shape[0] == shape[0]
            ok = ok and f"{module}.biases" in weights
        else:
            ok = tuple(array.shape) == shape
        if not ok:
            raise MlxLlamaError(
                f"tensor {name} has shape {tuple(array.shape)} ({array.dtype}) but config.json "
                f"implies {shape}: the config and the weights do not belong together"
            )
        if module not in quantized and array.dtype not in FLOAT_DTYPES:
            raise MlxLlamaError(
                f"tensor {name} is stored as {array.dtype}: mlx-llama converts float32, float16 "
                "and bfloat16 checkpoints (or already MLX-quantized ones)"
            )


def natural_key(name: str) -> list:
    """Sort `layers.2` before `layers.10`, so shards hold whole, consecutive layers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
