"""The demo model: the committed weights meet the quality bar; training is reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sfumato.cli import main
from sfumato.serving.tokenizer import PromptTokenizer, write_serving_tokenizer

PROMPTS = [
    "a red circle on a white background",
    "A Purple Triangle on a black background",
    "",
    "a zebra! on the moon, 42 times",
    "a " + "very " * 40 + "long prompt",
]


def test_committed_model_loads_in_diffusers_and_meets_the_bar(
    demo_model: Path, tmp_path: Path, capsys
) -> None:
    code = main(
        [
            "demo-model",
            "evaluate",
            "--model",
            str(demo_model),
            "--grid",
            str(tmp_path / "g.png"),
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    out = capsys.readouterr().out
    scores = json.loads((tmp_path / "e.json").read_text())
    assert code == 0, out
    assert scores["steps"] == 25 and scores["guidance"] == 5.0 and scores["passed"]
    # The exact training template and the forms people type, judged separately, same bar.
    for name in ("exact", "paraphrases"):
        s = scores[name]
        assert s["count"] == 48, name
        assert s["background"] >= 0.95 and s["colour"] >= 0.90 and s["shape"] >= 0.80, (name, s)
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_model_folder_is_a_standard_diffusers_pipeline(demo_model: Path) -> None:
    index = json.loads((demo_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["safety_checker"] == [None, None]
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (demo_model / "tokenizer" / name).is_file()
    size = sum(p.stat().st_size for p in demo_model.rglob("*") if p.is_file())
    assert size < 25 * 2**20


def test_serving_tokenizer_matches_clip_tokenizer(demo_model: Path, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(str(demo_model / "tokenizer"))
    length = write_serving_tokenizer(demo_model / "tokenizer", tmp_path / "tokenizer.json")
    ours = PromptTokenizer(tmp_path / "tokenizer.json")
    expected = reference(PROMPTS, padding="max_length", max_length=length, truncation=True).input_ids
    assert ours(PROMPTS).tolist() == expected
    # every word of the grammar is one token, punctuation included
    ids = ours(["a red circle on a white background"])[0]
    assert list(ids[:9]) == [reference.bos_token_id, *ids[1:8], reference.eos_token_id]
    assert len(set(ids[1:8].tolist())) == 6
    ids = ours(["On a green background, an orange circle!"])[0]
    assert ids[10] == reference.eos_token_id and reference.unk_token_id not in ids[1:10].tolist()


def test_training_is_seeded_and_reproducible(tmp_path: Path) -> None:
    """Two quick runs with one seed give identical weights; another seed gives others."""
    from safetensors.numpy import load_file

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert (
            main(
                [
                    "demo-model",
                    "train",
                    "--quick",
                    "--no-progress",
                    "--seed",
                    str(seed),
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    weights = {n: load_file(tmp_path / n / "unet" / "diffusion_pytorch_model.safetensors") for n in "abc"}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(np.array_equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(np.array_equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
    log = (tmp_path / "a" / "training_log.csv").read_text().splitlines()
    assert log[0] == "phase,step,loss,lr,elapsed_s" and any(line.startswith("unet,") for line in log)
    report = json.loads((tmp_path / "a" / "training_report.json").read_text())
    assert report["plan"]["empty_caption_rate"] == 0.1
