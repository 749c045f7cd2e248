"""``/v1/datasets``: upload (every check a 422 naming the entry), list, read, delete; BOLA.

On SQLite and PostgreSQL (the ``api`` fixture)."""

from __future__ import annotations

import io
import zipfile

import pytest

from tests.control_plane.datasets_zip import make_zip, png, shapes_zip


async def upload(api, who, data: bytes, name: str = "set.zip"):  # type: ignore[no-untyped-def]
    return await api.client.post(
        "/v1/datasets", headers=api.headers(who), files={"file": (name, data, "application/zip")}
    )


async def test_upload_list_get_delete(api) -> None:
    alice = await api.user("alice")
    response = await upload(api, alice, shapes_zip(8))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_images"] == 8 and body["name"] == "set.zip"
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"
    assert {"id", "num_images", "created_at"} <= body.keys()
    store = api.app.state.services.store
    keys = await store.list(f"datasets/{body['id']}/")
    assert f"datasets/{body['id']}/metadata.jsonl" in keys and len(keys) == 9

    got = await api.client.get(f"/v1/datasets/{body['id']}", headers=api.headers(alice))
    assert got.status_code == 200 and got.json() == body

    second = (await upload(api, alice, shapes_zip(3, seed=1))).json()
    page = await api.client.get("/v1/datasets?limit=1", headers=api.headers(alice))
    assert [d["id"] for d in page.json()["items"]] == [second["id"]]
    cursor = page.json()["next_cursor"]
    page2 = await api.client.get(f"/v1/datasets?limit=1&cursor={cursor}", headers=api.headers(alice))
    assert [d["id"] for d in page2.json()["items"]] == [body["id"]] and page2.json()["next_cursor"] is None
    bad_cursor = await api.client.get("/v1/datasets?cursor=nope!", headers=api.headers(alice))
    assert bad_cursor.status_code == 400

    deleted = await api.client.delete(f"/v1/datasets/{body['id']}", headers=api.headers(alice))
    assert deleted.status_code == 204
    assert await store.list(f"datasets/{body['id']}/") == []
    gone = await api.client.get(f"/v1/datasets/{body['id']}", headers=api.headers(alice))
    assert gone.status_code == 404


async def test_another_users_dataset_is_not_found(api) -> None:
    alice, mallory = await api.user("alice"), await api.user("mallory")
    dataset = (await upload(api, alice, shapes_zip(2))).json()
    for method, path in (
        ("GET", f"/v1/datasets/{dataset['id']}"),
        ("DELETE", f"/v1/datasets/{dataset['id']}"),
    ):
        response = await api.client.request(method, path, headers=api.headers(mallory))
        assert response.status_code == 404, (method, response.text)
    listed = await api.client.get("/v1/datasets", headers=api.headers(mallory))
    assert listed.json()["items"] == []
    assert (
        await api.client.get(f"/v1/datasets/{dataset['id']}", headers=api.headers(alice))
    ).status_code == 200
    assert (await api.client.get("/v1/datasets")).status_code == 401


def _bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", b"\0" * (20 * 2**20))  # 20 MB of zeros packs to ~20 kB
        archive.writestr("metadata.jsonl", '{"file_name": "a.png", "text": "zeros"}\n')
    return buffer.getvalue()


def _symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
        archive.writestr("metadata.jsonl", '{"file_name": "link.png", "text": "x"}\n')
    return buffer.getvalue()


CASES = [
    ("not a zip", b"PK? not really a zip", "not a zip archive"),
    (
        "traversal",
        make_zip({"../evil.png": png()}, [{"file_name": "../evil.png", "text": "x"}]),
        "'../evil.png'",
    ),
    ("absolute", make_zip({"/abs.png": png()}, [{"file_name": "/abs.png", "text": "x"}]), "'/abs.png'"),
    ("backslash", make_zip({"a\\b.png": png()}, [{"file_name": "a\\b.png", "text": "x"}]), "a\\\\b.png"),
    ("symlink", _symlink(), "symbolic links"),
    ("bomb", _bomb(), "zip bomb"),
    ("no metadata", make_zip({"a.png": png()}), "no metadata.jsonl"),
    (
        "missing file",
        make_zip({"a.png": png()}, [{"file_name": "b.png", "text": "x"}]),
        "'b.png' is not in the zip",
    ),
    (
        "empty caption",
        make_zip({"a.png": png()}, [{"file_name": "a.png", "text": "  "}]),
        "caption (text) is empty",
    ),
    ("no caption", make_zip({"a.png": png()}, [{"file_name": "a.png"}]), "caption (text) is empty"),
    ("bad json", make_zip({"a.png": png()}, "{nope\n"), "line 1: not JSON"),
    (
        "not an image",
        make_zip({"a.png": b"hello"}, [{"file_name": "a.png", "text": "x"}]),
        "'a.png': not a PNG",
    ),
    ("gif", make_zip({"a.gif": b"GIF89a"}, [{"file_name": "a.gif", "text": "x"}]), "'a.gif': only"),
    ("truncated", make_zip({"a.png": png(size=64)[:-40]}, [{"file_name": "a.png", "text": "x"}]), "'a.png'"),
    ("too many pixels", make_zip({"a.png": png(size=2048)}, [{"file_name": "a.png", "text": "x"}]), "pixels"),
    ("listed twice", make_zip({"a.png": png()}, [{"file_name": "a.png", "text": "x"}] * 2), "listed twice"),
    ("empty", make_zip({}, []), "lists no images"),
]


@pytest.mark.parametrize(("case", "data", "says"), CASES, ids=[c[0] for c in CASES])
async def test_bad_uploads_are_422_naming_the_entry(api, case: str, data: bytes, says: str) -> None:
    alice = await api.user("alice")
    response = await upload(api, alice, data)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert says in problem["detail"], problem
    assert "file" in response.text
    assert (await api.client.get("/v1/datasets", headers=api.headers(alice))).json()["items"] == []
    assert await api.app.state.services.store.list("datasets/") == []


async def test_upload_size_limit_is_413(api_factory) -> None:
    api = await api_factory(max_dataset_bytes=4096)
    alice = await api.user("alice")
    response = await upload(api, alice, shapes_zip(16))
    assert response.status_code == 413
    assert (await upload(api, alice, shapes_zip(1))).status_code == 201


async def test_image_count_limit(api_factory) -> None:
    api = await api_factory(max_dataset_images=3)
    alice = await api.user("alice")
    response = await upload(api, alice, shapes_zip(4))
    assert response.status_code == 422 and "more than 3 images" in response.json()["detail"]
