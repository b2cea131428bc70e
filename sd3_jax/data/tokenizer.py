"""A CLIP byte-level BPE tokenizer built from a word list: for models trained here on a closed vocabulary."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def clip_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocabulary and merges: printable ASCII bytes (alone and word-final), merges that spell
    `words`, then <|startoftext|> and <|endoftext|> last, as in CLIP's vocabulary (EOS has the top id)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = [bytes_to_unicode()[b] for b in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            if f"{parts[0]} {parts[1]}" not in merges:
                merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(
    path: str | os.PathLike,
    words: Iterable[str],
    pad_token: str = "<|endoftext|>",
    model_max_length: int = 77,
):
    """A transformers CLIPTokenizer over `clip_vocab(words)`, saved to `path` (vocab.json, merges.txt)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(words)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(path, pad_token=pad_token, model_max_length=model_max_length)
    tok.save_pretrained(path)
    return tok
