"""Hugging Face tokenizer files rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json, only the pieces of one: the token strings and their kinds,
BPE merges (byte-level vocabularies) or scores (SentencePiece ones), the special token ids and
the name of the pre-tokenizer the vocabulary was trained with. We assemble those with the
`tokenizers` library into the tokenizer the original model shipped:

* `gpt2` vocabularies are byte-level BPE. Their merges are only right together with the
  text-splitting rule they were learned with, which `tokenizer.ggml.pre` names: SmolLM2
  ("smollm", as StarCoder) splits every digit off, then applies GPT-2's split; Llama 3
  ("llama-bpe") uses its own regex. An unknown name is refused rather than guessed.
* `llama` vocabularies are SentencePiece BPE: spaces become "▁", one is prepended to the
  text, unknown characters fall back to <0xNN> byte tokens, and the merge order follows the
  scores (SentencePiece merges the best-scoring pair first). This encodes exactly as
  sentencepiece and llama.cpp do; transformers' GGUF loader differs only on text that starts
  with a space (it prepends no second "▁") and right after a special token (no "▁" there).

Token kinds follow llama.cpp: 2 unknown, 3 control (special, e.g. <|im_end|>), 4 user-defined
(kept whole but not special), 6 byte.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from mlx_llama.errors import MlxLlamaError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=True, use_regex=False
                ),
            ]
        )

    return build


# tokenizer.ggml.pre -> the pre-tokenizer its byte-level merges were learned with.
BYTE_LEVEL_PRE_TOKENIZERS = {
    "default": _gpt2_split,
    "gpt2": _gpt2_split,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT),
    "smaug-bpe": _regex_split(_LLAMA3_SPLIT),
    "tekken": _regex_split(_TEKKEN_SPLIT),
}


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves,
    the other 68 (controls, space, ...) take the code points from 256 upwards, in byte order."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    )
    spelled, extra = [], 0
    for byte in range(256):
        if byte in printable:
            spelled.append(chr(byte))
        else:
            spelled.append(chr(256 + extra))
            extra += 1
    return tuple(spelled)


def tokenizer_files(md: dict[str, Any], name: str, context_length: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and chat_template.jinja)."""
    kind = md.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in md or kind is None:
        raise MlxLlamaError(
            f"{name} has no tokenizer metadata; it cannot be imported without its vocabulary"
        )
    tokens = list(md["tokenizer.ggml.tokens"])
    default_types = np.full(len(tokens), NORMAL)
    types = np.asarray(md.get("tokenizer.ggml.token_type", default_types), dtype=np.int64)
    if types.shape != (len(tokens),):
        raise MlxLlamaError(f"{name} is inconsistent: it has {len(tokens)} tokens but "
                            f"{types.size} token types; re-create the file")
    if kind == "gpt2":
        tokenizer = byte_level_tokenizer(md, tokens, types, name)
    elif kind == "llama":
        tokenizer = sentencepiece_tokenizer(md, tokens, types)
    else:
        raise MlxLlamaError(
            f"{name} has a '{kind}' tokenizer; supported are byte-level BPE (gpt2) and "
            "SentencePiece (llama)"
        )
    specials = _special_tokens(md, tokens)
    # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    _add_registered_tokens(tokenizer, tokens, types, specials)
    tokenizer.post_processor = _post_processor(md, tokens, add_bos, add_eos, kind)

    named = set(specials.values())
    extra = [t for t, k in zip(tokens, types, strict=True) if k == CONTROL and t not in named]
    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **specials,
        "additional_special_tokens": extra,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    files = {"tokenizer.json": tokenizer.to_str(pretty=True)}
    template = md.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
        files["chat_template.jinja"] = template
    files["tokenizer_config.json"] = _json(config)
    files["special_tokens_map.json"] = _json({**specials, "additional_special_tokens": extra})
    return files


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict]:
    """tokenizer_config.json's view of the added tokens, as transformers writes it."""
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    decoder = tokenizer.get_added_tokens_decoder()
    return {str(i): {f: getattr(decoder[i], f) for f in fields} for i in sorted(decoder)}


def byte_level_tokenizer(
    md: dict[str, Any], tokens: list[str], types: np.ndarray, name: str
) -> Tokenizer:
    """Byte-level BPE from the file's tokens and merges, split as `tokenizer.ggml.pre` says."""
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise MlxLlamaError(
            f"{name} uses the '{pre}' pre-tokenizer, which mlx-llama does not know; supported: "
            f"{', '.join(sorted(BYTE_LEVEL_PRE_TOKENIZERS))}"
        )
    if "tokenizer.ggml.merges" not in md:
        raise MlxLlamaError(
            f"{name} has a byte-level vocabulary without merges; the file is incomplete"
        )
    alphabet = byte_alphabet()
    letters = set(alphabet)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if types[i] not in (CONTROL, USER_DEFINED) and not set(token) <= letters:
            # A token written as raw text: spell its bytes the way the merges expect.
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_space_prefix(md: dict[str, Any]) -> bool:
    return bool(md.get("tokenizer.ggml.add_space_prefix", True))


def sentencepiece_tokenizer(md: dict[str, Any], tokens: list[str], types: np.ndarray) -> Tokenizer:
    """SentencePiece BPE as a `tokenizers` BPE with byte fallback and "▁" for spaces."""
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if "tokenizer.ggml.merges" in md:
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    else:
        scores = np.asarray(
            md.get("tokenizer.ggml.scores", -np.arange(len(tokens), dtype=np.float32))
        )
        merges = merges_from_scores(tokens, scores, types)
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = _add_space_prefix(md)
    # As SentencePiece (and llama.cpp, and Llama 2's own tokenizer.json): every space becomes
    # "▁" and one "▁" is prepended to each stretch of text, even one that already starts with a
    # space; the pieces are then found in the whole stretch, with no splitting beforehand.
    to_meta = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), to_meta]) if prefix else to_meta
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges_from_scores(
    tokens: list[str], scores: np.ndarray, types: np.ndarray
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary.

    SentencePiece merges, at each step, the adjacent pair whose joined piece scores best. As
    merge rules that is: every way of cutting a normal token into two tokens is a rule, ranked
    by the joined token's score (best first); rules of one token rank longer left parts first.
    """
    ids = {}
    for i, token in enumerate(tokens):
        if types[i] in (NORMAL, USER_DEFINED, UNUSED):
            ids.setdefault(token, i)
    rules = []
    for token, i in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                rules.append(
                    (-float(scores[i]), -len(left), -len(right), ids[left], ids[right], left, right)
                )
    rules.sort()
    return [(left, right) for *_, left, right in rules]


def _special_tokens(md: dict[str, Any], tokens: list[str]) -> dict[str, str]:
    names = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "unk_token": "unknown_token_id",
        "pad_token": "padding_token_id",
    }
    specials = {}
    for field, key in names.items():
        token_id = md.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            specials[field] = tokens[int(token_id)]
    return specials


def _add_registered_tokens(
    tokenizer: Tokenizer, tokens: list[str], types: np.ndarray, specials: dict[str, str]
) -> None:
    """Control/unknown tokens (and the named bos/eos/...) as special added tokens, user-defined
    ones as plain added tokens: both are matched whole in the text before any splitting."""
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i in range(len(tokens))
        if types[i] in (CONTROL, UNKNOWN) or tokens[i] in specials.values()
    ]
    plain = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i in range(len(tokens))
        if types[i] == USER_DEFINED and tokens[i] not in specials.values()
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _post_processor(md: dict[str, Any], tokens: list[str], add_bos: bool, add_eos: bool, kind: str):
    """BOS/EOS insertion as the file asks (tokenizer.ggml.add_bos_token / add_eos_token)."""
    around = []
    for wanted, key in ((add_bos, "bos_token_id"), (add_eos, "eos_token_id")):
        token_id = md.get(f"tokenizer.ggml.{key}")
        around.append(
            (tokens[int(token_id)], int(token_id)) if wanted and token_id is not None else None
        )
    bos, eos = around
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False) if kind == "gpt2" else None

    def sequence(label: str, type_id: int) -> str:
        parts = ([f"{bos[0]}:{type_id}"] if bos else []) + [f"{label}:{type_id}"]
        return " ".join(parts + ([f"{eos[0]}:{type_id}"] if eos else []))

    template = processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
        special_tokens=list(dict.fromkeys(t for t in (bos, eos) if t)),
    )
    if kind == "gpt2":
        return processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    return template
