"""A CLIP byte-level BPE tokenizer built from a word list: for models trained here on a closed vocabulary."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank (CLIP's rule)."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def clip_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocabulary and merges under which every word of `words` is one token: printable ASCII
    bytes (alone and word-final), then merges, then <|startoftext|> and <|endoftext|> last, as in CLIP's
    vocabulary (EOS has the top id). A merge is added for the first adjacent pair of a word's current
    tokens until the word is whole, so merges learnt for one word cannot split another."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = [bytes_to_unicode()[b] for b in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = list(dict.fromkeys(words))
    changed = True
    while changed:
        changed = False
        for word in words:
            parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                changed = True
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in merges]


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
