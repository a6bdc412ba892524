"""Output formats: chat and text completions differ only in how a piece is wrapped."""

from __future__ import annotations

import codecs
import time

from . import schemas as S
from .worker import Job, TokenLogprob


class ChatFormat:
    route = "chat"

    def __init__(self, job: Job, model: str, want_logprobs: bool) -> None:
        self.id, self.model, self.created = job.id, model, int(time.time())
        self.want_logprobs = want_logprobs

    def _logprobs(self, items: list[TokenLogprob]) -> S.ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        return S.ChatLogprobs(content=[
            S.ChatTokenLogprob(token=i.token, logprob=i.logprob, bytes=i.bytes, top_logprobs=[
                S.TopLogprob(token=t, logprob=v, bytes=b) for t, v, b in i.top])
            for i in items])

    def _chunk(self, choice: S.ChatChunkChoice | None, usage_null: bool, **extra) -> str:
        chunk = S.ChatCompletionChunk(id=self.id, object="chat.completion.chunk",
                                      created=self.created, model=self.model,
                                      choices=[choice] if choice else [], **extra)
        if usage_null and "usage" not in extra:
            chunk.usage = None
        return chunk.model_dump_json(exclude_unset=True)

    def head(self, usage_null: bool) -> str | None:
        choice = S.ChatChunkChoice(index=0, delta=S.ChatDelta(role="assistant", content=""),
                                   finish_reason=None)
        return self._chunk(choice, usage_null)

    def piece(self, text: str, items: list[TokenLogprob], usage_null: bool) -> str:
        choice = S.ChatChunkChoice(index=0, delta=S.ChatDelta(content=text), finish_reason=None)
        if self.want_logprobs:
            choice.logprobs = self._logprobs(items)
        return self._chunk(choice, usage_null)

    def tail(self, finish_reason: str, usage_null: bool) -> str:
        choice = S.ChatChunkChoice(index=0, delta=S.ChatDelta(), finish_reason=finish_reason)
        return self._chunk(choice, usage_null)

    def usage(self, usage: S.Usage) -> str:
        return self._chunk(None, False, usage=usage)

    def whole(self, text: str, finish_reason: str, items: list[TokenLogprob],
              usage: S.Usage) -> S.ChatCompletion:
        return S.ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage,
                                choices=[S.ChatChoice(
                                    index=0, message=S.AssistantMessage(content=text),
                                    finish_reason=finish_reason, logprobs=self._logprobs(items))])


class CompletionFormat:
    route = "completions"

    def __init__(self, job: Job, model: str, want_logprobs: bool) -> None:
        self.id, self.model, self.created = job.id, model, int(time.time())
        self.want_logprobs = want_logprobs
        self.offset = 0  # characters of completion text before the next token
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _logprobs(self, items: list[TokenLogprob]) -> S.CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        offsets = []
        for i in items:  # characters of the text before each token (a split one: whole ones)
            offsets.append(self.offset)
            self.offset += len(self.utf8.decode(bytes(i.bytes)))
        return S.CompletionLogprobs(
            tokens=[i.token for i in items], token_logprobs=[i.logprob for i in items],
            top_logprobs=[{t: v for t, v, _ in i.top} for i in items], text_offset=offsets)

    def _chunk(self, text: str, finish_reason: str | None, items: list[TokenLogprob],
               usage_null: bool, **extra) -> str:
        choice = S.CompletionChoice(index=0, text=text, finish_reason=finish_reason,
                                    logprobs=self._logprobs(items))
        chunk = S.Completion(id=self.id, object="text_completion", created=self.created,
                             model=self.model,
                             choices=[choice] if "usage" not in extra else [], **extra)
        if usage_null and "usage" not in extra:
            chunk.usage = None
        return chunk.model_dump_json(exclude_unset=True)

    def head(self, usage_null: bool) -> str | None:
        return None

    def piece(self, text: str, items: list[TokenLogprob], usage_null: bool) -> str:
        return self._chunk(text, None, items, usage_null)

    def tail(self, finish_reason: str, usage_null: bool) -> str:
        return self._chunk("", finish_reason, [], usage_null)

    def usage(self, usage: S.Usage) -> str:
        return self._chunk("", None, [], False, usage=usage)

    def whole(self, text: str, finish_reason: str, items: list[TokenLogprob],
              usage: S.Usage) -> S.Completion:
        return S.Completion(id=self.id, created=self.created, model=self.model, usage=usage,
                            choices=[S.CompletionChoice(index=0, text=text,
                                                        finish_reason=finish_reason,
                                                        logprobs=self._logprobs(items))])


def sse(data: str) -> str:
    return f"data: {data}\n\n"
