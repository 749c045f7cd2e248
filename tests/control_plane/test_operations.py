"""Operating the control plane: liveness and readiness, Prometheus metrics (route templates as
labels, job counts, the oldest queued job's age, rejections by limit, cancellations by state,
process metrics), request ids, problem details for unknown routes, and the OpenAPI document
(a summary for every operation, an example for every JSON body it documents)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from sfumato.control_plane import leases, schemas
from sfumato.control_plane.models import Job

from .datasets_zip import shapes_zip
from .problems import assert_problem

PROMPT = "a red circle on a white background"
JSON_TYPES = ("application/json", "application/problem+json")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of a Prometheus text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_liveness_and_readiness_without_triton(api) -> None:
    r = await api.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    # The test settings point Triton at 127.0.0.1:1, where nothing listens.
    r = await api.client.get("/readyz")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["triton"] != "ok" and "127.0.0.1:1" in body["checks"]["triton"]


async def test_metrics_use_route_templates_and_count_jobs(api, complete_job) -> None:
    alice = await api.user("alice")
    ids = []
    for _ in range(4):
        r = await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
        ids.append(r.json()["id"])
    for job_id in ids:
        assert (
            await api.client.get(f"/v1/generations/{job_id}", headers=api.headers(alice))
        ).status_code == 200
    await api.client.post(f"/v1/generations/{ids[3]}/cancel", headers=api.headers(alice))
    await complete_job(api, ids[0])
    await api.client.get(f"/v1/generations/{ids[1]}")  # 401
    await api.client.get(f"/no/such/route/{ids[2]}")  # 404

    r = await api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert not any(job_id in r.text for job_id in ids), "raw ids must not become label values"
    values = samples(r.text)

    def requests(method: str, route: str, status: str) -> float:
        key = frozenset({"method": method, "route": route, "status": status}.items())
        return values.get(("sfumato_http_request_duration_seconds_count", key), 0.0)

    assert requests("GET", "/v1/generations/{job_id}", "200") == 4
    assert requests("GET", "/v1/generations/{job_id}", "401") == 1
    assert requests("POST", "/v1/generations", "202") == 4
    assert requests("POST", "/v1/generations/{job_id}/cancel", "200") == 1
    assert requests("GET", "unmatched", "404") == 1

    def jobs(status: str) -> float:
        return values[("sfumato_jobs", frozenset({"status": status}.items()))]

    counts = {status: jobs(status) for status in ("queued", "running", "succeeded", "failed", "canceled")}
    assert counts == {"queued": 2, "running": 0, "succeeded": 1, "failed": 0, "canceled": 1}
    assert values[("sfumato_queue_depth", frozenset())] == 2

    # The gauges follow the database, not this process: a job deleted is a job gone.
    await api.client.delete(f"/v1/generations/{ids[1]}", headers=api.headers(alice))
    values = samples((await api.client.get("/metrics")).text)
    assert values[("sfumato_jobs", frozenset({"status": "queued"}.items()))] == 1


async def test_request_id_is_echoed_or_generated(api) -> None:
    alice = await api.user("alice")
    r = await api.client.get("/healthz", headers={"X-Request-ID": "req-42.a:b_c"})
    assert r.headers["x-request-id"] == "req-42.a:b_c"
    generated = set()
    for headers in (
        {},
        {"X-Request-ID": "has spaces in it"},
        {"X-Request-ID": "x" * 129},
        {"X-Request-ID": "a\tb"},
    ):
        r = await api.client.get("/healthz", headers=headers)
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers
        generated.add(r.headers["x-request-id"])
    assert len(generated) == 4
    # Errors carry it too.
    for response in (
        await api.client.get("/v1/generations", headers={"X-Request-ID": "e1"}),
        await api.client.get("/v1/generations/nope", headers=api.headers(alice, **{"X-Request-ID": "e2"})),
        await api.client.post(
            "/v1/generations", json={}, headers=api.headers(alice, **{"X-Request-ID": "e3"})
        ),
    ):
        assert response.status_code >= 400 and response.headers["x-request-id"] in {"e1", "e2", "e3"}


async def test_unknown_routes_and_methods_are_problems(api) -> None:
    body = assert_problem(await api.client.get("/v1/nothing-here"), 404)
    assert body["instance"] == "/v1/nothing-here"
    assert_problem(await api.client.get("/nothing-here"), 404)  # (`/` is the playground)
    assert_problem(await api.client.get("/playground/js/nothing.js"), 404)
    r = await api.client.put("/v1/generations", json={})
    assert_problem(r, 405)
    assert "allow" in r.headers


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _has_example(spec: dict[str, Any], media: dict[str, Any]) -> bool:
    """An example reachable from a media type: its own, its schema's, or its array items'."""
    if "example" in media or "examples" in media:
        return True
    schema = _resolve(spec, media.get("schema", {}))
    if schema.get("type") == "array":
        schema = _resolve(spec, schema.get("items", {}))
    return "example" in schema or "examples" in schema


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the document holds no rows
async def test_openapi_documents_every_operation_with_examples(api) -> None:
    r = await api.client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert (await api.client.get("/docs")).status_code == 200
    missing: list[str] = []
    operations = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            operations += 1
            where = f"{method.upper()} {path}"
            if not op.get("summary"):
                missing.append(f"{where}: no summary")
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and not _has_example(spec, body):
                missing.append(f"{where}: request body without an example")
            secured = bool(op.get("security"))
            if secured and "401" not in op["responses"]:
                missing.append(f"{where}: needs credentials but does not document 401")
            if "(admin)" in op["summary"] and "403" not in op["responses"]:
                missing.append(f"{where}: admin-only but does not document 403")
            for status, response in op["responses"].items():
                if not status.startswith(("2", "4")) or status in ("204", "304"):
                    continue
                content = response.get("content", {})
                if status.startswith("4") and list(content) != ["application/problem+json"]:
                    missing.append(
                        f"{where} {status}: errors are application/problem+json, not {list(content)}"
                    )
                json_media = [m for t, m in content.items() if t in JSON_TYPES]
                if not content or (json_media and not all(_has_example(spec, m) for m in json_media)):
                    missing.append(f"{where} {status}: no example")
    assert operations >= 15
    assert not missing, "\n".join(missing)

    # The examples are valid: each model's examples parse (taken from the models: the served
    # document drops null values), each request example is accepted.
    for name in spec["components"]["schemas"]:
        model = getattr(schemas, name, None)
        if isinstance(model, type) and issubclass(model, BaseModel):
            for example in model.model_json_schema().get("examples", []):
                model.model_validate(example)
    admin = await api.user("root", role="admin")
    # A data set of the admin's: a training example names one (an unknown one is a 422 on dataset_id).
    r = await api.client.post(
        "/v1/datasets",
        headers=api.headers(admin),
        files={"file": ("d.zip", shapes_zip(4), "application/zip")},
    )
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    sent = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            media = op.get("requestBody", {}).get("content", {}).get("application/json")
            if media is None:
                continue
            for example in _resolve(spec, media["schema"]).get("examples", []):
                # Other path parameters: a well-formed id of nothing (404, not a 422 on the path).
                url = re.sub(r"\{\w+\}", "0" * 32, path.replace("{user_id}", admin["id"]))
                if "dataset_id" in example:
                    example = example | {"dataset_id": dataset_id}
                r = await api.client.request(method, url, json=example, headers=api.headers(admin))
                assert r.status_code != 422, f"{method.upper()} {path} example {example}: {r.text}"
                sent += 1
    assert sent >= 5


async def test_metrics_an_operator_alerts_on(api_factory, complete_job) -> None:
    api = await api_factory(
        submit_rate_limit="4/minute", max_queued_jobs_per_user=2, max_body_bytes=4096, max_image_bytes=64
    )
    alice, bob = await api.user("alice"), await api.user("bob")
    services = api.app.state.services

    async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = await api.client.get("/metrics")
        assert r.status_code == 200
        return samples(r.text)

    def value(values: dict, name: str, **labels: str) -> float:
        return values[(name, frozenset(labels.items()))]

    values = await scrape()
    assert value(values, "sfumato_oldest_queued_job_age_seconds") == 0
    for limit in ("requests", "submit", "queued_jobs", "body_size", "image_size", "load_shedding"):
        assert value(values, "sfumato_rejections_total", limit=limit) == 0  # present from the start
    # Process metrics: CPU, memory, start time; the Python platform.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds"):
        assert value(values, name) > 0, name
    assert any(name == "python_info" for name, _ in values)

    # Oldest queued job: its age, from its submission time in the database.
    first = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    ).json()
    second = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(bob))
    ).json()
    async with services.sessions() as session:
        job = await session.get(Job, first["id"])
        job.created_at = job.created_at - timedelta(seconds=600)
        await session.commit()
    age = value(await scrape(), "sfumato_oldest_queued_job_age_seconds")
    assert 600 <= age < 600 + 300, age

    # Cancellations by the job's state: alice's queued job, then bob's once running.
    await api.client.post(f"/v1/generations/{first['id']}/cancel", headers=api.headers(alice))
    async with services.sessions() as session:
        claimed = await leases.claim(session=session, worker_id="w", lease_s=60)
        assert [c.id for c in claimed] == [second["id"]]
    r = await api.client.post(f"/v1/generations/{second['id']}/cancel", headers=api.headers(bob))
    assert r.json()["status"] == "running"
    values = await scrape()
    assert value(values, "sfumato_jobs_canceled_total", state="queued") == 1
    assert value(values, "sfumato_jobs_canceled_total", state="running") == 1
    assert value(values, "sfumato_oldest_queued_job_age_seconds") == 0  # nothing queued now

    # Rejections by limit: the queued-jobs cap, the submission rate, body and image size.
    for _ in range(2):
        assert (
            await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
        ).status_code == 202
    r = await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    assert r.status_code == 429 and "unfinished" in r.json()["detail"]  # queued_jobs (2 of 2)
    r = await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    assert r.status_code == 429 and "4/minute" in r.json()["detail"]  # submit (5th of 4 per minute)
    r = await api.client.post("/v1/generations", json={"prompt": "x" * 5000}, headers=api.headers(bob))
    assert r.status_code == 413
    r = await api.client.post(
        "/v1/generations", json={"prompt": PROMPT, "image": "A" * 200}, headers=api.headers(bob)
    )
    assert r.status_code == 413
    values = await scrape()
    expected = {"queued_jobs": 1, "submit": 1, "body_size": 1, "image_size": 1, "requests": 0}
    assert {k: value(values, "sfumato_rejections_total", limit=k) for k in expected} == expected
