from __future__ import annotations


async def test_submit_and_read(api) -> None:
    alice = await api.user("alice")
    r = await api.client.post(
        "/v1/generations", json={"prompt": "a red circle on a white background"}, headers=api.headers(alice)
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/generations/{job['id']}"
    r = await api.client.get(job and r.headers["location"], headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["status"] == "queued"
