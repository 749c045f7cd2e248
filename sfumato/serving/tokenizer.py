"""Prompt tokenization on the serving path: Hugging Face ``tokenizers``, no transformers.

``sfumato export`` writes the pipeline's ``tokenizer.json`` from the source folder's CLIP
tokenizer with padding and truncation to the text encoder's length fixed inside it, so the
ids here are the ones ``StableDiffusionPipeline`` would feed its text encoder (a test checks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class PromptTokenizer:
    """Turns prompts into ``int64`` ``[B, L]`` ids, padded and truncated to ``L``."""

    def __init__(self, path: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        padding = self._tokenizer.padding
        if not padding or not padding.get("length"):
            raise ValueError(f"{path}: tokenizer.json must pad to a fixed length (written by sfumato export)")
        self.length = int(padding["length"])

    def __call__(self, prompts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(prompts)
        return np.asarray([e.ids for e in encodings], dtype=np.int64)


def write_serving_tokenizer(source_dir: Path, target: Path) -> int:
    """Save ``source_dir``'s CLIP tokenizer as one ``tokenizer.json`` with padding fixed.

    Uses transformers (export side only) so that slow-only folders (``vocab.json`` +
    ``merges.txt``, as Stable Diffusion 1.5 ships) convert exactly as transformers would.
    Returns the sequence length.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(source_dir), use_fast=True)
    backend = hf.backend_tokenizer
    length = int(hf.model_max_length)
    if length > 4096:
        raise ValueError(f"{source_dir}: tokenizer has no model_max_length")
    backend.enable_truncation(max_length=length)
    backend.enable_padding(length=length, pad_id=int(hf.pad_token_id), pad_token=str(hf.pad_token))
    target.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(target))
    return length
