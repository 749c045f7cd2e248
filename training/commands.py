"""``sfumato demo-model train|evaluate``: the built-in demo model."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from sfumato.errors import QualityError

DEMO_MODEL = Path("models/sfumato-shapes")
FIGURES = Path("docs/figures")


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
    sets = {"exact": result.exact, "paraphrases": result.paraphrases}
    print(f"{'':<12} {'exact':>9} {'paraphr.':>9} {'bar':>6}")
    for key in ("background", "colour", "shape"):
        values = " ".join(f"{getattr(r.score, key):>9.3f}" for r in sets.values())
        print(f"{key:<12} {values} {QUALITY_BAR[key]:>6.2f}")
    print(
        f"{args.count} prompts per set (exact template; forms people type, a third without a "
        f"background), {args.steps} steps, guidance {args.guidance}, seed {args.seed}"
    )
    if args.grid:
        print(f"samples (exact, then paraphrases): {save_grid(result.images, Path(args.grid))}")
    if args.json:
        payload = {
            **{name: asdict(r.score) | {"passed": r.passed} for name, r in sets.items()},
            "passed": result.passed,
            "steps": args.steps,
            "guidance": args.guidance,
            "bar": QUALITY_BAR,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if not result.passed:
        failing = ", ".join(name for name, r in sets.items() if not r.passed)
        raise QualityError(f"the model is below the quality bar on: {failing}")
    return 0


def _training_run(args: argparse.Namespace) -> int:
    """One training record, end to end (what the training runner's executor starts)."""
    import asyncio

    from sfumato.control_plane import logs
    from sfumato.training.job import run_training

    logs.configure(args.log_level.upper())
    summary = asyncio.run(run_training(args.id))
    print(json.dumps(summary, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    training = sub.add_parser("training", help="fine-tunes (what the training runner starts)")
    training_sub = training.add_subparsers(dest="training_command", required=True, metavar="ACTION")
    run = training_sub.add_parser("run", help="run one training record (SFUMATO_* settings: database, store)")
    run.add_argument("--id", required=True, help="the training's id")
    run.add_argument("--log-level", default="info")
    run.set_defaults(func=_training_run)

    demo = sub.add_parser("demo-model", help="train or evaluate the built-in demo model")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    tr = demo_sub.add_parser("train", help="train the demo model from scratch (about 40 minutes, 2 cores)")
    tr.add_argument("--out", default=str(DEMO_MODEL))
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quick", action="store_true", help="a few steps of each phase (smoke test)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_demo_train)
    ev = demo_sub.add_parser("evaluate", help="judge samples against their prompts (the quality bar)")
    ev.add_argument("--model", default=str(DEMO_MODEL))
    ev.add_argument("--count", type=int, default=48, help="prompts per set")
    ev.add_argument("--steps", type=int, default=25)
    ev.add_argument("--guidance", type=float, default=5.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--grid", default=str(FIGURES / "demo-model-samples.png"), help="PNG of the samples")
    ev.add_argument("--json", help="also write the scores as JSON here")
    ev.set_defaults(func=_demo_evaluate)
