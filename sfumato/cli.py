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
        configs_only=args.configs_only,
    )
    result = export_model_repository(Path(args.src), Path(args.out), options)
    total = result.manifest["timings"].get("total_s")
    print(f"wrote {', '.join(result.models)} to {result.out_dir} in {total} s (manifest: export_manifest.json)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfumato", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ex = sub.add_parser("export", help="export a diffusers Stable Diffusion folder to a Triton model repository")
    ex.add_argument("src", help="diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...)")
    ex.add_argument("--out", default="model_repository", help="Triton model repository (default: %(default)s)")
    ex.add_argument("--target", default="cpu", help="cpu | onnxruntime | tensorrt (default: %(default)s)")
    ex.add_argument("--precision", default="fp32", help="fp32 | fp16 (fp16: GPU targets only)")
    ex.add_argument("--max-batch-size", type=int, default=32, help="Triton max_batch_size, in rows")
    ex.add_argument(
        "--image-size", action="append", metavar="HxW",
        help="image size to serve (repeatable); TensorRT profiles span them; default: the model's own",
    )
    ex.add_argument("--preferred-batch-size", type=int, action="append", metavar="N",
                    help="dynamic batcher preferred size (repeatable; default: powers of two from 4)")
    ex.add_argument("--max-queue-delay-us", type=int, default=2_000, help="dynamic batcher delay")
    ex.add_argument("--max-queue-size", type=int, default=256, help="queued requests before Triton rejects")
    ex.add_argument("--queue-timeout-us", type=int, default=30_000_000, help="queued longer -> rejected")
    ex.add_argument("--instance-count", type=int, default=1, help="model instances per network")
    ex.add_argument("--configs-only", action="store_true", help="write config.pbtxt files only, no weights")
    ex.set_defaults(func=_export)

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
