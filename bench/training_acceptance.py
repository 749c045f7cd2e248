"""Acceptance of trainings (issue 10): teach the demo model pink, with LoRA and with a full
fine-tune, through the API; then judge it through Triton.

1. A data set of pink (255, 105, 180) circles, squares and triangles on the palette's
   backgrounds, mixed with ordinary images of the grammar (:func:`sfumato.shapes.
   make_finetune_dataset`), zipped and uploaded with ``POST /v1/datasets``.
2. Two trainings, ``method: lora`` and ``method: full``, through ``POST /v1/trainings``, run one
   after the other by the control plane's training runner (a local training process), followed
   with ``GET /v1/trainings/{id}`` (steps, loss, steps/s, wall time).
3. While the LoRA training runs: generation latency through Triton (the served base model),
   against the same requests before any training started (side by side, one run).
4. Each result (the training's diffusers pipeline folder in the object store) exported with the
   exporter's parity checks and served by a real Triton; pink prompts ("a pink circle on a white
   background", every shape on every background, and paraphrases) and the old prompts (the demo
   model's exact and paraphrase sets) are generated through Triton and judged
   (:func:`sfumato.shapes.score` with pink added to the palette).

Prints a table; saves ``bench/results/training_acceptance.json`` and ``.png``.

    nice -n 10 .venv/bin/python bench/training_acceptance.py            # the full run
    nice -n 10 .venv/bin/python bench/training_acceptance.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def _export_options():  # -> ExportOptions
    from sfumato.export.repository import ExportOptions

    return ExportOptions(target="cpu", default_guidance=5.0, pipeline_instances=4, stream_instances=1)


def dataset_zip(count: int, seed: int) -> bytes:
    from sfumato.clients.png import encode_png
    from sfumato.shapes import make_finetune_dataset

    images, captions = make_finetune_dataset(count, seed=seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        lines = []
        for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
            archive.writestr(f"images/{index}.png", encode_png(image))
            lines.append(json.dumps({"file_name": f"images/{index}.png", "text": caption}))
        archive.writestr("metadata.jsonl", "\n".join(lines) + "\n")
    return buffer.getvalue()


def pink_prompts(count: int, *, seed: int) -> tuple[list, list]:
    """Canonical pink prompts (every shape on every background, cycled) and paraphrases."""
    from sfumato.shapes import canonical, new_colour_scenes, paraphrase

    scenes = new_colour_scenes("pink")
    rng = np.random.default_rng([seed, 3])
    exact = [canonical(scenes[i % len(scenes)]) for i in range(count)]
    picks = rng.integers(0, len(scenes), size=count)
    para = [paraphrase(scenes[i], rng) for i in picks]
    return exact, para


def generate_all(url: str, prompts: list, *, seed: int, workers: int = 4) -> np.ndarray:
    from sfumato.clients.triton_grpc import generate

    def one(item: tuple[int, object]) -> np.ndarray:
        index, prompt = item
        return generate(url, prompt.text, seed=seed + index, steps=25, guidance_scale=5.0).images[0]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(one, enumerate(prompts))))


def start_triton(repository: Path, work: Path):  # -> TritonServer
    from sfumato.triton_server import TritonServer, free_port

    for attempt in range(3):  # a python-backend stub can die at start on a crowded machine
        server = TritonServer(
            repository=repository,
            work_dir=work / str(attempt),
            admin_key=os.environ.setdefault("SFUMATO_TRITON_ADMIN_KEY", "bench-" + os.urandom(16).hex()),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
        )
        try:
            server.start(timeout=600)
            return server
        except Exception as exc:
            print(f"tritonserver did not start ({exc}); trying again", flush=True)
    raise SystemExit("tritonserver did not start three times")


def judge_sets(url: str, *, count: int, seed: int, old: bool = True) -> dict:
    from sfumato.shapes import NEW_COLOURS, PALETTE, score
    from sfumato.training.evaluate import exact_prompts, paraphrase_prompts

    palette = {**PALETTE, **NEW_COLOURS}
    pink_exact, pink_para = pink_prompts(count, seed=seed)
    sets = {"pink_exact": pink_exact, "pink_paraphrases": pink_para}
    if old:
        sets["old_exact"] = exact_prompts(count, seed=seed)
        sets["old_paraphrases"] = paraphrase_prompts(count, seed=seed)
    out = {}
    for name, prompts in sets.items():
        images = generate_all(url, prompts, seed=seed)
        result = score(images, prompts, palette=palette)
        out[name] = {"background": result.background, "colour": result.colour, "shape": result.shape}
    return out


def latency(url: str, count: int) -> list[float]:
    from sfumato.clients.triton_grpc import generate

    times = []
    for index in range(count):
        started = time.perf_counter()
        generate(url, "a red circle on a white background", seed=index, steps=25, guidance_scale=5.0)
        times.append(time.perf_counter() - started)
    return times


async def run(args: argparse.Namespace) -> dict:
    import httpx

    from sfumato.control_plane import accounts, migrate, storage
    from sfumato.control_plane.app import create_app
    from sfumato.control_plane.models import Job
    from sfumato.control_plane.settings import Settings
    from sfumato.export.repository import export_model_repository

    work = Path(tempfile.mkdtemp(prefix="sfumato-acceptance-"))
    EXPORT_OPTIONS = _export_options()
    settings = Settings(
        env="development",
        data_dir=work / "var",
        workers=0,
        training_runners=args.runners,
        training_threads=args.threads,
        training_nice=0,  # the bench itself runs under nice
        training_checkpoint_every=250,
        heartbeat_s=2.0,
        rate_limit="100000/minute",
        max_requests_in_flight=1000,
        training_base_dir=ROOT / "models" / "sfumato-shapes",
    )
    settings.data_dir.mkdir(parents=True)
    migrate.upgrade(settings.resolved_database_url)
    app = create_app(settings)
    report: dict = {"args": vars(args), "trainings": {}, "accuracy": {}}
    base = None
    if not args.no_base:
        # The base model exported like the fine-tunes below (a few pipeline instances: dozens of
        # python-backend stubs do not start reliably on a crowded 2-core machine).
        await asyncio.to_thread(
            export_model_repository, ROOT / "models" / "sfumato-shapes", work / "repo-base", EXPORT_OPTIONS
        )
        base = start_triton(work / "repo-base", work / "triton-base")
        print(f"base Triton on {base.grpc_url}", flush=True)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600
        )
        services = app.state.services
        async with services.sessions() as session:
            user = await accounts.create_user(session=session, name="bench", role="trainer")
            _, key = await accounts.create_key(session=session, user_id=user.id)
        auth = {"Authorization": f"Bearer {key}"}
        data = dataset_zip(args.images, args.seed)
        started = time.perf_counter()
        response = await client.post(
            "/v1/datasets", headers=auth, files={"file": ("pink.zip", data, "application/zip")}
        )
        response.raise_for_status()
        dataset = response.json()
        report["dataset"] = {
            **dataset,
            "upload_s": round(time.perf_counter() - started, 2),
            "zip_bytes": len(data),
        }
        print(f"data set: {dataset['num_images']} images, {len(data)} bytes", flush=True)

        if base is not None:
            report["accuracy"]["base"] = await asyncio.to_thread(
                judge_sets, base.grpc_url, count=args.count, seed=args.seed, old=False
            )
            idle = await asyncio.to_thread(latency, base.grpc_url, args.latency_requests)

        bodies = {
            "lora": {
                "method": "lora",
                "steps": args.lora_steps,
                "learning_rate": args.lora_lr,
                "rank": args.rank,
            },
            "full": {"method": "full", "steps": args.full_steps, "learning_rate": args.full_lr},
        }
        ids = {}
        for method in args.methods:
            body = {
                "dataset_id": dataset["id"],
                "batch_size": args.batch,
                "seed": args.seed,
                "validation_prompts": [
                    "a pink circle on a white background",
                    "a pink triangle on a blue background",
                ],
                **bodies[method],
            }
            response = await client.post("/v1/trainings", headers=auth, json=body)
            response.raise_for_status()
            ids[method] = response.json()["id"]

        async def read(training_id: str) -> dict:
            r = await client.get(f"/v1/trainings/{training_id}", headers=auth)
            r.raise_for_status()
            return r.json()

        # Latency while the first training runs (once it makes steps).
        first = ids[args.methods[0]]
        while base is not None and (await read(first))["progress"]["step"] < 5:
            await asyncio.sleep(1)
        if base is not None:
            busy = await asyncio.to_thread(latency, base.grpc_url, args.latency_requests)
            report["latency"] = {
                "idle_median_s": statistics.median(idle),
                "training_median_s": statistics.median(busy),
                "ratio": statistics.median(busy) / statistics.median(idle),
                "idle_s": idle,
                "training_s": busy,
            }
            print(
                f"latency idle {statistics.median(idle):.2f} s, "
                f"during training {statistics.median(busy):.2f} s"
            )
            base.stop()

        for method, training_id in ids.items():
            while (body := await read(training_id))["status"] not in ("succeeded", "failed", "canceled"):
                await asyncio.sleep(5)
                print(
                    f"  {method}: step {body['progress']['step']}/{body['progress']['total']} "
                    f"loss {body['progress']['loss']}",
                    flush=True,
                )
            async with services.sessions() as session:
                job = await session.get(Job, training_id)
                details = dict(job.details or {})
            if body["status"] != "succeeded":
                raise SystemExit(f"{method} training {body['status']}: {body['error']}")
            wall = time.mktime(time.strptime(body["finished_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(
                time.strptime(body["started_at"][:19], "%Y-%m-%dT%H:%M:%S")
            )
            report["trainings"][method] = {
                "id": training_id,
                "steps": body["progress"]["total"],
                "train_s": details.get("elapsed_s"),
                "steps_per_s": details.get("steps_per_s"),
                "wall_s": wall,
                "final_loss": details.get("loss"),
                "history": details.get("history"),
                "output": body["output"],
            }
            print(f"{method}: {wall:.0f} s wall, {details.get('steps_per_s')} steps/s", flush=True)
            pipeline = work / f"pipeline-{method}"
            await storage.get_tree(services.store, f"trainings/{training_id}/pipeline", pipeline)
            repo = work / f"repo-{method}"
            export_started = time.perf_counter()
            await asyncio.to_thread(
                export_model_repository,
                pipeline,
                repo,
                EXPORT_OPTIONS,
            )
            report["trainings"][method]["export_s"] = round(time.perf_counter() - export_started, 1)
            server = start_triton(repo, work / f"triton-{method}")
            try:
                report["accuracy"][method] = await asyncio.to_thread(
                    judge_sets, server.grpc_url, count=args.count, seed=args.seed
                )
            finally:
                server.stop()
        await client.aclose()
    return report


def save(report: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, t in report["trainings"].items():
        history = t.get("history") or []
        if history:
            left.plot(
                [h[0] for h in history],
                [h[1] for h in history],
                label=f"{method} ({t['steps_per_s']} steps/s)",
            )
    left.set_xlabel("step")
    left.set_ylabel("loss (mean of 20 steps)")
    left.set_title("training loss")
    left.legend()
    sets = ["pink_exact", "pink_paraphrases", "old_exact", "old_paraphrases"]
    models = list(report["accuracy"])
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        values = [report["accuracy"][model].get(s, {}).get("colour", np.nan) for s in sets]
        shapes_ok = [report["accuracy"][model].get(s, {}).get("shape", np.nan) for s in sets]
        x = np.arange(len(sets)) + i * width
        right.bar(x, values, width, label=f"{model} colour")
        right.scatter(x, shapes_ok, marker="_", s=200, color="black")
    right.set_xticks(np.arange(len(sets)) + width * (len(models) - 1) / 2, sets, rotation=15)
    right.set_ylim(0, 1.05)
    right.set_title("through Triton: colour (bars), shape (ticks)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


def table(report: dict) -> None:
    print(f"\n{'model':<6} {'set':<18} {'background':>10} {'colour':>7} {'shape':>6}")
    for model, sets in report["accuracy"].items():
        for name, s in sets.items():
            print(f"{model:<6} {name:<18} {s['background']:>10.3f} {s['colour']:>7.3f} {s['shape']:>6.3f}")
    print(f"\n{'method':<6} {'steps':>6} {'train s':>8} {'wall s':>7} {'steps/s':>8} {'export s':>9}")
    for method, t in report["trainings"].items():
        print(
            f"{method:<6} {t['steps']:>6} {t['train_s']:>8} {t['wall_s']:>7.0f} {t['steps_per_s']:>8} "
            f"{t.get('export_s', '-'):>9}"
        )
    lat = report.get("latency")
    if lat:
        print(
            f"\ngeneration latency (25 steps, sequential): idle {lat['idle_median_s']:.2f} s, "
            f"during a training {lat['training_median_s']:.2f} s ({lat['ratio']:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--lora-steps", type=int, default=150)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--full-steps", type=int, default=150)
    parser.add_argument("--full-lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runners", type=int, default=2, help="trainings at once (2: both together)")
    parser.add_argument("--count", type=int, default=24, help="prompts per judged set")
    parser.add_argument("--latency-requests", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny everything")
    parser.add_argument(
        "--no-base", action="store_true", help="skip the base model's scores and the latency measurement"
    )
    parser.add_argument("--name", default="training_acceptance")
    args = parser.parse_args()
    if args.quick:
        args.images, args.lora_steps, args.full_steps, args.count, args.latency_requests = 64, 20, 20, 4, 2
        args.name = args.name + "_quick"
    report = asyncio.run(run(args))
    save(report, args.name)
    table(report)
    print(f"\nsaved {RESULTS / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
