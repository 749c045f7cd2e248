"""``sfumato export``: a diffusers folder to a Triton model repository."""

from __future__ import annotations

import argparse
from pathlib import Path


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
        stream_instances=args.stream_instances,
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


def register(sub: argparse._SubParsersAction) -> None:
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
    ex.add_argument(
        "--stream-instances",
        type=int,
        help="pipeline_stream (the streaming twin) instances (default: as many as --pipeline-instances)",
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
