"""The Prometheus alerting rules (``deploy/prometheus/alerts.yaml``): valid for Prometheus
(``promtool check rules``), doing what they say on series that make each fire and on a healthy
service (``promtool test rules alerts_test.yaml``), and written over metrics that exist: the
control plane's own, or the names the team agreed on for the worker and Triton supervision."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sfumato.control_plane.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
# Metrics that other processes of the team export (the brief's agreed names): the workers'
# (sfumato_job_*, sfumato_pipeline_failures_total, ...) and Triton supervision's.
AGREED_ELSEWHERE = {
    "sfumato_job_duration_seconds",
    "sfumato_job_queue_wait_seconds",
    "sfumato_job_retries_total",
    "sfumato_job_reclaims_total",
    "sfumato_job_requeues_total",
    "sfumato_jobs_in_flight",
    "sfumato_worker_capacity",
    "sfumato_pipeline_failures_total",
    "sfumato_triton_restarts_total",
    "sfumato_triton_up",
    "sfumato_edge_requests_total",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    """``promtool``: on PATH, in the virtualenv, or fetched there by ``.ci/install-promtool``
    (the Debian package's binary alone)."""
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if found:
        return found
    done = subprocess.run([ROOT / ".ci" / "install-promtool"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"promtool is needed and could not be installed:\n{done.stderr}"
    return str(ROOT / done.stdout.strip())


def run(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules(promtool: str) -> None:
    out = run(promtool, "check", "rules", "alerts.yaml")
    assert "SUCCESS" in out, out


def test_the_rules_unit_tests_pass(promtool: str) -> None:
    out = run(promtool, "test", "rules", "alerts_test.yaml")
    assert "SUCCESS" in out, out


def test_every_alert_is_tested_labelled_and_written_over_real_metrics() -> None:
    rules = [r for g in yaml.safe_load((RULES / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load((RULES / "alerts_test.yaml").read_text())["tests"]
    fired = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case["exp_alerts"]
    }

    def base(metric: str) -> str:  # the family: no _total / _bucket / _count / _sum
        return re.sub(r"_(total|bucket|count|sum)$", "", metric)

    ours = {base(family.name) for family in Metrics().registry.collect()}
    known = ours | {base(m) for m in AGREED_ELSEWHERE}
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert name in fired, f"{name}: no unit test makes it fire"
        assert name in quiet, f"{name}: no unit test shows it quiet"
        used = {base(m) for m in re.findall(r"\bsfumato_[a-z_]+", rule["expr"])}
        unknown = used - known
        assert not unknown, f"{name} uses metrics nobody exports: {unknown}"
    # The API's own alerting metrics are among them.
    for metric in ("sfumato_oldest_queued_job_age_seconds", "sfumato_rejections_total"):
        assert base(metric) in ours
        assert any(metric in rule["expr"] for rule in rules), metric
