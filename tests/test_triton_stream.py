"""``pipeline_stream``, the decoupled twin of ``pipeline``, on a real tritonserver over streaming
gRPC: per-step progress, previews on request, the same images as ``pipeline``, cancellation,
bad input on the stream, a missing prompt on both models, UNet batches shared by both models,
the limits in Triton's model config, and ``sfumato generate``'s progress bar."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio
from PIL import Image
from tritonclient.utils import InferenceServerException

from sfumato import shapes
from sfumato.cli import main
from sfumato.clients.triton_grpc import (
    Generation,
    InvalidArgumentError,
    Progress,
    astream_generate,
    generate,
    stream_generate,
    triton_error,
)
from sfumato.serving import contract
from sfumato.triton_server import ADMIN_KEY_GRPC_METADATA

RED_CIRCLE = "a red circle on a white background"


def _stream(triton, prompt: str = RED_CIRCLE, **options) -> tuple[list[Progress], Generation]:
    events = list(stream_generate(triton.grpc_url, prompt, **options))
    *steps, result = events
    assert isinstance(result, Generation) and all(isinstance(e, Progress) for e in steps), events
    return steps, result


def _source() -> np.ndarray:
    scene = shapes.Scene("green", "square", "black")
    return shapes.render(scene, rng=np.random.default_rng(1), min_fraction=0.6, max_fraction=0.7)


@pytest.mark.parametrize(
    ("options", "total"),
    [
        ({"steps": 12, "seed": 5, "num_images": 2}, 12),
        ({"steps": 9, "seed": 6, "scheduler": "euler_a", "guidance_scale": 1.0}, 9),
        ({"steps": 10, "seed": 7, "scheduler": "dpmpp_2m", "image": _source(), "strength": 0.5}, 5),
        ({"steps": 8, "seed": 8, "image": _source(), "mask": np.full((32, 32), 255, np.uint8)}, 8),
    ],
    ids=["txt2img", "euler_a-unguided", "img2img", "inpaint"],
)
def test_one_progress_per_step_then_the_same_images_as_pipeline(triton, options: dict, total: int) -> None:
    steps, result = _stream(triton, **options)
    assert [(p.step, p.total) for p in steps] == [(i, total) for i in range(1, total + 1)]
    assert all(p.preview is None for p in steps), "no previews unless asked"
    plain = generate(triton.grpc_url, RED_CIRCLE, **options)
    assert result.images.tobytes() == plain.images.tobytes()
    assert result.seeds.tolist() == plain.seeds.tolist()
    assert result.model_version == plain.model_version == "1"


def test_previews_every_k_steps_when_asked_and_they_change_nothing(triton) -> None:
    request = {"steps": 25, "seed": 21, "num_images": 2, "guidance_scale": 5.0}
    steps, result = _stream(triton, preview_every=10, **request)
    previews = {p.step: p.preview for p in steps if p.preview is not None}
    assert sorted(previews) == [10, 20]  # every 10th step but the last, which the images follow
    for preview in previews.values():
        assert preview.dtype == np.uint8 and preview.shape == (2, 32, 32, 3)
    assert result.images.tobytes() == _stream(triton, **request)[1].images.tobytes()
    # A preview is the image as it stands: by step 20 of 25 it already shows the prompt.
    for preview, final in zip(previews[20], result.images, strict=True):
        verdict = shapes.judge(preview)
        assert (verdict.background, verdict.colour) == ("white", "red"), verdict
        assert np.abs(preview.astype(int) - final.astype(int)).mean() < 30
    # k larger than the steps, or 0: none.
    assert all(p.preview is None for p in _stream(triton, steps=4, preview_every=4)[0])
    assert all(p.preview is None for p in _stream(triton, steps=4, preview_every=0)[0])


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"width": 36}, "width"),
        ({"width": 72}, "width"),
        ({"steps": 0}, "steps"),
        ({"scheduler": "plms"}, "scheduler"),
        ({"strength": 0.5}, "strength"),
        ({"preview_every": -1}, "preview_every"),
        ({"mask": np.zeros((32, 32), np.uint8)}, "mask"),
        ({"prompt": "  "}, "prompt"),
    ],
)
def test_bad_input_is_an_error_on_the_stream_naming_the_field(triton, options: dict, field: str) -> None:
    options = dict(options)
    prompt = options.pop("prompt", RED_CIRCLE)
    with pytest.raises(InvalidArgumentError, match=rf"invalid argument: {field}:"):
        list(stream_generate(triton.grpc_url, prompt, **options))
    assert _stream(triton, steps=2)[1].images.shape == (1, 32, 32, 3)


def _raw_input(name: str, value, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else np.int32))
    return tensor


def test_a_missing_prompt_is_invalid_argument_on_both_models(triton) -> None:
    """Issue 8: straight to Triton without ``prompt`` used to be INTERNAL with a TypeError."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(contract.MODEL, [_raw_input("steps", 3, "INT32")])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert caught.value.message() == "invalid argument: prompt: is required"

        responses: list = []
        client.start_stream(callback=lambda result, error: responses.append((result, error)))
        client.async_stream_infer(contract.STREAM_MODEL, [_raw_input("steps", 3, "INT32")])
        client.stop_stream()  # waits for the request's final response
        ((result, error),) = responses
        assert result is None and error.message() == "invalid argument: prompt: is required"
        assert isinstance(triton_error(error), InvalidArgumentError)
    finally:
        client.close()


def _log_line(triton, request_id: str, *, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in triton.log_text().splitlines():
            if f"request '{request_id}'" in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"Triton logged nothing about {request_id} in {timeout:.0f} s")


def test_cancelling_the_stream_stops_the_loop_and_others_go_on(triton) -> None:
    longest = {"steps": 150, "num_images": 8, "width": 64, "height": 64, "guidance_scale": 5.0}
    others = [{"seed": s, "steps": 10, "num_images": 1 + s % 2} for s in range(4)]
    expected = [generate(triton.grpc_url, RED_CIRCLE, **o).images for o in others]
    with ThreadPoolExecutor(max_workers=4) as pool:
        plain = [
            pool.submit(lambda o: generate(triton.grpc_url, RED_CIRCLE, **o).images, o) for o in others[:2]
        ]
        streamed = [pool.submit(lambda o: _stream(triton, **o)[1].images, o) for o in others[2:]]
        events = stream_generate(triton.grpc_url, RED_CIRCLE, request_id="cancel-me", **longest)
        first = next(events)
        assert isinstance(first, Progress) and first.total == 150
        events.close()  # the client cancels the stream
        line = _log_line(triton, "cancel-me")
        for future, images in zip(plain + streamed, expected, strict=True):
            assert future.result().tobytes() == images.tobytes()
    assert "cancelled by the client after step" in line, line
    stopped_at = int(line.split("after step ")[1].split(" of ")[0])
    print(f"\ncancelled stream stopped after step {stopped_at} of 150")
    assert stopped_at < 150, line


async def test_async_stream_yields_typed_events_and_stops_when_its_task_is_cancelled(triton) -> None:
    client = aio.InferenceServerClient(triton.grpc_url)
    try:
        events = []
        async with contextlib.aclosing(
            astream_generate(client, RED_CIRCLE, steps=6, seed=3, preview_every=3, request_id="aio-ok")
        ) as stream:
            async for event in stream:
                events.append(event)
        *steps, result = events
        assert [(p.step, p.preview is not None) for p in steps] == [(i, i == 3) for i in range(1, 7)]
        assert (
            result.images.tobytes() == generate(triton.grpc_url, RED_CIRCLE, steps=6, seed=3).images.tobytes()
        )
        assert result.model_version == "1"

        with pytest.raises(InvalidArgumentError, match="invalid argument: steps:"):
            async with contextlib.aclosing(astream_generate(client, RED_CIRCLE, steps=0)) as stream:
                [event async for event in stream]

        first_step = asyncio.Event()

        async def read() -> None:
            async with contextlib.aclosing(
                astream_generate(
                    client, RED_CIRCLE, steps=150, num_images=8, width=64, height=64, request_id="aio-cancel"
                )
            ) as stream:
                async for _ in stream:
                    first_step.set()

        task = asyncio.create_task(read())
        await asyncio.wait_for(first_step.wait(), timeout=120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        line = await asyncio.to_thread(_log_line, triton, "aio-cancel")
        assert int(line.split("after step ")[1].split(" of ")[0]) < 150, line
    finally:
        await client.close()


async def test_streams_read_to_their_end_leave_pipeline_stream_free_to_unload(triton) -> None:
    """Concurrent streams queue on a decoupled pipeline's instance; once each has its images the
    model unloads (and so Triton stops) at once. A client that cancelled each stream after its
    final response left the model live for good in Triton 2.51: the unload never finished and
    every stop waited out --exit-timeout-secs. Run on a copy of ``pipeline_stream`` of its own
    (``stream_probe``), which no other test's streams touch."""
    admin = {ADMIN_KEY_GRPC_METADATA: triton.admin_key}
    probe = triton.repository / "stream_probe"
    shutil.copytree(triton.repository / contract.STREAM_MODEL, probe)
    config = probe / "config.pbtxt"
    text = config.read_text().replace(f'name: "{contract.STREAM_MODEL}"', 'name: "stream_probe"', 1)
    config.write_text(re.sub(r"count: \d+", "count: 1", text, count=1))  # one instance: streams queue
    grpc_client = grpcclient.InferenceServerClient(triton.grpc_url)
    client = aio.InferenceServerClient(triton.grpc_url)

    async def one(seed: int) -> Generation:
        async with contextlib.aclosing(
            astream_generate(client, RED_CIRCLE, steps=2, seed=seed, model="stream_probe")
        ) as stream:
            return [event async for event in stream][-1]

    def state() -> str:
        index = grpc_client.get_model_repository_index(headers=admin, as_json=True)["models"]
        versions = [m for m in index if m["name"] == "stream_probe" and m.get("version") == "1"]
        return versions[0].get("state", "") if versions else "UNAVAILABLE"

    try:
        await asyncio.to_thread(grpc_client.load_model, "stream_probe", headers=admin)
        for _ in range(5):
            results = await asyncio.gather(*(one(seed) for seed in range(4)))
            assert all(isinstance(r, Generation) for r in results)
        await asyncio.to_thread(grpc_client.unload_model, "stream_probe", headers=admin)
        deadline = time.monotonic() + 60  # unloading its one stub takes well under a second when idle
        while (current := await asyncio.to_thread(state)) != "UNAVAILABLE":
            assert time.monotonic() < deadline, f"stream_probe still {current} 60 s after its unload"
            await asyncio.sleep(0.2)
    finally:
        await client.close()
        grpc_client.close()
        shutil.rmtree(probe)


def _unet_batches(triton) -> dict[int, int]:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        stats = client.get_inference_statistics("unet", as_json=True)["model_stats"][0]
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_unet_batches_mix_rows_of_pipeline_and_pipeline_stream_requests(triton) -> None:
    """Three ``pipeline`` requests of 1 UNet row each (unguided) and three ``pipeline_stream``
    requests of 4 rows each (guided, 2 images): a batch of p + 4q rows with p in 1..3 and q >= 1,
    i.e. a size that is not a multiple of 4 and above 4, holds rows of both models."""
    plain = {"guidance_scale": 1.0, "num_images": 1, "steps": 30}
    streamed = {"guidance_scale": 5.0, "num_images": 2, "steps": 30}
    mixed: dict[int, int] = {}
    rounds = 0
    while not mixed and rounds < 5:  # a condition to wait for, bounded; one round almost always does
        rounds += 1
        before = _unet_batches(triton)
        with ThreadPoolExecutor(max_workers=6) as pool:
            jobs = [pool.submit(generate, triton.grpc_url, RED_CIRCLE, seed=s, **plain) for s in range(3)]
            jobs += [pool.submit(_stream, triton, seed=s, **streamed) for s in range(3)]
            for job in jobs:
                job.result()
        after = _unet_batches(triton)
        grown = {
            size: after[size] - before.get(size, 0) for size in after if after[size] > before.get(size, 0)
        }
        mixed = {size: n for size, n in grown.items() if size > 4 and size % 4}
    print(f"\nUNet batches (rows: count) in round {rounds}: {grown}; mixing both models: {mixed}")
    assert mixed, f"no UNet batch mixed the two models' rows in {rounds} rounds: {grown}"


def test_limits_and_defaults_from_tritons_model_config_api(triton) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        served = {
            name: contract.model_limits(
                client.get_model_config(
                    name, as_json=True, headers={ADMIN_KEY_GRPC_METADATA: triton.admin_key}
                )
            )
            for name in (contract.MODEL, contract.STREAM_MODEL)
        }
    finally:
        client.close()
    assert served[contract.MODEL] == served[contract.STREAM_MODEL]
    limits, defaults = served[contract.MODEL].limits, served[contract.MODEL].defaults
    assert (limits.min_size, limits.max_size, limits.max_steps) == (16, 64, 150)
    assert (defaults.width, defaults.steps, defaults.guidance_scale) == (32, 25, 5.0)
    # What the config publishes is what the model enforces.
    for size in (limits.min_size - 8, limits.max_size + 8):
        with pytest.raises(InvalidArgumentError, match=rf"width: {size} is outside"):
            generate(triton.grpc_url, RED_CIRCLE, width=size, steps=1)
    assert generate(triton.grpc_url, RED_CIRCLE, width=limits.max_size, steps=1).images.shape[2] == 64


def test_generate_command_shows_a_progress_bar_from_the_stream(triton, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.png"
    args = ["generate", RED_CIRCLE, "--grpc", triton.grpc_url, "-o", str(out), "--seed", "4", "--steps", "7"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "denoising" in err and "7/7" in err, err
    streamed = out.read_bytes()
    assert main([*args, "--no-progress"]) == 0
    assert "denoising" not in capsys.readouterr().err
    assert out.read_bytes() == streamed  # same pixels and the same parameters in the PNG
    with Image.open(out) as png:
        assert png.text["seed"] == "4" and png.text["steps"] == "7"
    assert main(["generate", RED_CIRCLE, "--grpc", triton.grpc_url, "-o", str(out), "--width", "36"]) == 2
    assert "width: 36 is not a multiple of 8" in capsys.readouterr().err


def _readme_section() -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return text.split("## Calling Triton directly")[1].split("\n## ")[0]


def test_readme_input_table_is_the_contract() -> None:
    rows = [line for line in _readme_section().splitlines() if line.startswith("| `")]
    table = [tuple(cell.strip().strip("`") for cell in row.split("|")[1:4]) for row in rows]
    inputs = [r for r in table if r[1] in {"BYTES", "INT32", "INT64", "FP32", "UINT8"}]
    expected = [
        (
            f.name,
            f.datatype,
            "["
            + ", ".join({0: "H", 1: "W"}.get(i, str(d)) if d == -1 else str(d) for i, d in enumerate(f.shape))
            + "]",
        )
        for f in contract.FIELDS
    ]
    assert inputs == expected


async def test_a_triton_that_is_down_is_a_transient_error_on_both_stream_apis() -> None:
    from sfumato.clients.triton_grpc import TritonUnavailableError
    from sfumato.triton_server import free_port

    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TritonUnavailableError) as caught:
        await asyncio.to_thread(lambda: list(stream_generate(url, RED_CIRCLE, timeout_s=30)))
    assert caught.value.transient and caught.value.code == "UNAVAILABLE"
    client = aio.InferenceServerClient(url)
    try:
        with pytest.raises(TritonUnavailableError):
            async with contextlib.aclosing(astream_generate(client, RED_CIRCLE, timeout_s=30)) as stream:
                [event async for event in stream]
    finally:
        await client.close()
