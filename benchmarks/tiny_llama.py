"""Train a small Llama on Python's own docstrings and save it as a Hugging Face folder.

Why: the bundled SmolLM2 came from a Q4_1 file, so its weights already sit on a 4-bit grid
(group 32) and flatter any 4-bit method that can find that grid. A model trained here has
ordinary, off-grid weights, which is what quantizers meet in practice. Text comes from the
Python standard library installed with the interpreter (module, class and function
docstrings), split by module into training and held-out text, so nothing is downloaded.

The training uses torch and transformers (dev dependencies, as in tests/conftest.py): on the
CPU backend their matrix products are several times faster than MLX's, and
`save_pretrained` writes exactly the folder users have.

    python benchmarks/tiny_llama.py -o /tmp/tiny-llama --minutes 5

`train_tiny_llama` is also used by tests/test_quantize_quality.py with a much smaller model
and a few seconds of training.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path


def stdlib_docstrings(held_out: bool = False, max_chars: int | None = None,
                      packages: tuple[str, ...] | None = None) -> str:
    """Docstrings of the standard library's modules, in a fixed order.

    About one module in eight (chosen by a hash of its path) is held out: `held_out=True`
    returns only those, `False` only the others. `packages` restricts the walk to those
    top-level names (for a small, fast corpus).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(p in rel for p in ("test", "idlelib", "site-packages", "lib2to3", "turtledemo")):
            continue
        if packages is not None and rel.split("/")[0].removesuffix(".py") not in packages:
            continue
        if (zlib.crc32(rel.encode()) % 8 == 0) != held_out:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.strip())
                    total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    return "\n\n".join(parts)


def train_tokenizer(text: str, folder: Path, vocab_size: int) -> Path:
    """A SentencePiece BPE tokenizer (byte fallback) and a LlamaTokenizer config."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.tmp"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, minloglevel=2, max_sentence_length=1 << 16,
        input_sentence_size=200_000, shuffle_input_sentence=True,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer",
    }))
    return folder / "tokenizer.model"


def train_tiny_llama(
    folder: Path,
    text: str,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    seconds: float = 300.0,
    max_steps: int | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    dtype: str = "bfloat16",
    log=None,
) -> Path:
    """Train for `seconds` (or `max_steps`) and save an HF folder at `folder`; returns it."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    folder = Path(folder)
    sp_path = train_tokenizer(text, folder, vocab_size)
    ids = torch.tensor(spm.SentencePieceProcessor(model_file=str(sp_path)).encode(text))
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max(512, seq_len),
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    step = 0
    planned = max_steps or 10**9
    while step < planned and (max_steps is not None or time.perf_counter() - start < seconds):
        # Cosine decay over the time (or step) budget, after a short warm-up.
        done = step / planned if max_steps else (time.perf_counter() - start) / seconds
        scale = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss  # transformers shifts the labels
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if log and step % 50 == 0:
            log(f"step {step}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s")
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    text = stdlib_docstrings()
    held = stdlib_docstrings(held_out=True)
    print(f"training text {len(text) / 1e6:.1f} MB, held-out {len(held) / 1e6:.1f} MB")
    train_tiny_llama(args.out, text, vocab_size=args.vocab, hidden_size=args.hidden,
                     intermediate_size=int(args.hidden * 2.6875) // 64 * 64,
                     num_hidden_layers=args.layers, seconds=args.minutes * 60,
                     dtype=args.dtype, log=lambda m: print(m, flush=True))
    (args.out / "heldout.txt").write_text(held[:20000])
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
