"""The ``sfumato`` command line.

Each subcommand is a thin layer over a library function; every error Sfumato raises on purpose
ends as one line on standard error and its exit code (2 for bad input).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from sfumato.errors import QualityError, SfumatoError

DEMO_MODEL = Path("models/sfumato-shapes")
FIGURES = Path("docs/figures")


def _export(args: argparse.Namespace) -> int:
    from sfumato.export.repository import ExportOptions, export_model_repository, parse_image_size

    options = ExportOptions(
        target=args.target,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        image_sizes=tuple(parse_image_size(s) for s in args.image_size or ()),
        preferred_batch_sizes=tuple(args.preferred_batch_size or ()),
        max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        queue_timeout_us=args.queue_timeout_us,
        instance_count=args.instance_count,
        intra_op_threads=args.intra_op_threads,
        configs_only=args.configs_only,
        pipeline_instances=args.pipeline_instances,
        default_steps=args.default_steps,
        default_guidance=args.default_guidance,
        default_scheduler=args.default_scheduler,
        dynamic_batching=not args.no_dynamic_batching,
    )
    result = export_model_repository(Path(args.src), Path(args.out), options)
    total = result.manifest["timings"].get("total_s")
    print(
        f"wrote {', '.join(result.models)} to {result.out_dir} in {total} s (manifest: export_manifest.json)"
    )
    return 0


def _demo_train(args: argparse.Namespace) -> int:
    from sfumato.training.train import TrainingPlan, train_demo_model

    plan = TrainingPlan(seed=args.seed)
    if args.quick:  # a smoke run of every step, for tests; the result is not a usable model
        plan = TrainingPlan(seed=args.seed, dataset_size=256, vae_steps=4, unet_steps=4, warmup_steps=2)
    report = train_demo_model(Path(args.out), plan=plan, progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 0


def _demo_evaluate(args: argparse.Namespace) -> int:
    from sfumato.grid import save_grid
    from sfumato.training.evaluate import QUALITY_BAR, evaluate_demo_model

    result = evaluate_demo_model(
        Path(args.model), count=args.count, steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    s = result.score
    print(f"{'':<12} {'measured':>9} {'bar':>6}")
    for key, value in (("background", s.background), ("colour", s.colour), ("shape", s.shape)):
        print(f"{key:<12} {value:>9.3f} {QUALITY_BAR[key]:>6.2f}")
    print(f"{s.count} prompts, {args.steps} steps, guidance {args.guidance}, seed {args.seed}")
    if args.grid:
        print(f"samples: {save_grid(result.images, Path(args.grid))}")
    if args.json:
        payload = {**asdict(s), "passed": result.passed, "steps": args.steps, "guidance": args.guidance}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if not result.passed:
        raise QualityError("the model is below the quality bar")
    return 0


def _triton_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from sfumato.triton_server import TritonServer

    server = TritonServer(
        repository=Path(args.model_repository),
        work_dir=Path(args.work_dir),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        exit_timeout_secs=args.exit_timeout_secs,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"starting tritonserver on {args.model_repository} (log: {args.work_dir})", file=sys.stderr)
    server.start(timeout=args.ready_timeout)
    print(
        f"Triton ready: gRPC 127.0.0.1:{args.grpc_port}, HTTP {server.http_url}, "
        f"metrics http://127.0.0.1:{args.metrics_port}/metrics",
        flush=True,
    )
    while not stop.is_set() and server.process is not None and server.process.poll() is None:
        stop.wait(0.5)
    if stop.is_set():
        print("stopping tritonserver (graceful)", file=sys.stderr)
        server.stop()
        return 0
    code = server.process.returncode if server.process else 1
    print(
        f"sfumato: error: tritonserver exited with code {code}: {server.failure_summary()}", file=sys.stderr
    )
    return 1


def _generate(args: argparse.Namespace) -> int:
    from sfumato.clients.png import encode_png, output_paths, read_image
    from sfumato.clients.triton_grpc import generate

    options = {
        "negative_prompt": args.negative_prompt,
        "num_images": args.num_images,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "width": args.width,
        "height": args.height,
        "scheduler": args.scheduler,
        "strength": args.strength,
    }
    image = read_image(Path(args.image)) if args.image else None
    mask = read_image(Path(args.mask), mode="L") if args.mask else None
    result = generate(args.grpc, args.prompt, image=image, mask=mask, timeout_s=args.timeout, **options)
    for path, img, seed in zip(
        output_paths(Path(args.output), len(result.images)), result.images, result.seeds, strict=True
    ):
        text = {"prompt": args.prompt, "seed": str(int(seed))}
        text.update({k: str(v) for k, v in options.items() if v is not None})
        path.write_bytes(encode_png(img, text=text))
        print(f"{path}  seed={int(seed)}")
    return 0


def _settings():  # -> Settings
    from pydantic import ValidationError

    from sfumato.control_plane.settings import get_settings
    from sfumato.errors import UsageError

    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UsageError(f"invalid settings: {problems}") from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sfumato.control_plane import logs, migrate
    from sfumato.control_plane.app import create_app

    settings = _settings()
    logs.configure(args.log_level.upper())
    if not args.no_migrate:
        migrate.upgrade(settings.resolved_database_url)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.triton_timeout_s),
    )
    return 0


def _up(args: argparse.Namespace) -> int:
    """Triton and the control plane together, on embedded defaults (what `make run` starts)."""
    import asyncio
    import signal

    import uvicorn

    from sfumato.control_plane import accounts, logs, migrate
    from sfumato.control_plane.app import create_app
    from sfumato.control_plane.db import create_engine, session_factory
    from sfumato.triton_server import TritonServer

    settings = _settings()
    migrate.upgrade(settings.resolved_database_url)

    async def first_key() -> str | None:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session:
                return await accounts.bootstrap_admin(session=session)
        finally:
            await engine.dispose()

    key = asyncio.run(first_key())
    triton = TritonServer(
        repository=Path(args.model_repository),
        work_dir=settings.data_dir / "triton",
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
    )
    print(f"starting Triton on {args.model_repository} ...", file=sys.stderr, flush=True)
    triton.start(timeout=300)
    settings = settings.model_copy(update={"triton_url": triton.grpc_url})
    base = f"http://{args.host}:{args.port}"
    print(
        f"Triton ready: gRPC {triton.grpc_url}, metrics http://127.0.0.1:{args.triton_metrics_port}/metrics"
    )
    print(f"control plane: {base} (OpenAPI: {base}/docs)")
    if key:
        print("\nadmin API key (shown once; `sfumato admin create-key` makes more):\n")
        print(f"  {key}\n")
        print("try it:\n")
        print(
            f"  curl -s {base}/v1/generations -H 'Authorization: Bearer {key}' "
            "-H 'Prefer: wait=60' -H 'Accept: image/png' -H 'Content-Type: application/json' "
            '-d \'{"prompt": "a red circle on a white background"}\' -o red-circle.png\n',
            flush=True,
        )
    else:
        print(
            "admin key: printed on first start; `sfumato admin create-key --user admin --role admin` "
            "makes a new one",
            flush=True,
        )
    logs.configure(args.log_level.upper())

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal once it has shut
    # down; this handler turns that into SystemExit so that Triton is stopped below.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)
    except SystemExit as exc:
        code = int(exc.code or 0)
        return 0 if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) else code
    finally:
        print("stopping Triton ...", file=sys.stderr, flush=True)
        triton.stop()
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from sfumato.control_plane import logs
    from sfumato.control_plane.services import Services
    from sfumato.control_plane.worker import run_workers

    settings = _settings()
    logs.configure(args.log_level.upper())

    async def main_loop() -> None:
        services = Services.build(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await run_workers(services, count=args.count or max(settings.workers, 1), stop=stop)
        finally:
            await services.close()

    asyncio.run(main_loop())
    return 0


def _create_key(args: argparse.Namespace) -> int:
    import asyncio

    from sfumato.control_plane import accounts
    from sfumato.control_plane.db import create_engine, session_factory

    settings = _settings()

    async def run() -> str:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session:
                user = await accounts.ensure_user(session=session, name=args.user, role=args.role)
                _, plaintext = await accounts.create_key(session=session, user_id=user.id, name=args.name)
                return plaintext
        finally:
            await engine.dispose()

    print(asyncio.run(run()))
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from sfumato.control_plane import migrate

    settings = _settings()
    migrate.upgrade(settings.resolved_database_url, args.revision)
    print(f"database at revision {args.revision}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfumato", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ex = sub.add_parser(
        "export", help="export a diffusers Stable Diffusion folder to a Triton model repository"
    )
    ex.add_argument(
        "src", help="diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...)"
    )
    ex.add_argument(
        "--out", default="model_repository", help="Triton model repository (default: %(default)s)"
    )
    ex.add_argument("--target", default="cpu", help="cpu | onnxruntime | tensorrt (default: %(default)s)")
    ex.add_argument("--precision", default="fp32", help="fp32 | fp16 (fp16: GPU targets only)")
    ex.add_argument("--max-batch-size", type=int, default=32, help="Triton max_batch_size, in rows")
    ex.add_argument(
        "--image-size",
        action="append",
        metavar="HxW",
        help="image size to serve (repeatable); TensorRT profiles span them; default: the model's own",
    )
    ex.add_argument(
        "--preferred-batch-size",
        type=int,
        action="append",
        metavar="N",
        help="dynamic batcher preferred size (repeatable; default: powers of two from 4)",
    )
    ex.add_argument("--max-queue-delay-us", type=int, default=2_000, help="dynamic batcher delay")
    ex.add_argument("--max-queue-size", type=int, default=256, help="queued requests before Triton rejects")
    ex.add_argument("--queue-timeout-us", type=int, default=30_000_000, help="queued longer -> rejected")
    ex.add_argument(
        "--instance-count", type=int, help="instances per network (default: 2 on cpu, 1 on a GPU)"
    )
    ex.add_argument(
        "--intra-op-threads", type=int, default=1, help="cpu: ONNX Runtime threads per instance (0 = all)"
    )
    ex.add_argument(
        "--pipeline-instances",
        type=int,
        default=16,
        help="pipeline model instances = requests in flight at once (default: %(default)s)",
    )
    ex.add_argument("--default-steps", type=int, default=25, help="steps when a request names none")
    ex.add_argument("--default-guidance", type=float, default=7.5, help="guidance when a request names none")
    ex.add_argument("--default-scheduler", help="ddim | euler | euler_a | dpmpp_2m (default: the source's)")
    ex.add_argument(
        "--no-dynamic-batching",
        action="store_true",
        help="leave Triton's dynamic batcher off (only to measure what it brings)",
    )
    ex.add_argument("--configs-only", action="store_true", help="write config.pbtxt files only, no weights")
    ex.set_defaults(func=_export)

    triton = sub.add_parser("triton", help="run the real Triton Inference Server")
    triton_sub = triton.add_subparsers(dest="triton_command", required=True, metavar="ACTION")
    serve = triton_sub.add_parser("serve", help="serve a model repository (every model loaded at start)")
    serve.add_argument("--model-repository", default="model_repository")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--exit-timeout-secs", type=int, default=30, help="graceful-stop budget")
    serve.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    serve.add_argument("--work-dir", default="var/triton", help="backend directory and server log")
    serve.set_defaults(func=_triton_serve)

    gen = sub.add_parser("generate", help="generate images by calling Triton's pipeline model over gRPC")
    gen.add_argument("prompt")
    gen.add_argument("--grpc", default="localhost:8001", metavar="HOST:PORT", help="Triton gRPC address")
    gen.add_argument("-o", "--output", default="out.png", help="PNG path; several images: out-0.png, ...")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--num-images", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--scheduler", help="ddim | euler | euler_a | dpmpp_2m")
    gen.add_argument("--image", help="init image (img2img / inpainting), PNG or JPEG")
    gen.add_argument("--mask", help="inpainting mask, white = repaint")
    gen.add_argument("--strength", type=float, help="img2img / inpainting strength in (0, 1]")
    gen.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up")
    gen.set_defaults(func=_generate)

    sv = sub.add_parser("serve", help="run the control plane (REST API) with in-process workers")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--no-migrate", action="store_true", help="do not upgrade the database schema first")
    sv.add_argument("--log-level", default="info")
    sv.set_defaults(func=_serve)

    upp = sub.add_parser("up", help="Triton and the control plane together (what `make run` starts)")
    upp.add_argument("--model-repository", default="model_repository")
    upp.add_argument("--host", default="127.0.0.1")
    upp.add_argument("--port", type=int, default=8080)
    upp.add_argument("--triton-http-port", type=int, default=8000)
    upp.add_argument("--triton-grpc-port", type=int, default=8001)
    upp.add_argument("--triton-metrics-port", type=int, default=8002)
    upp.add_argument("--log-level", default="info")
    upp.set_defaults(func=_up)

    wk = sub.add_parser("worker", help="run generation workers alone (scale out)")
    wk.add_argument("--count", type=int, help="workers in this process (default: SFUMATO_WORKERS)")
    wk.add_argument("--log-level", default="info")
    wk.set_defaults(func=_worker)

    admin = sub.add_parser("admin", help="administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    ck = admin_sub.add_parser("create-key", help="create a user if needed and print a new API key for it")
    ck.add_argument("--user", required=True)
    ck.add_argument("--role", choices=["admin", "member"], default="member")
    ck.add_argument("--name", default="", help="a label for the key")
    ck.set_defaults(func=_create_key)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_sub.add_parser("upgrade", help="run the Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)

    demo = sub.add_parser("demo-model", help="train or evaluate the built-in demo model")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    tr = demo_sub.add_parser("train", help="train the demo model from scratch (about 30 minutes, 2 cores)")
    tr.add_argument("--out", default=str(DEMO_MODEL))
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quick", action="store_true", help="a few steps of each phase (smoke test)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_demo_train)
    ev = demo_sub.add_parser("evaluate", help="judge samples against their prompts (the quality bar)")
    ev.add_argument("--model", default=str(DEMO_MODEL))
    ev.add_argument("--count", type=int, default=48)
    ev.add_argument("--steps", type=int, default=25)
    ev.add_argument("--guidance", type=float, default=5.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--grid", default=str(FIGURES / "demo-model-samples.png"), help="PNG of the samples")
    ev.add_argument("--json", help="also write the scores as JSON here")
    ev.set_defaults(func=_demo_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SfumatoError as exc:
        print(f"sfumato: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
