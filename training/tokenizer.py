"""A CLIP-style BPE tokenizer with a small vocabulary, learnt from the data set's captions.

CLIP's tokenizer is byte-pair encoding over lower-cased words, with ``</w>`` marking the end
of a word and ``<|startoftext|>`` / ``<|endoftext|>`` around the sequence (it splits punctuation
off as tokens of its own). We learn merges with the classic BPE procedure (Sennrich et al.) on
every word of the caption forms (:mod:`sfumato.shapes`) plus :data:`EXTRA_WORDS` — colours and
shapes the data set does not draw, so that a fine-tune can teach one as a single token — until
each is one token, over an alphabet of letters, digits and punctuation so that any prompt still
tokenizes without unknown tokens, and save CLIP's ``vocab.json`` + ``merges.txt``, which
``transformers.CLIPTokenizer`` and ``StableDiffusionPipeline`` load unchanged.

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

from sfumato.shapes import COLOURS, FORMS_WITH_BACKGROUND, FORMS_WITHOUT_BACKGROUND, SHAPES

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 16
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
# Words outside the data set that still get a token of their own (untrained until a fine-tune
# teaches them): other colours and shapes people ask for, and the commonest small words.
EXTRA_WORDS = (
    *("pink", "brown", "grey", "gray", "cyan", "magenta", "teal", "navy", "gold", "silver"),
    *("beige", "maroon", "lime", "violet", "indigo", "turquoise"),
    *("star", "heart", "diamond", "hexagon", "pentagon", "oval", "rectangle", "cross", "ring"),
    *("the", "with", "and", "in", "of"),
)


def grammar_words() -> Counter[str]:
    """Every word of every caption form, counted over all scenes (plus the extra words once)."""
    words: Counter[str] = Counter(EXTRA_WORDS)
    for form in (*FORMS_WITH_BACKGROUND, *FORMS_WITHOUT_BACKGROUND):
        for colour in COLOURS:
            for shape in SHAPES:
                for background in COLOURS:
                    if background == colour:
                        continue
                    text = form.format(
                        colour=colour, shape=shape, background=background, a_colour="a", a_background="an"
                    )
                    words.update(text.replace(",", " ").split())
    return words


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
    """Learn the merges on the grammar's words and save CLIP-format files in ``out_dir``."""
    merges = learn_merges(grammar_words())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for token in [*ALPHABET, *(c + "</w>" for c in ALPHABET), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out_dir
