"""The control plane's commands: ``serve``, ``up``, ``edge``, ``worker``, ``admin``, ``db``, ``storage``,
``recommend``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
    """Triton, the gRPC edge and the control plane together, on embedded defaults (what `make run`
    starts). Triton and the edge are supervised (restarted when they exit) and die with this
    process, also when it is killed with SIGKILL (:mod:`sfumato.process_guard`)."""
    import asyncio
    import importlib.util
    import signal

    import uvicorn

    from sfumato.control_plane import accounts, logs, migrate
    from sfumato.control_plane.app import create_app
    from sfumato.control_plane.db import create_engine, session_factory
    from sfumato.control_plane.edge_proxy import EdgeProxy
    from sfumato.control_plane.metrics import Metrics
    from sfumato.supervisor import Supervisor
    from sfumato.triton_server import TritonServer, connect_host

    settings = _settings()
    migrate.upgrade(settings.resolved_database_url)
    if settings.training_runners == 0 and importlib.util.find_spec("torch") is not None:
        settings = settings.model_copy(update={"training_runners": 1})  # PyTorch here: trainings run here

    async def first_key() -> str | None:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session:
                return await accounts.bootstrap_admin(session=session)
        finally:
            await engine.dispose()

    key = asyncio.run(first_key())
    logs.configure(args.log_level.upper())

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal once it has shut
    # down; this handler turns that (or a signal while Triton starts) into SystemExit, so that
    # the edge and Triton are stopped below.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit)

    metrics = Metrics()
    triton = TritonServer(
        repository=Path(args.model_repository),
        work_dir=settings.data_dir / "triton",
        admin_key=settings.triton_restricted_key(),
        address=args.address,
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
    )
    triton_supervisor = Supervisor(
        triton,
        name="tritonserver",
        on_up=lambda up: metrics.triton_up.set(1 if up else 0),
        on_restart=metrics.triton_restarts.inc,
    )
    base = f"http://{args.host}:{args.port}"
    edge_supervisor = None
    if args.edge_port:
        edge = EdgeProxy(
            work_dir=settings.data_dir / "edge",
            api=f"http://{connect_host(args.host)}:{args.port}",
            triton=triton.grpc_url,
            edge_key=settings.edge_secret(),
            host=args.edge_host,
            port=args.edge_port,
            max_body_bytes=settings.max_body_bytes,
            tls_cert=Path(args.edge_tls_cert) if args.edge_tls_cert else None,
            tls_key=Path(args.edge_tls_key) if args.edge_tls_key else None,
        )
        edge_supervisor = Supervisor(edge, name="edge (caddy)", ready_timeout_s=30)
    print(f"starting Triton on {args.model_repository} ...", file=sys.stderr, flush=True)
    try:
        triton_supervisor.start()
        if edge_supervisor is not None:
            edge_supervisor.start()
        settings = settings.model_copy(update={"triton_url": triton.grpc_url})
        if settings.model_repository is None:  # the registry registers what this Triton serves
            settings = settings.model_copy(update={"model_repository": Path(args.model_repository)})
        if "SFUMATO_TEXT_TOKENIZER" not in os.environ:  # the served pipeline's own tokenizer
            tokenizer = Path(args.model_repository) / "pipeline" / "1" / "assets" / "tokenizer.json"
            settings = settings.model_copy(update={"text_tokenizer": tokenizer})
        print(f"Triton ready: gRPC {triton.grpc_url}, metrics {triton.metrics_url} (supervised)")
        if edge_supervisor is not None:
            scheme = "TLS" if args.edge_tls_cert else "h2c"
            print(f"gRPC edge: {args.edge_host}:{args.edge_port} ({scheme}; API key in `authorization`)")
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
        uvicorn.run(create_app(settings, metrics=metrics), host=args.host, port=args.port, log_config=None)
    except SystemExit as exc:
        code = int(exc.code or 0)
        return 0 if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) else code
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the graceful stop short
        print("stopping the edge and Triton ...", file=sys.stderr, flush=True)
        if edge_supervisor is not None:
            edge_supervisor.stop()
        triton_supervisor.stop()
    return 0


def _edge(args: argparse.Namespace) -> int:
    """The gRPC edge alone, in front of a Triton and a control plane that run elsewhere."""
    import signal
    import threading

    from sfumato.control_plane import logs
    from sfumato.control_plane.edge_proxy import EdgeProxy
    from sfumato.supervisor import Supervisor

    settings = _settings()
    logs.configure(args.log_level.upper())
    edge = EdgeProxy(
        work_dir=settings.data_dir / "edge",
        api=args.api,
        triton=args.triton,
        edge_key=settings.edge_secret(),
        host=args.host,
        port=args.port,
        max_body_bytes=settings.max_body_bytes,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    supervisor = Supervisor(edge, name="edge (caddy)", ready_timeout_s=30)
    supervisor.start()
    print(f"gRPC edge on {args.host}:{args.port} -> Triton {args.triton}, asking {args.api}", flush=True)
    try:
        stop.wait()
    finally:
        supervisor.stop()
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
            await services.start()
            if args.queue == "trainings":
                from sfumato.control_plane.training_runner import run_training_runners

                # One training at a time per runner; --count runners in this process.
                await run_training_runners(services, count=args.count or 1, stop=stop)
            else:
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


def _storage_copy(args: argparse.Namespace) -> int:
    """Copy a folder into the object store (``put``) or a prefix of it out (``get``): the export
    Job's upload of a model repository, an operator's backup of weights."""
    import asyncio

    from sfumato.control_plane import storage

    store = storage.open_store(_settings())
    if args.storage_command == "put":
        keys = asyncio.run(storage.put_tree(store, Path(args.source), args.prefix))
        print(f"{len(keys)} files stored under {args.prefix or '(root)'}", file=sys.stderr)
    else:
        paths = asyncio.run(storage.get_tree(store, args.prefix, Path(args.target)))
        print(f"{len(paths)} files written under {args.target}", file=sys.stderr)
    return 0


def _recommend_evaluate(args: argparse.Namespace) -> int:
    """The recommender's offline evaluation on the seeded synthetic community (no Triton needed:
    the text encoder runs in-process from the exported model repository)."""
    from sfumato.control_plane.recommender import evaluation

    reports = [
        evaluation.evaluate(
            repository=Path(args.repository), n_users=args.users, n_items=args.items, seed=seed
        )
        for seed in args.seeds
    ]
    report = evaluation.combine(reports)
    print(evaluation.table(report))
    if args.json:
        evaluation.save(report, Path(args.json), Path(args.plot))
        print(f"saved {args.json} and {args.plot}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="run the control plane (REST API) with in-process workers")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--no-migrate", action="store_true", help="do not upgrade the database schema first")
    sv.add_argument("--log-level", default="info")
    sv.set_defaults(func=_serve)

    upp = sub.add_parser("up", help="Triton and the control plane together (what `make run` starts)")
    upp.add_argument("--model-repository", default="model_repository")
    upp.add_argument("--host", default="127.0.0.1", help="the REST API's address")
    upp.add_argument("--port", type=int, default=8080)
    upp.add_argument("--address", default="127.0.0.1", help="Triton's address (HTTP, gRPC, metrics)")
    upp.add_argument("--triton-http-port", type=int, default=8000)
    upp.add_argument("--triton-grpc-port", type=int, default=8001)
    upp.add_argument("--triton-metrics-port", type=int, default=8002)
    upp.add_argument("--edge-host", default="127.0.0.1", help="the gRPC edge's address")
    upp.add_argument("--edge-port", type=int, default=8003, help="the gRPC edge's port (0: no edge)")
    upp.add_argument("--edge-tls-cert", help="serve the edge over TLS with this certificate (PEM)")
    upp.add_argument("--edge-tls-key", help="... and this private key (PEM)")
    upp.add_argument("--log-level", default="info")
    upp.set_defaults(func=_up)

    ed = sub.add_parser("edge", help="the authenticating gRPC edge (Caddy) in front of Triton")
    ed.add_argument("--host", default="127.0.0.1")
    ed.add_argument("--port", type=int, default=8003)
    ed.add_argument("--triton", default="127.0.0.1:8001", metavar="HOST:PORT", help="Triton's gRPC")
    ed.add_argument("--api", default="http://127.0.0.1:8080", help="the control plane that decides")
    ed.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    ed.add_argument("--tls-key", help="... and this private key (PEM)")
    ed.add_argument("--log-level", default="info")
    ed.set_defaults(func=_edge)

    wk = sub.add_parser("worker", help="run generation workers, or a training runner, alone (scale out)")
    wk.add_argument("--count", type=int, help="workers in this process (default: SFUMATO_WORKERS)")
    wk.add_argument(
        "--queue",
        choices=["generations", "trainings"],
        default="generations",
        help="generations: generation workers; trainings: a training runner (one training at a time)",
    )
    wk.add_argument("--log-level", default="info")
    wk.set_defaults(func=_worker)

    admin = sub.add_parser("admin", help="administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    ck = admin_sub.add_parser("create-key", help="create a user if needed and print a new API key for it")
    ck.add_argument("--user", required=True)
    ck.add_argument("--role", choices=["admin", "member", "trainer"], default="member")
    ck.add_argument("--name", default="", help="a label for the key")
    ck.set_defaults(func=_create_key)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_sub.add_parser("upgrade", help="run the Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)

    st = sub.add_parser("storage", help="copy folders into and out of the object store (SFUMATO_STORAGE_URL)")
    st_sub = st.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    put = st_sub.add_parser("put", help="upload a folder's files under a key prefix")
    put.add_argument("source", help="local folder")
    put.add_argument("prefix", help="key prefix, e.g. model_repository")
    put.set_defaults(func=_storage_copy)
    get = st_sub.add_parser("get", help="download every object under a key prefix into a folder")
    get.add_argument("prefix")
    get.add_argument("target", help="local folder")
    get.set_defaults(func=_storage_copy)

    rec = sub.add_parser("recommend", help="the recommender: offline evaluation")
    rec_sub = rec.add_subparsers(dest="recommend_command", required=True, metavar="ACTION")
    ev = rec_sub.add_parser(
        "evaluate",
        help="recall@10 / NDCG@10 of popularity, ALS, content and the hybrid on a synthetic community",
    )
    ev.add_argument(
        "--repository", default="model_repository", help="the exported model repository (text encoder)"
    )
    ev.add_argument("--users", type=int, default=2000)
    ev.add_argument("--items", type=int, default=800)
    ev.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="one community per seed; mean reported"
    )
    ev.add_argument("--json", default="docs/figures/recommender-evaluation.json")
    ev.add_argument("--plot", default="docs/figures/recommender-evaluation.png")
    ev.set_defaults(func=_recommend_evaluate)
