"""Shared fixtures: the committed demo model, one export of it, one real Triton per session."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.triton_exit import stop_and_check

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "sfumato-shapes"

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The session Triton's restricted-protocol key, in the environment as an operator would set it:
# every Settings() of the tests and every `sfumato` subprocess they start finds it
# (SFUMATO_TRITON_ADMIN_KEY); tests of the no-setting path remove it.
os.environ.setdefault("SFUMATO_TRITON_ADMIN_KEY", secrets.token_urlsafe(32))


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`): most of its
# time is spent waiting on servers, subprocesses and Triton, so two workers overlap it on two
# cores. Tests go one by one to whichever worker is free, except these groups, each kept on one
# worker: modules whose module-scoped fixtures start servers (started once, not once per worker),
# and the two SD-1.5-sized tests (their memory). Groups go out first, the longest first, so that
# no long group is left to run alone at the end.
ONE_WORKER_GROUPS = {
    "tests/test_export_sd15.py": "sd15",
    "tests/test_finetune_sd15.py": "sd15",
    "tests/control_plane/test_registry.py": "registry",
    "tests/control_plane/test_sdk.py": "sdk",
    "tests/control_plane/test_playground.py": "playground",
    "tests/control_plane/test_edge.py": "edge",
    "tests/test_schedulers.py": "schedulers",
    "tests/test_alerts.py": "alerts",
}
GROUP_ORDER = ["sd15", "registry", "sdk", "playground", "edge", "schedulers", "alerts"]


def _group(nodeid: str) -> str | None:
    return ONE_WORKER_GROUPS.get(nodeid.split("::", 1)[0])


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # type: ignore[no-untyped-def]
    """``--dist loadgroup`` with the groups above. (pytest-xdist's own loadgroup reads
    ``xdist_group`` marks into node ids, which pytest 9.2's node ids no longer allow.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = _group(nodeid)
            return f"group:{group}" if group else nodeid  # one test: a unit of its own

    config.option.loadscopereorder = False  # keep the order below (groups first)
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(GROUP_ORDER)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid) or "", len(rank)))  # stable sort


@pytest.fixture
def big_memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One test at a time, across pytest-xdist's workers, that needs SD-1.5-sized memory
    (a 3.4 GB UNet in PyTorch, again in ONNX Runtime): two at once would not fit in 24 GiB."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the workers' common base (one session)
    with FileLock(str(shared / "sfumato-big-memory.lock")):
        yield


@pytest.fixture(scope="session")
def demo_model() -> Path:
    assert (DEMO_MODEL / "model_index.json").is_file(), "the committed demo model is missing"
    return DEMO_MODEL


@pytest.fixture(scope="session")
def exported_repo(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The demo model exported for the cpu target (what `make model` does), once per session."""
    from sfumato.export.repository import ExportOptions, export_model_repository

    out = tmp_path_factory.mktemp("export") / "model_repository"
    export_model_repository(
        demo_model,
        out,
        ExportOptions(target="cpu", default_guidance=5.0, pipeline_instances=8, stream_instances=4),
    )
    return out


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory, exported_repo: Path) -> Iterator:
    """A real tritonserver on free ports serving the exported demo model, locked down as `sfumato up`
    starts it (loopback; restricted protocols need ``sfumato-admin-key: <server.admin_key>``)."""
    from sfumato.triton_server import TritonServer, free_port

    server = TritonServer(
        repository=exported_repo,
        work_dir=tmp_path_factory.mktemp("triton"),
        admin_key=os.environ["SFUMATO_TRITON_ADMIN_KEY"],
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        # 8 pipeline and 4 pipeline_stream stubs take ~10 s to unload on 2 idle cores, over 30 s
        # at a load average of 20; a model left live fails the stop below (tests/triton_exit.py).
        exit_timeout_secs=60,
    )
    server.start(timeout=300)
    yield server
    stop_and_check(server)
