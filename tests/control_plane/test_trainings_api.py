"""``/v1/trainings``: submit (roles, bounds, data set ownership), read, list, cancel, weights;
BOLA on every route; the queues keep generations and trainings apart. SQLite and PostgreSQL.

No training runs here (``test_training_runner.py`` runs them)."""

from __future__ import annotations

import pytest

from sfumato.control_plane import leases
from tests.control_plane.datasets_zip import shapes_zip


async def dataset(api, who) -> str:  # type: ignore[no-untyped-def]
    response = await api.client.post(
        "/v1/datasets", headers=api.headers(who), files={"file": ("d.zip", shapes_zip(4), "application/zip")}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def train(api, who, **body):  # type: ignore[no-untyped-def]
    return await api.client.post("/v1/trainings", headers=api.headers(who), json=body)


async def test_submit_read_list_cancel(api) -> None:
    trainer = await api.user("tess", role="trainer")
    data = await dataset(api, trainer)
    response = await train(
        api,
        trainer,
        dataset_id=data,
        method="lora",
        steps=50,
        batch_size=4,
        validation_prompts=["a pink circle"],
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/trainings/{body['id']}"
    assert body["status"] == "queued" and body["method"] == "lora" and body["base_model"] == "pipeline"
    assert body["progress"] == {"step": 0, "total": 50, "loss": None, "eta_s": None}
    assert body["params"]["rank"] == 4 and body["params"]["output_model"] == "pipeline"
    assert body["estimated_duration_s"] > 0 and body["output"] is None and body["weights_url"] is None
    assert "dataset_prefix" not in body["params"]

    epochs = (await train(api, trainer, dataset_id=data, method="full", epochs=3, batch_size=3)).json()
    assert epochs["params"]["steps"] == 3 * 2 and epochs["params"]["rank"] is None  # ceil(4 / 3) per epoch
    default = (await train(api, trainer, dataset_id=data)).json()
    assert default["params"]["steps"] == 100 * 4  # 100 epochs of 4 images at batch 1

    got = await api.client.get(f"/v1/trainings/{body['id']}", headers=api.headers(trainer))
    assert got.status_code == 200 and got.json()["id"] == body["id"]
    page = await api.client.get("/v1/trainings?limit=2", headers=api.headers(trainer))
    assert [t["id"] for t in page.json()["items"]] == [default["id"], epochs["id"]]
    rest = await api.client.get(
        f"/v1/trainings?limit=2&cursor={page.json()['next_cursor']}", headers=api.headers(trainer)
    )
    assert [t["id"] for t in rest.json()["items"]] == [body["id"]] and rest.json()["next_cursor"] is None

    weights = await api.client.get(f"/v1/trainings/{body['id']}/weights", headers=api.headers(trainer))
    assert weights.status_code == 409
    full_weights = await api.client.get(f"/v1/trainings/{epochs['id']}/weights", headers=api.headers(trainer))
    assert full_weights.status_code == 404

    canceled = await api.client.post(f"/v1/trainings/{body['id']}/cancel", headers=api.headers(trainer))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    again = await api.client.post(f"/v1/trainings/{body['id']}/cancel", headers=api.headers(trainer))
    assert again.status_code == 409
    only = await api.client.get("/v1/trainings?status=canceled", headers=api.headers(trainer))
    assert [t["id"] for t in only.json()["items"]] == [body["id"]]

    # A data set in use by a queued training cannot be deleted.
    assert (await api.client.delete(f"/v1/datasets/{data}", headers=api.headers(trainer))).status_code == 409


async def test_members_may_not_train_admins_may(api) -> None:
    member, admin = await api.user("mia"), await api.user("ada", role="admin")
    response = await train(api, member, dataset_id=await dataset(api, member), steps=5)
    assert response.status_code == 403
    assert (await train(api, admin, dataset_id=await dataset(api, admin), steps=5)).status_code == 202


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 5, "epochs": 2}, "epochs"),
        ({"epochs": 1001}, "epochs"),
        ({"learning_rate": 1.0}, "learning_rate"),
        ({"learning_rate": 1e-7}, "learning_rate"),
        ({"batch_size": 17}, "batch_size"),
        ({"method": "dreambooth"}, "method"),
        ({"method": "full", "rank": 4}, "rank"),
        ({"rank": 0}, "rank"),
        ({"resolution": 30}, "resolution"),
        ({"validation_prompts": ["x"] * 9}, "validation_prompts"),
        ({"validation_prompts": [""]}, "validation_prompts"),
        ({"output_model": "../etc"}, "output_model"),
        ({"output_model": "x" * 101}, "output_model"),
        ({"base_model": "nope"}, "base_model"),
        ({"dataset_id": "missing"}, "dataset_id"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_bad_trainings_are_422_naming_the_field(api, body: dict, field: str) -> None:
    trainer = await api.user("tess", role="trainer")
    payload = {"dataset_id": await dataset(api, trainer), "steps": 5, **body}
    response = await train(api, trainer, **payload)
    assert response.status_code == 422, response.text
    assert field in response.text


async def test_step_limit(api_factory) -> None:
    api = await api_factory(max_training_steps=10)
    trainer = await api.user("tess", role="trainer")
    response = await train(api, trainer, dataset_id=await dataset(api, trainer), epochs=5)
    assert response.status_code == 422 and "epochs" in response.json()["detail"]


async def test_another_users_training_and_dataset_are_not_found(api) -> None:
    alice, mallory = await api.user("alice", role="trainer"), await api.user("mallory", role="trainer")
    data = await dataset(api, alice)
    training = (await train(api, alice, dataset_id=data, steps=5)).json()
    for method, path in (
        ("GET", f"/v1/trainings/{training['id']}"),
        ("POST", f"/v1/trainings/{training['id']}/cancel"),
        ("GET", f"/v1/trainings/{training['id']}/weights"),
        ("GET", f"/v1/trainings/{training['id']}/validation/0"),
    ):
        response = await api.client.request(method, path, headers=api.headers(mallory))
        assert response.status_code == 404, (method, path, response.text)
    assert (await api.client.get("/v1/trainings", headers=api.headers(mallory))).json()["items"] == []
    # Mallory cannot train on Alice's data set: answered as if it did not exist.
    stolen = await train(api, mallory, dataset_id=data, steps=5)
    assert stolen.status_code == 422 and "dataset_id" in stolen.text
    # A training is not a generation, and a generation is not a training.
    assert (
        await api.client.get(f"/v1/generations/{training['id']}", headers=api.headers(alice))
    ).status_code == 404
    generation = await api.client.post(
        "/v1/generations", headers=api.headers(alice), json={"prompt": "a red circle"}
    )
    assert (
        await api.client.get(f"/v1/trainings/{generation.json()['id']}", headers=api.headers(alice))
    ).status_code == 404
    assert (
        await api.client.get(f"/v1/trainings/{training['id']}", headers=api.headers(alice))
    ).status_code == 200


async def test_queues_never_mix(api) -> None:
    alice = await api.user("alice", role="trainer")
    training = (await train(api, alice, dataset_id=await dataset(api, alice), steps=5)).json()
    generation = (
        await api.client.post("/v1/generations", headers=api.headers(alice), json={"prompt": "a red circle"})
    ).json()
    services = api.app.state.services
    async with services.sessions() as session:
        generations = await leases.claim(session=session, worker_id="g", lease_s=30, limit=10)
    async with services.sessions() as session:
        runs = await leases.claim(session=session, worker_id="t", lease_s=30, limit=10, queue="trainings")
    assert [j.id for j in generations] == [generation["id"]]
    assert [j.id for j in runs] == [training["id"]]
    listed = await api.client.get("/v1/generations", headers=api.headers(alice))
    assert [g["id"] for g in listed.json()["items"]] == [generation["id"]]


async def test_events_stream_of_a_training(api) -> None:
    alice, mallory = await api.user("alice", role="trainer"), await api.user("mallory", role="trainer")
    training = (await train(api, alice, dataset_id=await dataset(api, alice), steps=5)).json()
    path = f"/v1/trainings/{training['id']}/events"
    assert (await api.client.get(path, headers=api.headers(mallory))).status_code == 404
    await api.client.post(f"/v1/trainings/{training['id']}/cancel", headers=api.headers(alice))
    response = await api.client.get(path, headers=api.headers(alice))  # final: the stream ends
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert "event: completed" in response.text and '"status":"canceled"' in response.text.replace(" ", "")
    assert training["id"] in response.text and '"method":"lora"' in response.text.replace(" ", "")
