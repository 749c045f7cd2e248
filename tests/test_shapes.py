"""The data set definition and the judge that every quality figure relies on."""

from __future__ import annotations

import numpy as np
import pytest

from sfumato import shapes


def test_grammar_has_every_combination_once() -> None:
    scenes = shapes.all_scenes()
    assert len(scenes) == 8 * 3 * 7
    assert len({s.caption for s in scenes}) == len(scenes)
    assert all(s.colour != s.background for s in scenes)


def test_caption_round_trip_and_errors() -> None:
    scene = shapes.parse_caption("a red circle on a white background")
    assert scene == shapes.Scene(colour="red", shape="circle", background="white")
    for bad in ("a red circle", "a red hexagon on a white background", "a red circle on a red background"):
        with pytest.raises(ValueError, match="caption"):
            shapes.parse_caption(bad)


def test_images_are_32px_with_the_exact_background_and_shape_inside() -> None:
    images, captions = shapes.make_dataset(200, seed=5)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    for image, caption in zip(images, captions, strict=True):
        scene = shapes.parse_caption(caption)
        background = np.array(shapes.PALETTE[scene.background])
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == background).all(), "the shape must lie wholly inside the image"
        colour = np.array(shapes.PALETTE[scene.colour])
        assert (np.abs(image.astype(int) - colour).sum(axis=2) == 0).sum() >= 16


def test_dataset_is_seeded() -> None:
    a, ca = shapes.make_dataset(20, seed=1)
    b, cb = shapes.make_dataset(20, seed=1)
    c, _ = shapes.make_dataset(20, seed=2)
    assert ca == cb and np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_judge_reads_every_rendered_scene_correctly() -> None:
    """The judge is the ruler of every quality figure: on ground truth it must be perfect."""
    rng = np.random.default_rng(0)
    scenes = shapes.all_scenes() * 4
    images = np.stack([shapes.render(s, rng=rng) for s in scenes])
    score = shapes.score(images, scenes)
    assert (score.background, score.colour, score.shape) == (1.0, 1.0, 1.0)


def test_judge_reports_an_empty_image_as_no_object() -> None:
    blank = np.full((32, 32, 3), shapes.PALETTE["blue"], dtype=np.uint8)
    verdict = shapes.judge(blank)
    assert verdict == shapes.Judgement(background="blue", colour=None, shape=None)


def test_judge_tolerates_noise_like_a_generated_image() -> None:
    rng = np.random.default_rng(3)
    scenes = shapes.random_scenes(60, seed=3)
    images = np.stack([shapes.render(s, rng=rng) for s in scenes]).astype(np.float32)
    noisy = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    score = shapes.score(noisy, scenes)
    assert score.background == 1.0 and score.colour == 1.0 and score.shape >= 0.95


def test_judge_reads_soft_decoded_looking_shapes() -> None:
    """A decoder softens edges and rounds corners; a soft square is still a square."""
    rng = np.random.default_rng(4)
    scenes = shapes.all_scenes()
    images = np.stack([shapes.render(s, rng=rng) for s in scenes]).astype(np.float32)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, 1 + dy : 33 + dy, 1 + dx : 33 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    score = shapes.score(np.rint(blurred).astype(np.uint8), scenes)
    # The one hard pair is yellow on orange (RGB distance 81): blurred, a small triangle's apex fades.
    assert (score.background, score.colour) == (1.0, 1.0) and score.shape >= 0.99


def test_paraphrases_read_back_to_what_they_ask_for() -> None:
    rng = np.random.default_rng(7)
    seen_forms = set()
    for scene in shapes.all_scenes():
        for background in (True, False):
            prompt = shapes.paraphrase(scene, rng, background=background)
            assert prompt.text != scene.caption or background, prompt
            read = shapes.read_prompt(prompt.text)
            assert (read.colour, read.shape, read.background) == (
                scene.colour,
                scene.shape,
                scene.background if background else None,
            ), prompt.text
            seen_forms.add(prompt.text.lower().rstrip(".!").startswith("on "))
    assert seen_forms == {True, False}  # the inverted order is among the forms drawn


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a orange circle on a green background", ("orange", "circle", "green")),
        ("An orange circle on a green background.", ("orange", "circle", "green")),
        ("orange circle, green background", ("orange", "circle", "green")),
        ("On a green background, an orange circle!", ("orange", "circle", "green")),
        ("orange circle on green", ("orange", "circle", "green")),
        ("a green circle on an orange background", ("green", "circle", "orange")),
        ("Orange Circle", ("orange", "circle", None)),
        ("a pink square on a white background", ("pink", "square", "white")),
    ],
)
def test_read_prompt_forms(text: str, expected: tuple) -> None:
    colours = (*shapes.COLOURS, "pink")
    read = shapes.read_prompt(text, colours=colours)
    assert (read.colour, read.shape, read.background) == expected


def test_read_prompt_refuses_what_is_not_a_scene() -> None:
    for text in ("a zebra on the moon", "a red thing", "circle"):
        with pytest.raises(ValueError, match="not a prompt"):
            shapes.read_prompt(text)


def test_paraphrased_captions_keep_the_same_images() -> None:
    plain, exact = shapes.make_dataset(300, seed=4)
    mixed, captions = shapes.make_dataset(300, seed=4, paraphrase_rate=0.65, no_background_rate=0.2)
    assert np.array_equal(plain, mixed)
    changed = [c for c, e in zip(captions, exact, strict=True) if c != e]
    assert 0.45 < len(changed) / 300 < 0.8
    without = [c for c in changed if shapes.read_prompt(c).background is None]
    assert 0.05 < len(without) / len(changed) < 0.4
    for caption, truth in zip(captions, exact, strict=True):
        asked, scene = shapes.read_prompt(caption), shapes.parse_caption(truth)
        assert (asked.colour, asked.shape) == (scene.colour, scene.shape)
        assert asked.background in (None, scene.background)


def test_score_counts_any_background_right_when_the_prompt_leaves_it_out() -> None:
    rng = np.random.default_rng(1)
    scene = shapes.Scene(colour="red", shape="circle", background="blue")
    image = shapes.render(scene, rng=rng)[None]
    asked = shapes.Prompt("a red circle on a white background", "red", "circle", "white")
    assert shapes.score(image, [asked]).background == 0.0
    left_out = shapes.Prompt("red circle", "red", "circle", None)
    result = shapes.score(image, [left_out])
    assert (result.background, result.colour, result.shape) == (1.0, 1.0, 1.0)
