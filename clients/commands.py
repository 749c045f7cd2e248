"""``sfumato generate``: through the REST API (``--api URL``, the Python SDK) or by calling
Triton's pipeline directly over gRPC (``--grpc``, the default).

gRPC: by default the streaming twin ``pipeline_stream``, with a progress bar (tqdm, on standard
error) from its per-step responses; ``--no-progress`` calls the plain ``pipeline`` model.
REST: one generation job (``sfumato.clients.Client.generate``), a progress bar from its
progress, the server's PNGs written as they are (their text chunks carry the parameters).
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


def _generate_rest(args: argparse.Namespace, options: dict[str, Any], api_key: str | None) -> int:
    """``--api URL``: the job through the REST API, with a progress bar; Ctrl-C cancels it."""
    from tqdm import tqdm

    from sfumato.clients.png import output_paths
    from sfumato.clients.rest import FINAL_STATUSES, Client, GenerationError, Progress

    bar = None if args.no_progress else tqdm(total=100, desc="generating", unit="%", file=sys.stderr)

    def progress(event: Progress) -> None:
        if bar is not None:
            fraction = event.progress if not event.total else (event.step or 0) / event.total
            done = round(100 * fraction)
            bar.set_postfix_str(event.status)
            bar.update(max(0, done - bar.n))

    with Client(args.api, api_key=api_key) as client:
        try:
            generation = client.submit(
                args.prompt,
                image=args.image,
                mask=args.mask,
                wait=0 if bar is not None else min(args.timeout, 60),
                **options,
            )
            try:
                if bar is not None or generation.status not in FINAL_STATUSES:
                    generation = client.wait(generation.id, timeout=args.timeout, on_progress=progress)
            except KeyboardInterrupt:
                client.cancel(generation.id)
                raise
        finally:
            if bar is not None:
                bar.close()
        if generation.status != "succeeded":
            raise GenerationError(
                f"generation {generation.id} {generation.status}: {generation.error or ''}".rstrip(": "),
                generation=generation,
            )
        paths = output_paths(Path(args.output), len(generation.images))
        for path, image in zip(paths, generation.images, strict=True):
            path.write_bytes(client.image_bytes(generation, image.index))
            print(f"{path}  seed={image.seed}")
    return 0


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
    api_key = args.key or os.environ.get("SFUMATO_API_KEY")
    if args.api:
        return _generate_rest(args, options, api_key)
    image = read_image(Path(args.image)) if args.image else None
    mask = read_image(Path(args.mask), mode="L") if args.mask else None
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
        "generate",
        help="generate images through the REST API (--api URL) or Triton's pipeline over gRPC, "
        "with a progress bar",
    )
    gen.add_argument("prompt")
    where = gen.add_mutually_exclusive_group()
    where.add_argument(
        "--api", metavar="URL", help="the REST API (e.g. http://127.0.0.1:8080): one generation job"
    )
    where.add_argument(
        "--grpc",
        default="localhost:8003",
        metavar="HOST:PORT",
        help="the gRPC edge (or Triton) address (the default mode, without --api)",
    )
    gen.add_argument("--key", help="API key for the REST API or the gRPC edge (default: SFUMATO_API_KEY)")
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
        help="no progress bar: gRPC: one call to the plain pipeline model instead of the "
        "pipeline_stream stream; REST: one submission that waits (Prefer: wait)",
    )
    gen.set_defaults(func=_generate)
