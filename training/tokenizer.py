"""A CLIP-style BPE tokenizer with a small vocabulary, learnt from the data set's captions.

CLIP's tokenizer is byte-pair encoding over lower-cased words, with ``</w>`` marking the end
of a word and ``<|startoftext|>`` / ``<|endoftext|>`` around the sequence. We learn merges with
the classic BPE procedure (Sennrich et al.) on the caption grammar until every word of the
grammar is one token, over an alphabet of letters and digits so that any prompt still
tokenizes, and save CLIP's ``vocab.json`` + ``merges.txt``, which ``transformers.CLIPTokenizer``
and ``StableDiffusionPipeline`` load unchanged.

The learner is a few lines of our own rather than ``tokenizers``' trainer because it must be
deterministic: ties between equally frequent pairs are broken by the pair itself, so the same
captions always give the same ids (the trainer's hash-map order does not).
"""

from __future__ import annotations

import json
import string
from collections import Counter
from itertools import pairwise
from pathlib import Path

from sfumato.shapes import all_scenes

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 16
ALPHABET = string.ascii_lowercase + string.digits


def _split(word: str) -> tuple[str, ...]:
    return (*word[:-1], word[-1] + "</w>")


def learn_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first (ties: the smaller pair), until no pair is left."""
    segmented = {_split(word): count for word, count in words.items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in segmented.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in segmented.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        segmented = merged


def train_tokenizer(out_dir: Path) -> Path:
    """Learn the merges on every caption of the grammar and save CLIP-format files in ``out_dir``."""
    words: Counter[str] = Counter()
    for scene in all_scenes():
        words.update(scene.caption.split())
    merges = learn_merges(words)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for token in [*ALPHABET, *(c + "</w>" for c in ALPHABET), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out_dir
