"""A chat whose KV cache follows it from turn to turn.

Re-rendering the whole conversation and re-tokenizing it each turn would usually share a long
prefix with what the cache holds, but not always: a generated reply, decoded to text and
encoded again, can split into different tokens, and then everything after the split is
prefilled again. So the conversation keeps the exact text its cached tokens stand for, renders
the new turn with the chat template, and encodes only the part after that text. When the
rendering does not extend the history (a template that rewrites earlier turns, a reply cut by
a stop string or Ctrl-C), it falls back to the full rendering and plain prefix reuse.
"""

from __future__ import annotations

from typing import Callable

from .cache import PromptCache
from .chat import render_fallback


class Conversation:
    def __init__(self, model, tokenizer, system: str | None = None,
                 make_layers: Callable[[], list] | None = None) -> None:
        """`make_layers` builds the per-layer caches (default: the model's default kind);
        `cache_options.cache_factory` gives one for --kv-bits / --max-kv-size."""
        self.tokenizer = tokenizer
        self.make_layers = make_layers or model.make_cache
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self.system}] if self.system else []
        )
        self.cache = PromptCache(self.make_layers)
        self.history_text = ""  # what cache.tokens stand for, as the template renders it
        self._prompt_text = ""
        self._tokens_before: list[int] = []  # cache.tokens when the current turn began

    def add_user(self, text: str) -> list[int]:
        """Append a user message; return the prompt tokens for the model's reply."""
        self.messages.append({"role": "user", "content": text})
        self._tokens_before = list(self.cache.tokens)
        full = self._render()
        self._prompt_text = full
        if self.history_text and self.cache.tokens and full.startswith(self.history_text):
            new = self.tokenizer.encode(full[len(self.history_text):], add_special_tokens=False)
            return self.cache.tokens + new
        return self._render(tokenize=True)

    def _render(self, tokenize: bool = False) -> str | list[int]:
        """The conversation as the prompt for the next reply. A model without a chat template
        gets the plain transcript from the first turn on (see `render_fallback`)."""
        if self.tokenizer.chat_template is None:
            text = render_fallback(self.messages, transcript=True)
            return self.tokenizer.encode(text) if tokenize else text
        return self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True,
                                                  tokenize=tokenize)

    def fit(self, prompt: list[int], budget: int) -> tuple[list[int], int]:
        """Drop the oldest turns (never the system message or the newest user message) until
        the prompt is at most `budget` tokens, as Ollama does when a chat outgrows the context.
        Returns the prompt and how many messages were dropped; if even that cannot fit, nothing
        changes (the turn then fails as too long). The cache no longer matches a shortened
        history, so the next prefill starts over (prefix reuse still applies)."""
        if len(prompt) <= budget:
            return prompt, 0
        kept = (list(self.messages), self.history_text, prompt)
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        dropped = 0
        while len(prompt) > budget and len(self.messages) - first > 1:
            del self.messages[first]
            dropped += 1
            while len(self.messages) - first > 1 and self.messages[first]["role"] != "user":
                del self.messages[first]  # a turn starts with the user's message
                dropped += 1
            self.history_text = ""
            prompt = self._render(tokenize=True)
        if len(prompt) > budget:  # the newest message alone is too long: change nothing
            self.messages, self.history_text, prompt = kept
            return prompt, 0
        self._prompt_text = self._render()
        return prompt, dropped

    def cancel_user(self) -> None:
        """Take back the last user message (its turn failed, e.g. over the context), so the
        conversation goes on as it was. If the failure came after the cache was touched, the
        history text no longer matches its tokens, and the next turn falls back to prefix reuse."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        if self.cache.tokens != self._tokens_before:
            self.history_text = ""

    def add_reply(self, text: str, last_token: int | None, complete: bool) -> None:
        """Record the assistant's reply. `complete` is False when it was cut short abnormally."""
        # The transcript writes "Assistant: " + content, and the reply continues "Assistant:"
        # with its own leading space: stored without it, the next rendering extends this one.
        plain = self.tokenizer.chat_template is None and text.startswith(" ")
        self.messages.append({"role": "assistant", "content": text[1:] if plain else text})
        ended_on_eos = last_token is not None and last_token in self.tokenizer.eos_token_ids
        if not complete:
            self.history_text = ""
            return
        end = self.tokenizer.id_to_token(last_token) if ended_on_eos else ""
        self.history_text = self._prompt_text + text + (end or "")
