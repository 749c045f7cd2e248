"""The core's own commands: ``sfumato triton serve`` runs the real Triton Inference Server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _admin_key(args: argparse.Namespace) -> str:
    """``SFUMATO_TRITON_ADMIN_KEY``, else the key in ``--admin-key-file`` (created on first use)."""
    import os

    from sfumato.secret_files import load_or_create_secret

    return os.environ.get("SFUMATO_TRITON_ADMIN_KEY") or load_or_create_secret(Path(args.admin_key_file))


def _triton_serve(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from sfumato.triton_server import TritonServer

    server = TritonServer(
        repository=Path(args.model_repository),
        work_dir=Path(args.work_dir),
        admin_key=_admin_key(args),
        address=args.address,
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
        f"Triton ready: gRPC {args.address}:{args.grpc_port}, HTTP {args.address}:{args.http_port}, "
        f"metrics {args.address}:{args.metrics_port} (admin protocols need the key in "
        f"{'SFUMATO_TRITON_ADMIN_KEY' if 'SFUMATO_TRITON_ADMIN_KEY' in os.environ else args.admin_key_file})",
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


def register(sub: argparse._SubParsersAction) -> None:
    triton = sub.add_parser("triton", help="run the real Triton Inference Server")
    triton_sub = triton.add_subparsers(dest="triton_command", required=True, metavar="ACTION")
    serve = triton_sub.add_parser("serve", help="serve a model repository (every model loaded at start)")
    serve.add_argument("--model-repository", default="model_repository")
    serve.add_argument(
        "--address",
        default="127.0.0.1",
        help="address HTTP, gRPC and metrics listen on (default: loopback only)",
    )
    serve.add_argument(
        "--admin-key-file",
        default="var/secrets/triton-admin-key",
        help="the restricted protocols' key (sfumato-admin-key header), generated there on first use "
        "(mode 0600); SFUMATO_TRITON_ADMIN_KEY overrides it",
    )
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--exit-timeout-secs", type=int, default=30, help="graceful-stop budget")
    serve.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    serve.add_argument("--work-dir", default="var/triton", help="backend directory and server log")
    serve.set_defaults(func=_triton_serve)
