"""The tokenizer libraries behind `tokenizer.Tokenizer`: Hugging Face `tokenizers` (a
tokenizer.json) and SentencePiece (a tokenizer.model), each behind the same small surface.

Only mechanics live here (encode, decode, which ids are special, what the library would
prepend); the policy a model's configs decide (BOS, end tokens, templates) is `Tokenizer`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from mlx_llama.errors import MlxLlamaError, one_line




class Backend(Protocol):
    """What `Tokenizer` needs from a tokenizer library; the policy lives in `Tokenizer`."""

    name: str
    special_ids: frozenset[int]  # ids `decode` leaves out
    vocab_size: int
    byte_level: bool  # pieces spell bytes, one character each (GPT-2's alphabet)

    def encode(self, text: str) -> list[int]: ...  # no BOS/EOS added
    def decode(self, ids: Sequence[int]) -> str: ...  # special ids skipped
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def added_prefix_ids(self) -> list[int]: ...  # what the library itself would prepend
    def default_bos_id(self) -> int | None: ...
    def default_eos_id(self) -> int | None: ...


class TokenizersBackend:
    """A Hugging Face `tokenizers` tokenizer.json.

    The library already splits out added tokens and knows its decoder; we only switch off its
    post-processor (the BOS/EOS template) because `Tokenizer` applies the BOS policy itself.
    """

    name = "tokenizers"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises bare Exceptions for bad JSON
            raise MlxLlamaError(
                f"Could not read {path}: {one_line(exc)}; re-download or re-convert the model"
            ) from None
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # GPT-2 style byte-level vocabulary (a character per byte)? The decoder says so; its
        # own JSON state is tiny, unlike the whole tokenizer's.
        decoder = self._tok.decoder
        self.byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([i for i in ids if i >= 0], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def added_prefix_ids(self) -> list[int]:
        """Ids the post-processor puts in front of a sequence (Llama 3: `<|begin_of_text|>`).

        Found by encoding one character with and without special tokens rather than by parsing
        the post-processor JSON, so every processor type the library supports is covered.
        """
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def default_bos_id(self) -> int | None:
        return None

    def default_eos_id(self) -> int | None:
        return None


@dataclass(frozen=True)
class AddedToken:
    """An entry of tokenizer_config.json's added_tokens_decoder, as SentencePiece needs it."""

    id: int
    special: bool = True
    lstrip: bool = False  # whitespace before it in a text belongs to it (is dropped)
    rstrip: bool = False  # whitespace after it likewise


class SentencePieceBackend:
    """A SentencePiece `tokenizer.model`, with Hugging Face's added-token handling on top.

    SentencePiece itself does not recognise control tokens such as `<s>` or Mistral's `[INST]`
    inside text, but chat templates write them as text, so we split the text on those strings
    first and encode the pieces between them separately. Each piece gets SentencePiece's usual
    dummy-prefix space, which is what Hugging Face's "legacy" Llama tokenizer and Meta's own
    reference code produce for `<s>[INST] ...`; with `legacy=False` (tokenizer_config.json's
    `"legacy": false`) only the text's first piece does, as transformers then encodes.
    """

    name = "sentencepiece"
    byte_level = False  # pieces are text ("▁the"), bytes only as <0xNN> byte-fallback pieces

    def __init__(self, path: Path, added_tokens: Mapping[str, AddedToken],
                 legacy: bool = True) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(path))
        except Exception as exc:
            raise MlxLlamaError(
                f"Could not read {path}: {one_line(exc)}; re-download or re-convert the model"
            ) from None
        sp = self._sp
        self._n_pieces = sp.get_piece_size()
        # Strings to split on: control pieces (<s>, </s>, [INST] ...), the unknown piece, and
        # every added token from tokenizer_config.json.
        self._split_ids: dict[str, int] = {}
        special: set[int] = set()
        for i in range(self._n_pieces):
            if sp.is_control(i):
                self._split_ids[sp.id_to_piece(i)] = i
                special.add(i)
            elif sp.is_unknown(i):
                self._split_ids[sp.id_to_piece(i)] = i
        self._extra_pieces: dict[int, str] = {}
        self._strips = {c: a for c, a in added_tokens.items() if a.lstrip or a.rstrip}
        self._legacy = legacy
        for content, added in added_tokens.items():
            token_id, is_special = added.id, added.special
            self._split_ids[content] = token_id
            if token_id >= self._n_pieces:
                # Beyond the SentencePiece vocab (a <pad> appended by a fine-tune, or tags such
                # as <tool_call> that a tool-use fine-tune prints): decoded as their text
                # unless they are special, as transformers does.
                self._extra_pieces[token_id] = content
            if is_special and (token_id >= self._n_pieces or not sp.is_unknown(token_id)):
                special.add(token_id)
        # The unknown piece stays visible (" ⁇ "), as SentencePiece decodes it: it tells the
        # reader that something was lost.
        self.special_ids = frozenset(special)
        self._visible_extra = any(i not in self.special_ids for i in self._extra_pieces)
        # Without legacy, text after a token is encoded behind this (see `_encode_piece`).
        self._unk_prefix = sp.id_to_piece(sp.unk_id())
        self._unk_prefix_ids = len(sp.encode(self._unk_prefix))
        self.vocab_size = max([self._n_pieces, *(i + 1 for i in self._extra_pieces)])
        names = sorted(self._split_ids, key=len, reverse=True)
        self._split_re = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def encode(self, text: str) -> list[int]:
        sp = self._sp
        if self._split_re is None or self._split_re.search(text) is None:
            return sp.encode(text)
        ids: list[int] = []
        pos = 0
        for match in self._split_re.finditer(text):
            if match.start() < pos:  # inside whitespace an rstrip token took
                continue
            piece = text[pos : match.start()]
            added = self._strips.get(match.group())
            if added is not None and added.lstrip:
                piece = piece.rstrip()
            if piece:
                ids.extend(self._encode_piece(piece, first=pos == 0))
            ids.append(self._split_ids[match.group()])
            pos = match.end()
            if added is not None and added.rstrip:
                pos += len(text[pos:]) - len(text[pos:].lstrip())
        if pos < len(text):
            ids.extend(self._encode_piece(text[pos:], first=pos == 0))
        return ids

    def _encode_piece(self, piece: str, first: bool) -> list[int]:
        """One stretch of text between split tokens. After a token it gets no dummy-prefix
        space without legacy, nor with it when it starts with a space of its own (as
        transformers' Metaspace: "a [MASK] b" ends in "▁b", not "▁▁" "b"). SentencePiece adds
        the prefix to whatever it is given, so it is given one that takes it ("<unk>"), whose
        own ids are then dropped."""
        if first or (self._legacy and not piece.startswith(" ")):
            return self._sp.encode(piece)
        return self._sp.encode(self._unk_prefix + piece)[self._unk_prefix_ids:]

    def decode(self, ids: Sequence[int]) -> str:
        n, skip = self._n_pieces, self.special_ids
        if not self._visible_extra:  # the usual model, and the streaming detokenizer's path
            return self._sp.decode([i for i in ids if 0 <= i < n and i not in skip])
        parts: list[str] = []
        run: list[int] = []  # consecutive SentencePiece ids, decoded together (spaces, bytes)

        def flush() -> None:
            # SentencePiece drops a text's leading "▁"; after an added token it is a space.
            space = " " if parts and self._sp.id_to_piece(run[0]).startswith("▁") else ""
            parts.append(space + self._sp.decode(run))
            run.clear()

        for i in ids:
            if i in skip or i < 0:
                continue
            if i < n:
                run.append(i)
            elif i in self._extra_pieces:  # a visible added token past the vocab: its text
                if run:
                    flush()
                parts.append(self._extra_pieces[i])
        if run:
            flush()
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self._split_ids:
            return self._split_ids[token]
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if 0 <= token_id < self._n_pieces:
            return self._sp.id_to_piece(token_id)
        return self._extra_pieces.get(token_id)

    def added_prefix_ids(self) -> list[int]:
        return []

    def default_bos_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def default_eos_id(self) -> int | None:
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else None
