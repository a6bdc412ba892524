"""Chat templates: turn a list of messages into the prompt text a chat model was trained on.

Models carry their prompt format as a Jinja template (tokenizer_config.json "chat_template" or
chat_template.jinja). Templates are written against the way Hugging Face transformers renders
them, so we render the same way: a sandboxed, immutable Jinja environment with `trim_blocks`
and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not HTML-escape,
and the helpers templates call (`raise_exception`, `strftime_now`). The template sees
`messages`, `add_generation_prompt`, `tools`, `documents`, the special tokens (`bos_token`,
`eos_token`, ...) and any extra variables the caller passes. Templates are untrusted code from
the internet, hence the sandbox.

Models without a template (base models) get a plain-text fallback, see `render_fallback`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_llama.errors import MlxLlamaError, one_line

__all__ = [
    "Message",
    "validate_messages",
    "render_chat_template",
    "render_fallback",
    "apply_chat_template",
]

Message = Mapping[str, Any]
"""One chat message: {"role": str, "content": str}, plus any extra keys a template reads."""


# Roles whose content may be a JSON object (a tool's result) instead of text.
TOOL_RESULT_ROLES = frozenset({"tool", "ipython"})


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check that `messages` is a non-empty list of {"role": str, "content": str} dicts.

    Returns fresh dict copies without keys whose value is None (as transformers does), so a
    template can neither see nor change the caller's objects. Raises MlxLlamaError naming the
    first bad message.
    """
    shape = 'each message must be {"role": str, "content": str}'
    if not isinstance(messages, (list, tuple)):
        raise MlxLlamaError(f"Messages must be a list of dicts, got {type(messages).__name__}; {shape}")
    if not messages:
        raise MlxLlamaError(f"The message list is empty; pass at least one message ({shape})")
    clean: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"Message {index}"
        if not isinstance(message, Mapping):
            raise MlxLlamaError(f"{where} is a {type(message).__name__}, not a dict; {shape}")
        message = {k: v for k, v in message.items() if v is not None}
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise MlxLlamaError(f"{where} has no valid 'role' (got {role!r}); {shape}")
        if content is None and role == "assistant" and message.get("tool_calls"):
            message["content"] = ""  # OpenAI history: a tool-calling turn has null content
        elif content is None:
            raise MlxLlamaError(f"{where} ({role}) has no 'content'; {shape}")
        elif isinstance(content, (list, tuple)):
            message["content"] = _joined_text_parts(content, f"{where} ({role})", shape)
        elif isinstance(content, Mapping) and role in TOOL_RESULT_ROLES:
            # A tool's result as a JSON object: Llama 3.1's template writes it with `tojson`,
            # and transformers passes it through the same way.
            message["content"] = dict(content)
        elif not isinstance(content, str):
            raise MlxLlamaError(
                f"{where} ({role}) has 'content' of {type(content).__name__}, not str; {shape}"
            )
        clean.append(message)
    return clean


def _joined_text_parts(parts: Sequence[Any], where: str, shape: str) -> str:
    """OpenAI-style content parts [{"type": "text", "text": ...}, ...] as one string, joined
    by newlines as the server joins them (and vLLM does): most templates only handle a string
    and would print a list's repr into the prompt."""
    texts = []
    for part in parts:
        if not (isinstance(part, Mapping) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise MlxLlamaError(f"{where} has a content part of type {kind!r}: only text parts "
                                f'({{"type": "text", "text": str}}) are supported; {shape}')
        texts.append(part["text"])
    return "\n".join(texts)


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render `template` for `messages` exactly as transformers' `apply_chat_template` would.

    `tools` and `documents` are always defined (None when absent) because templates test
    `tools is not none`. Caller variables override the special tokens of the same name.
    """
    chat = validate_messages(messages)
    compiled = _compile(template)
    context = {**(special_tokens or {}), **variables}
    try:
        return compiled.render(
            **context,
            messages=chat,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
        )
    except jinja2.TemplateError as exc:
        # raise_exception() in a template reports a user mistake (e.g. roles not alternating).
        raise MlxLlamaError(f"The chat template rejected the messages: {one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a template is code; its Python errors come from
        # the messages it was given (a number where it adds strings, a missing key, ...)
        raise MlxLlamaError(
            f"The chat template failed on these messages ({type(exc).__name__}: "
            f"{one_line(exc)}); check the messages' fields (types of content, tool_calls)"
        ) from None


def render_fallback(messages: Sequence[Message], *, add_generation_prompt: bool = True,
                    transcript: bool = False) -> str:
    """Prompt text for a model without a chat template.

    Such models are base models, trained on plain text, so the prompt should be plain text too:
    special markers like ChatML's `<|im_start|>` would be tokenized as ordinary characters the
    model has never seen in that role.

    - A single user message is returned unchanged. That is what mlx-lm and llama.cpp users get
      from `generate --prompt` with a base model (the raw prompt, continued), so a one-shot
      prompt behaves the same through the chat API.
    - Otherwise a transcript: each message as "Role: content", separated by blank lines, and,
      with `add_generation_prompt`, a final "Assistant:" for the model to continue. This is
      the conversational cue base models pick up from web text. `transcript=True` makes one
      from the first message on, as a multi-turn chat needs: each turn's text must begin with
      the previous turn's, or its KV cache could not be reused.
    """
    chat = validate_messages(messages)
    if len(chat) == 1 and chat[0]["role"] == "user" and not transcript:
        return chat[0]["content"]
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in chat]
    if add_generation_prompt:
        turns.append("Assistant:")
    return "\n\n".join(turns)


def apply_chat_template(
    template: str | None,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    special_tokens: Mapping[str, Any] | None = None,
    **variables: Any,
) -> str:
    """Render with `template`, or with `render_fallback` when the model has none.

    `continue_final_message` (as in transformers) leaves the last message open, so the model
    continues its text ("prefilling" the start of a reply) instead of starting a new turn.
    """
    if continue_final_message and add_generation_prompt:
        raise MlxLlamaError("continue_final_message continues the last message, "
                            "add_generation_prompt starts a new one: pass only one of them")
    if continue_final_message:  # render it with a tag after the text, then cut at the tag
        messages = validate_messages(messages)
        messages[-1]["content"] = messages[-1]["content"] + CONTINUE_TAG
    if template is None:
        text = render_fallback(messages, add_generation_prompt=add_generation_prompt)
    else:
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=special_tokens,
            **variables,
        )
    return _cut_at_tag(text) if continue_final_message else text


# Appended to the message to continue; the rendering is cut where it lands. Searching for the
# text itself instead finds short texts ("|", "m", "end") inside the closing `<|im_end|>`.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # (transformers' tag: the same cut point)


def _cut_at_tag(text: str) -> str:
    """The rendered text up to the end of the last message's content, dropping what closes
    the turn (and, where the template trimmed the content, its trailing spaces too)."""
    at = text.rfind(CONTINUE_TAG.strip())
    if at < 0:
        raise MlxLlamaError("continue_final_message: the last message's text is not in the "
                            "rendered prompt (the template changed or dropped it), so it cannot "
                            "be continued")
    return text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()


# --------------------------------------------------------------------------------------------
# The Jinja environment
# --------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks.

    Some templates use it; for inference it only needs to render its body.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, closing a path to Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature trick)
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and ' — wrong for prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    return env


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template text: compiling costs milliseconds, rendering microseconds."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise MlxLlamaError(
            f"The model's chat template is not valid Jinja (line {exc.lineno}: {one_line(exc)}); "
            "fix chat_template in tokenizer_config.json or chat_template.jinja"
        ) from None
