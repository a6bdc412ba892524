"""One tokenizer interface over SentencePiece `tokenizer.model` and Hugging Face `tokenizer.json`.

Llama-family models ship their tokenizer in one of two formats: a SentencePiece model
(Llama 1/2, Mistral, TinyLlama) or a `tokenizers` JSON file (Llama 3, SmolLM2, and most
re-uploads of the older models too). The rest of mlx-llama should not care which, so
`load_tokenizer` hides the backend behind `Tokenizer` and settles, once, the policy questions
that the raw libraries leave open:

- whether to put a BOS token in front of a prompt (the model's tokenizer config decides, and a
  prompt that already starts with BOS never gets a second one: two BOS tokens quietly degrade
  output, which is why llama.cpp warns about them);
- which token ids end generation (config.json, generation_config.json, the tokenizer's EOS token
  and the end-of-turn markers a chat template uses, such as `<|eot_id|>` or `<|im_end|>`);
- that special tokens are left out of decoded text, both in `decode` and in the streaming
  detokenizer, so generated output never prints `<|im_end|>`.

When a folder has both files, `tokenizer.json` wins: it carries the exact normalisation and
added-token rules Hugging Face uses, while the `.model` file only knows SentencePiece's own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mlx_llama.chat import Message, apply_chat_template as _render_chat
from mlx_llama.errors import MlxLlamaError, one_line
from mlx_llama.tokenizer_backends import (AddedToken, Backend, SentencePieceBackend,
                                          TokenizersBackend)

__all__ = ["Tokenizer", "StreamingDetokenizer", "load_tokenizer", "END_OF_TURN_MARKERS"]

# End-of-turn markers that chat templates emit after each message. When the model's template uses
# one and it is a special token, generation must stop there even if no config lists it as EOS
# (Llama 3 base configs name only <|end_of_text|>; the instruct template ends turns with <|eot_id|>).
END_OF_TURN_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|end|>")

_REPLACEMENT_CHAR = "\ufffd"


# --------------------------------------------------------------------------------------------
# Streaming detokenizer
# --------------------------------------------------------------------------------------------


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation equals `decode(ids)`.

    Decoding one token at a time is wrong in two ways: a byte-fallback or byte-level token can
    carry part of a multi-byte character, and SentencePiece-style decoders drop the leading
    space of whatever sequence they decode first. Re-decoding the whole sequence each step is
    right but O(n^2). So we decode a small *window*: an anchor (tokens whose text was already
    emitted) plus the tokens after it. The anchor gives the decoder the context the full decode
    has: a leading-space strip hits the anchor in both decodes, so the text after it is the
    same. New text is released only up to the last complete character; a trailing U+FFFD means
    the bytes so far may end mid-character and the next tokens may complete it.

    Re-anchoring: a "complete point" is a token after which the decoded text ends on a whole
    character. The tokens between the previous complete point and the current one start and
    end on character boundaries, so once they decode on their own to clean, non-empty text
    they become the new anchor. Windows therefore span only the tokens of the last few
    characters, whatever the sequence length. Special tokens are skipped by `decode`, so they
    are skipped here too: they add no text and never become anchors.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], skip_ids: frozenset[int]) -> None:
        self._decode = decode
        self._skip_ids = skip_ids
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next token starts a new sequence."""
        self._window: list[int] = []
        self._emitted = 0  # characters of decode(self._window) already returned
        self._boundary = 0  # window index of the last complete point

    def prime(self, context: Sequence[int]) -> None:
        """Start after `context`, text already written (a completion's prompt), so the first
        new token reads as it does after it: a SentencePiece word-initial space is kept ("are"
        + "▁and" is " and"), not dropped as at the start of a text. The anchor is the shortest
        tail of the context that decodes to whole characters (byte-fallback tokens of one
        character decode to U+FFFD apart); a context with none in reach primes nothing."""
        self.reset()
        context = [int(t) for t in context if int(t) not in self._skip_ids][-16:]
        for n in range(1, len(context) + 1):
            tail = context[-n:]
            text = self._decode(tail)
            if text and _REPLACEMENT_CHAR not in text:
                self._window, self._emitted, self._boundary = tail, len(text), len(tail)
                return

    def add_token(self, token_id: int) -> str:
        """Add one token; return the text it makes printable (often "", never part of a character)."""
        token_id = int(token_id)
        if token_id in self._skip_ids:
            return ""
        window = self._window
        window.append(token_id)
        text = self._decode(window)
        stable = len(text)
        while stable > self._emitted and text[stable - 1] == _REPLACEMENT_CHAR:
            stable -= 1
        if stable <= self._emitted:
            return ""
        piece = text[self._emitted : stable]
        self._emitted = stable
        if stable == len(text):
            start = self._boundary
            if start > 0:
                alone = self._decode(window[start:])
                if alone and _REPLACEMENT_CHAR not in alone and text.endswith(alone):
                    del window[:start]
                    self._emitted = len(alone)
            self._boundary = len(window)
        return piece

    def finalize(self) -> str:
        """Return whatever is still held back (e.g. an unfinished character) and reset."""
        text = self._decode(self._window) if self._window else ""
        rest = text[self._emitted :]
        self.reset()
        return rest


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """The tokenizer of one model: encoding, decoding, stop tokens and the chat template.

    Build it with `load_tokenizer(folder)`; the constructor takes already-resolved settings so
    tests and converters can assemble one directly.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        add_bos_token: bool,
        eos_token_ids: Iterable[int],
        eos_token_id: int | None = None,
        special_tokens: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.backend_name: str = backend.name
        self.bos_token_id = bos_token_id
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        if eos_token_id is None and self.eos_token_ids:
            eos_token_id = min(self.eos_token_ids)
        self.eos_token_id = eos_token_id
        self.special_tokens: dict[str, Any] = dict(special_tokens or {})
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.chat_template = chat_template
        self.all_special_ids: frozenset[int] = backend.special_ids
        self.vocab_size: int = backend.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in the text become their ids.

        With `add_special_tokens`, BOS is prepended when the model's tokenizer config asks for it
        and the text does not already start with it. EOS is never appended: a prompt ending in
        EOS tells the model the text is over.
        """
        if not isinstance(text, str):
            raise MlxLlamaError(f"Can only encode a str, got {type(text).__name__}; pass text")
        check_utf8(text)
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens left out (the same text the streaming detokenizer gives)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # numpy / mlx arrays
        return self._backend.decode([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text (what OpenAI's logprobs `bytes` holds): a
        token may be part of a character, which no str of its own can show."""
        piece = self.id_to_token(token_id) or ""
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if self._backend.byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def detokenizer(self, after: Sequence[int] = ()) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence; `after`: the tokens whose
        text it continues (see `StreamingDetokenizer.prime`)."""
        detokenizer = StreamingDetokenizer(self._backend.decode, self.all_special_ids)
        if after:
            detokenizer.prime(after)
        return detokenizer

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry (e.g. "<|eot_id|>"), or None if it is not in the vocab."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocabulary entry for an id (e.g. "▁Hello" or "ĠHello"), or None."""
        return self._backend.id_to_token(int(token_id))

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_vars: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template (or the documented fallback).

        `continue_final_message=True` (with `add_generation_prompt=False`) leaves the last
        message open for the model to continue, as in transformers.

        `chat_template` may name one of `chat_templates` (e.g. "tool_use") or be a template
        source. With `tokenize=True` the ids carry exactly one BOS when the model uses one,
        whether or not the template writes `bos_token` itself.
        """
        template = self.chat_template
        if chat_template is None and template_vars.get("tools") and "tool_use" in self.chat_templates:
            chat_template = "tool_use"  # as transformers: a model's own template for tools
        if chat_template is not None:
            template = self.chat_templates.get(chat_template, chat_template)
        text = _render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            special_tokens=self.special_tokens,
            **template_vars,
        )
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(backend={self.backend_name!r}, vocab_size={self.vocab_size}, "
            f"bos_token_id={self.bos_token_id}, add_bos_token={self.add_bos_token}, "
            f"eos_token_ids={sorted(self.eos_token_ids)})"
        )


# --------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer of a model folder (MLX or Hugging Face layout).

    Reads tokenizer.json or tokenizer.model, and for the policy decisions tokenizer_config.json,
    special_tokens_map.json, generation_config.json, config.json and chat_template.jinja.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MlxLlamaError(f"Model folder {folder} does not exist; pass the folder that holds the model")
    tok_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    model_config = _read_json(folder / "config.json")
    gen_config = _read_json(folder / "generation_config.json")

    backend: Backend
    if (folder / "tokenizer.json").is_file():
        backend = TokenizersBackend(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        backend = SentencePieceBackend(folder / "tokenizer.model", _added_tokens(tok_config),
                                       legacy=tok_config.get("legacy") is not False)
    else:
        raise MlxLlamaError(
            f"No tokenizer in {folder}: expected tokenizer.json or tokenizer.model; copy them from "
            "the original model repo or re-run `mlx-llama convert`"
        )

    special_tokens = _special_token_texts(tok_config, special_map)
    chat_template, chat_templates = _find_chat_templates(folder, tok_config)
    bos_id, add_bos = _resolve_bos(backend, special_tokens, tok_config, model_config, gen_config)
    eos_id, eos_ids = _resolve_eos(backend, special_tokens, model_config, gen_config, chat_templates)
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        add_bos_token=add_bos,
        eos_token_ids=eos_ids,
        eos_token_id=eos_id,
        special_tokens=special_tokens,
        chat_template=chat_template,
        chat_templates=chat_templates,
    )


def _resolve_bos(
    backend: Backend,
    special_tokens: dict[str, Any],
    tok_config: Mapping[str, Any],
    model_config: Mapping[str, Any],
    gen_config: Mapping[str, Any],
) -> tuple[int | None, bool]:
    """(BOS id, whether prompts start with it); fills special_tokens["bos_token"] if unnamed.

    The id comes from the tokenizer's named BOS token, else whatever tokenizer.json's
    post-processor prepends, else the model configs, else SentencePiece's own. Whether to add
    it: tokenizer_config's explicit `add_bos_token` wins (transformers' Llama tokenizers honour
    it); otherwise tokenizer.json's post-processor decides, and a bare SentencePiece model gets
    BOS, as LlamaTokenizer does by default.
    """
    prefix = backend.added_prefix_ids()
    bos_id = _id_of(backend, special_tokens.get("bos_token"))
    if bos_id is None and prefix:
        bos_id = prefix[0]
    if bos_id is None:
        bos_id = _first_int(model_config.get("bos_token_id"), gen_config.get("bos_token_id"))
    if bos_id is None:
        bos_id = backend.default_bos_id()
    if isinstance(tok_config.get("add_bos_token"), bool):
        add_bos = tok_config["add_bos_token"]
    elif isinstance(backend, TokenizersBackend):
        add_bos = bool(prefix)
    else:
        add_bos = True
    if bos_id is not None and "bos_token" not in special_tokens:
        text = backend.id_to_token(bos_id)
        if text is not None:
            special_tokens["bos_token"] = text
    return bos_id, add_bos and bos_id is not None


def _resolve_eos(
    backend: Backend,
    special_tokens: dict[str, Any],
    model_config: Mapping[str, Any],
    gen_config: Mapping[str, Any],
    chat_templates: Mapping[str, str],
) -> tuple[int | None, set[int]]:
    """(the tokenizer's own EOS id, every id that ends a turn); fills special_tokens["eos_token"].

    Stop ids are the union of config.json's and generation_config.json's eos_token_id (an int
    or a list), the tokenizer's EOS token, and the end-of-turn markers the chat template uses
    that are special tokens in the vocabulary.
    """
    eos_ids = set(_int_list(model_config.get("eos_token_id")))
    eos_ids.update(_int_list(gen_config.get("eos_token_id")))
    eos_id = _id_of(backend, special_tokens.get("eos_token"))
    if eos_id is None and not eos_ids:
        eos_id = backend.default_eos_id()
    if eos_id is not None:
        eos_ids.add(eos_id)
        text = backend.id_to_token(eos_id)
        if text is not None:
            special_tokens.setdefault("eos_token", text)
    templates_text = "".join(chat_templates.values())
    for marker in END_OF_TURN_MARKERS:
        marker_id = backend.token_to_id(marker)
        if marker in templates_text and marker_id in backend.special_ids:
            eos_ids.add(marker_id)
    return eos_id, eos_ids


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable Latin-1 bytes stand for themselves
    and the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_UNICODE_TO_BYTE = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def check_utf8(text: str) -> None:
    """Refuse text with lone surrogates: what Python makes of bytes that are not UTF-8 (a file
    or argv in another encoding, or JSON's "\\udcff"), which both tokenizer libraries reject
    with an unreadable error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise MlxLlamaError(
            f"the text is not valid UTF-8 ({what} at character {e.start}): save or send it as UTF-8"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, {} when the file is absent; a clear error when it is broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MlxLlamaError(f"Could not read {path}: {one_line(exc)}; fix or re-download the file") from None
    if not isinstance(data, dict):
        raise MlxLlamaError(f"{path} is not a JSON object; fix or re-download the file")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in HF configs: a string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_token_texts(tok_config: Mapping[str, Any], special_map: Mapping[str, Any]) -> dict[str, Any]:
    """bos/eos/unk/pad token strings and additional_special_tokens, as chat templates see them."""
    out: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        for source in (tok_config, special_map):
            text = _token_text(source.get(name))
            if text is not None:
                out[name] = text
                break
    for source in (tok_config, special_map):
        extra = source.get("additional_special_tokens")
        if isinstance(extra, list):
            out["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
            break
    return out


def _added_tokens(tok_config: Mapping[str, Any]) -> dict[str, AddedToken]:
    """tokenizer_config.json's added_tokens_decoder as {content: AddedToken}."""
    decoder = tok_config.get("added_tokens_decoder")
    out: dict[str, AddedToken] = {}
    if isinstance(decoder, dict):
        for key, entry in decoder.items():
            content = _token_text(entry)
            if content is not None and str(key).isdigit():
                flags = entry if isinstance(entry, dict) else {}
                out[content] = AddedToken(int(key), bool(flags.get("special", True)),
                                          bool(flags.get("lstrip")), bool(flags.get("rstrip")))
    return out


def _find_chat_templates(folder: Path, tok_config: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The default chat template and all named ones.

    Sources, newest convention first: chat_template.jinja (what transformers now saves),
    additional_chat_templates/*.jinja, chat_template.json, then tokenizer_config.json's
    "chat_template" (a string, or a list of {"name", "template"}).
    """
    templates: dict[str, str] = {}
    raw = tok_config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                templates.setdefault(str(entry.get("name", "default")), entry["template"])
    json_template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(json_template, str):
        templates["default"] = json_template
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    default = templates.get("default") or next(iter(templates.values()), None)
    return default, templates


def _id_of(backend: Backend, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _int_list(value: Any) -> list[int]:
    """eos_token_id as configs write it: an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _first_int(*values: Any) -> int | None:
    for value in values:
        ints = _int_list(value)
        if ints:
            return ints[0]
    return None
