"""``sfumato generate``: call Triton's pipeline directly over gRPC.

By default the streaming twin ``pipeline_stream``, with a progress bar (tqdm, on standard
error) from its per-step responses; ``--no-progress`` calls the plain ``pipeline`` model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _stream_with_progress(url: str, prompt: str, *, api_key: str | None, **options: Any):  # -> Generation
    """``pipeline_stream`` with a progress bar; Ctrl-C cancels the request in Triton."""
    from tqdm import tqdm

    from sfumato.clients.triton_grpc import Progress, auth_headers, stream_generate

    result, bar = None, None
    try:
        for event in stream_generate(url, prompt, headers=auth_headers(api_key), **options):
            if isinstance(event, Progress):
                if bar is None:  # opened once the total is known
                    bar = tqdm(total=event.total, desc="denoising", unit="step", file=sys.stderr)
                bar.update(event.step - bar.n)
            else:
                result = event
    finally:
        if bar is not None:
            bar.close()
    return result


def _generate(args: argparse.Namespace) -> int:
    import os

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
    api_key = args.key or os.environ.get("SFUMATO_API_KEY")
    call = generate if args.no_progress else _stream_with_progress
    result = call(
        args.grpc, args.prompt, image=image, mask=mask, timeout_s=args.timeout, api_key=api_key, **options
    )
    for path, img, seed in zip(
        output_paths(Path(args.output), len(result.images)), result.images, result.seeds, strict=True
    ):
        text = {"prompt": args.prompt, "seed": str(int(seed))}
        text.update({k: str(v) for k, v in options.items() if v is not None})
        path.write_bytes(encode_png(img, text=text))
        print(f"{path}  seed={int(seed)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate", help="generate images by calling Triton's pipeline over gRPC, with a progress bar"
    )
    gen.add_argument("prompt")
    gen.add_argument(
        "--grpc", default="localhost:8003", metavar="HOST:PORT", help="the gRPC edge (or Triton) address"
    )
    gen.add_argument("--key", help="API key for the gRPC edge (default: SFUMATO_API_KEY)")
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
    gen.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one call to the plain pipeline model instead of the pipeline_stream stream",
    )
    gen.set_defaults(func=_generate)
