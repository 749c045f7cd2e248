"""The ``pipeline`` model on a real tritonserver, exercised over gRPC as power users call it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from sfumato import shapes
from sfumato.cli import main
from sfumato.clients.triton_grpc import TritonCallError, generate
from sfumato.serving.pipeline import initial_noise

RED_CIRCLE = "a red circle on a white background"


def _gen(triton, prompt: str = RED_CIRCLE, **options):
    return generate(triton.grpc_url, prompt, **options)


def test_txt2img_draws_what_was_asked(triton) -> None:
    result = _gen(triton, num_images=4, seed=100, steps=25, guidance_scale=5.0)
    assert result.images.shape == (4, 32, 32, 3) and result.images.dtype == np.uint8
    assert result.seeds.tolist() == [100, 101, 102, 103]
    verdicts = [shapes.judge(img) for img in result.images]
    assert all(v.background == "white" and v.colour == "red" for v in verdicts), verdicts
    assert sum(v.shape == "circle" for v in verdicts) >= 3, verdicts


def test_same_seed_gives_identical_bytes_whatever_runs_beside_it(triton) -> None:
    request = {"seed": 7, "steps": 10, "num_images": 2, "guidance_scale": 5.0}
    alone = _gen(triton, **request).images
    others = [
        {"prompt": f"a {c} square on a black background", "seed": i, "steps": 10, "num_images": 1 + i % 3}
        for i, c in enumerate(["green", "blue", "yellow", "orange", "purple", "white"])
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        noise = [pool.submit(lambda o: _gen(triton, o.pop("prompt"), **o), dict(o)) for o in others]
        crowded = [pool.submit(lambda: _gen(triton, **request).images) for _ in range(2)]
        for future in noise:
            future.result()
        for future in crowded:
            assert future.result().tobytes() == alone.tobytes()


def test_any_image_regenerates_alone_from_its_seed(triton) -> None:
    batch = _gen(triton, num_images=3, seed=2**63 - 2, steps=8)
    assert batch.seeds.tolist() == [2**63 - 2, 2**63 - 1, 0]  # wraps within int64
    single = _gen(triton, num_images=1, seed=int(batch.seeds[2]), steps=8)
    assert np.array_equal(single.images[0], batch.images[2])


def test_random_seed_is_reported(triton) -> None:
    first, second = _gen(triton, steps=4), _gen(triton, steps=4)
    assert first.seeds[0] != second.seeds[0]
    again = _gen(triton, steps=4, seed=int(first.seeds[0]))
    assert np.array_equal(again.images, first.images)


def test_guidance_and_negative_prompt_change_the_image(triton) -> None:
    base = _gen(triton, seed=3, steps=10, guidance_scale=5.0).images
    unguided = _gen(triton, seed=3, steps=10, guidance_scale=1.0).images
    negative = _gen(triton, seed=3, steps=10, guidance_scale=5.0, negative_prompt="a red square").images
    assert not np.array_equal(base, unguided)
    assert not np.array_equal(base, negative)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_every_scheduler_draws_the_prompt(triton, scheduler: str) -> None:
    result = _gen(
        triton, "a blue square on a yellow background", scheduler=scheduler, seed=11, num_images=3, steps=25
    )
    verdicts = [shapes.judge(img) for img in result.images]
    assert all(v.background == "yellow" and v.colour == "blue" for v in verdicts), verdicts


def _source(scene: shapes.Scene, seed: int = 0) -> np.ndarray:
    return shapes.render(scene, rng=np.random.default_rng(seed), min_fraction=0.6, max_fraction=0.7)


def test_img2img_keeps_the_source_at_low_strength(triton) -> None:
    source = _source(shapes.Scene("green", "triangle", "black"))
    low = _gen(triton, "a green triangle on a black background", image=source, strength=0.3, seed=5, steps=25)
    diff = np.abs(low.images[0].astype(int) - source.astype(int)).mean()
    assert diff < 12, diff
    recoloured = _gen(triton, "a purple circle on a white background", image=source, strength=1.0, seed=5)
    verdict = shapes.judge(recoloured.images[0])
    assert verdict.background == "white" and verdict.colour == "purple"


def test_inpainting_repaints_only_the_mask(triton) -> None:
    source = _source(shapes.Scene("green", "square", "black"), seed=1)
    object_pixels = np.abs(source.astype(int) - np.array(shapes.PALETTE["black"])).sum(axis=2) > 30
    rows, cols = np.flatnonzero(object_pixels.any(axis=1)), np.flatnonzero(object_pixels.any(axis=0))
    mask = np.zeros((32, 32), np.uint8)
    mask[rows[0] - 2 : rows[-1] + 3, cols[0] - 2 : cols[-1] + 3] = 255
    result = _gen(triton, "a red square on a black background", image=source, mask=mask, seed=9, steps=25)
    image = result.images[0].astype(int)
    outside = mask == 0
    assert np.abs(image[outside] - source.astype(int)[outside]).mean() < 20
    inside = image[mask == 255]
    assert shapes.nearest_colour(np.median(inside[inside.sum(axis=1) > 200], axis=0)) == "red"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"width": 36}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 0}, "steps"),
        ({"steps": 1000}, "steps"),
        ({"num_images": 0}, "num_images"),
        ({"scheduler": "plms"}, "scheduler"),
        ({"strength": 0.5}, "strength"),  # strength without an image
        ({"image": np.zeros((32, 32, 3), np.uint8), "strength": 0.0}, "strength"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "strength": 1.5}, "strength"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "mask": np.zeros((32, 16), np.uint8)}, "mask"),
        ({"mask": np.zeros((32, 32), np.uint8)}, "mask"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_input_is_an_error_naming_the_field_and_serving_goes_on(
    triton, options: dict, field: str
) -> None:
    options = dict(options)
    prompt = options.pop("prompt", RED_CIRCLE)
    with pytest.raises(TritonCallError, match=rf"invalid argument: {field}:"):
        _gen(triton, prompt, **options)
    assert _gen(triton, steps=2).images.shape == (1, 32, 32, 3)


def _unet_batches(triton) -> dict[int, int]:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    stats = client.get_inference_statistics("unet", as_json=True)["model_stats"][0]
    client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_unet_batches_rows_from_different_requests(triton) -> None:
    before = _unet_batches(triton)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: _gen(triton, seed=s, steps=20), range(16)))
    after = _unet_batches(triton)
    grown = {size: after[size] - before.get(size, 0) for size in after if after[size] > before.get(size, 0)}
    # One guided request sends 2 rows; a batch of more than 2 rows mixes requests.
    assert max(grown) > 2, grown


@pytest.mark.parametrize("prompt_set", ["exact", "paraphrases"])
def test_quality_bar_through_triton(triton, prompt_set: str) -> None:
    """The bar of `sfumato demo-model evaluate`, through Triton, on the exact training template
    and on the forms people type (a third of them without a background)."""
    from sfumato.training.evaluate import QUALITY_BAR, exact_prompts, paraphrase_prompts

    prompts = (exact_prompts if prompt_set == "exact" else paraphrase_prompts)(48, seed=0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(
            pool.map(
                lambda ij: _gen(triton, ij[1].text, seed=ij[0], steps=25, guidance_scale=5.0).images[0],
                enumerate(prompts),
            )
        )
    score = shapes.score(np.stack(images), prompts)
    print(
        f"\nTriton, {prompt_set}: background {score.background:.3f} colour {score.colour:.3f} "
        f"shape {score.shape:.3f}"
    )
    assert score.meets(**QUALITY_BAR), score


def test_matches_diffusers_given_the_same_initial_latents(triton, demo_model: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    prompts = [RED_CIRCLE, "a yellow triangle on a blue background"]
    pipe = StableDiffusionPipeline.from_pretrained(str(demo_model))
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(prompts):
        ours = _gen(triton, prompt, seed=40 + i, steps=25, guidance_scale=5.0, scheduler="ddim").images[0]
        latents = initial_noise(np.array([40 + i]), channels=4, height=8, width=8)
        with torch.inference_mode():
            theirs = pipe(
                prompt,
                num_inference_steps=25,
                guidance_scale=5.0,
                latents=torch.from_numpy(latents),
                output_type="np",
            ).images[0]
        theirs = np.clip(np.rint(theirs * 255), 0, 255)
        assert np.abs(ours.astype(float) - theirs).mean() <= 2.0, prompt


def test_generate_command_writes_pngs(triton, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    assert main(["generate", RED_CIRCLE, "--grpc", triton.grpc_url, "-o", str(out), "--seed", "1"]) == 0
    with Image.open(out) as png:
        assert png.size == (32, 32) and png.text["prompt"] == RED_CIRCLE and png.text["seed"] == "1"
    assert main(["generate", RED_CIRCLE, "--grpc", triton.grpc_url, "-o", str(out), "--num-images", "2"]) == 0
    assert (tmp_path / "out-0.png").is_file() and (tmp_path / "out-1.png").is_file()
    assert main(["generate", "", "--grpc", triton.grpc_url, "-o", str(out)]) == 2
