"""A CLIP-style BPE tokenizer with a small vocabulary, trained on the data set's captions.

CLIP's tokenizer is byte-pair encoding over lower-cased words, with ``</w>`` marking the end
of a word and ``<|startoftext|>`` / ``<|endoftext|>`` around the sequence. We train the same
kind of model with Hugging Face ``tokenizers`` on the caption grammar (every word of the
grammar ends up a single token) over an alphabet of letters and digits, so any prompt still
tokenizes, and save it in CLIP's ``vocab.json`` + ``merges.txt`` form, which
``transformers.CLIPTokenizer`` and ``StableDiffusionPipeline`` load unchanged.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from sfumato.shapes import all_scenes

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 16


def train_tokenizer(out_dir: Path) -> Path:
    """Train the BPE model on every caption of the grammar and save CLIP-format files."""
    tokenizer = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list(string.ascii_lowercase + string.digits)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,  # more than the grammar can use: training stops when words are whole
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    # The end-of-word form of each single character, so that an unseen word still encodes.
    corpus = [scene.caption for scene in all_scenes()] + [" ".join(alphabet)]
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(out_dir))
    return out_dir
