"""The gallery and its recommender through the REST API, on SQLite and PostgreSQL: users (``me``,
preferences), content (from a generation or uploaded; filters, sorts, cursor pages), interactions
(states and events), recommendations (precomputed rows, stale rows recomputed, feedback), and
BOLA on every route: another user's object is 404. Triton is not running here (embeddings are
left empty and the refit fills them in later); the last test runs with the real Triton."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sfumato.clients.png import encode_png
from sfumato.shapes import PALETTE


def png_b64(colour: str = "red") -> str:
    return base64.b64encode(encode_png(np.full((32, 32, 3), PALETTE[colour], dtype=np.uint8))).decode()


async def upload(api, who, title: str, *, prompt: str = "", tags=(), visibility: str = "public") -> dict:
    body = {
        "image": png_b64(),
        "title": title,
        "prompt": prompt,
        "tags": list(tags),
        "visibility": visibility,
    }
    r = await api.client.post("/v1/content", json=body, headers=api.headers(who))
    assert r.status_code == 201, r.text
    return r.json()


async def interact(api, who, content_id: str, kind: str, expect: int = 201, **extra) -> dict:
    r = await api.client.post(
        "/v1/interactions", json={"content_id": content_id, "type": kind, **extra}, headers=api.headers(who)
    )
    assert r.status_code == expect, r.text
    return r.json()


async def test_users_me_preferences_and_bola(api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    admin = await api.user("root", role="admin")
    r = await api.client.get("/v1/users/me", headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["id"] == alice["id"] and r.json()["name"] == "alice"
    r = await api.client.put("/v1/users/me", json={"display_name": "Alice"}, headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["display_name"] == "Alice"
    prefs = {
        "favorite_tags": ["Red", "circle", "red"],
        "content_types": ["image"],
        "settings": {"nsfw": False},
    }
    r = await api.client.put(f"/v1/users/{alice['id']}/preferences", json=prefs, headers=api.headers(alice))
    assert r.status_code == 200, r.text
    assert r.json()["preferences"] == {
        "favorite_tags": ["red", "circle"],
        "content_types": ["image"],
        "settings": {"nsfw": False},
    }
    r = await api.client.put(
        "/v1/users/me/preferences", json={"content_types": ["video"]}, headers=api.headers(alice)
    )
    assert r.status_code == 422 and "content_types" in r.text
    # BOLA: bob cannot read or change alice, nor list her interactions or recommendations.
    for method, path, body in (
        ("GET", f"/v1/users/{alice['id']}", None),
        ("PUT", f"/v1/users/{alice['id']}", {"display_name": "x"}),
        ("PUT", f"/v1/users/{alice['id']}/preferences", {"favorite_tags": ["x"]}),
        ("GET", f"/v1/users/{alice['id']}/interactions", None),
        ("GET", f"/v1/users/{alice['id']}/recommendations", None),
        ("GET", "/v1/users/nobody", None),
    ):
        r = await api.client.request(method, path, json=body, headers=api.headers(bob))
        assert r.status_code == 404, (method, path, r.text)
    r = await api.client.get(f"/v1/users/{alice['id']}", headers=api.headers(admin))
    assert r.status_code == 200 and r.json()["display_name"] == "Alice"
    r = await api.client.get("/v1/users/me")
    assert r.status_code == 401


async def test_content_publish_filters_pages_and_bola(api, complete_job) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    r = await api.client.post(
        "/v1/generations",
        json={"prompt": "a red circle on a white background", "seed": 7, "num_images": 2},
        headers=api.headers(alice),
    )
    job = r.json()
    # Not finished yet: 409; bob cannot publish alice's generation (404).
    r = await api.client.post("/v1/content", json={"generation_id": job["id"]}, headers=api.headers(alice))
    assert r.status_code == 409, r.text
    pngs = await complete_job(api, job["id"], count=2)
    r = await api.client.post("/v1/content", json={"generation_id": job["id"]}, headers=api.headers(bob))
    assert r.status_code == 404, r.text
    r = await api.client.post(
        "/v1/content",
        json={"generation_id": job["id"], "image_index": 1, "tags": ["red", "Circle"]},
        headers=api.headers(alice),
    )
    assert r.status_code == 201, r.text
    published = r.json()
    assert r.headers["location"] == f"/v1/content/{published['id']}"
    assert published["prompt"] == "a red circle on a white background"
    assert published["seed"] == 8 and published["generation_id"] == job["id"]
    assert published["model"] == {"name": "pipeline", "version": ""}
    assert published["tags"] == ["red", "circle"] and published["visibility"] == "public"
    assert published["counts"]["likes"] == 0 and published["creator"] == alice["id"]
    # The image is a copy: it outlives the generation.
    assert (
        await api.client.delete(f"/v1/generations/{job['id']}", headers=api.headers(alice))
    ).status_code == 204
    r = await api.client.get(published["image_url"], headers=api.headers(bob))
    assert r.status_code == 200 and r.content == pngs[1] and r.headers["content-type"] == "image/png"

    secret = await upload(
        api, alice, "my secret square", prompt="a blue square", tags=["blue"], visibility="private"
    )
    cat = await upload(
        api, bob, "bob's triangle", prompt="a green triangle on a black background", tags=["green"]
    )
    # Private: alice sees it, bob does not (read, image, update, delete, interact all 404).
    assert (
        await api.client.get(f"/v1/content/{secret['id']}", headers=api.headers(alice))
    ).status_code == 200
    for method, path, body in (
        ("GET", f"/v1/content/{secret['id']}", None),
        ("GET", f"/v1/content/{secret['id']}/image", None),
        ("PUT", f"/v1/content/{secret['id']}", {"title": "mine"}),
        ("DELETE", f"/v1/content/{secret['id']}", None),
        ("PUT", f"/v1/content/{published['id']}", {"title": "mine"}),  # public, but not bob's
        ("DELETE", f"/v1/content/{published['id']}", None),
        ("POST", "/v1/interactions", {"content_id": secret["id"], "type": "like"}),
    ):
        r = await api.client.request(method, path, json=body, headers=api.headers(bob))
        assert r.status_code == 404, (method, path, r.text)

    async def ids(who, **params) -> list[str]:
        r = await api.client.get("/v1/content", params=params, headers=api.headers(who))
        assert r.status_code == 200, r.text
        return [item["id"] for item in r.json()["items"]]

    assert await ids(alice) == [cat["id"], secret["id"], published["id"]]
    assert await ids(bob) == [cat["id"], published["id"]]
    assert await ids(bob, tag="RED") == [published["id"]]
    assert await ids(alice, creator="me") == [secret["id"], published["id"]]
    assert await ids(bob, creator=alice["id"]) == [published["id"]]
    assert await ids(bob, q="TRIANGLE") == [cat["id"]]
    assert await ids(bob, q="100%") == []
    assert await ids(bob, content_type="image") == [cat["id"], published["id"]]
    await interact(api, alice, cat["id"], "like")
    assert await ids(bob, sort="popular") == [cat["id"], published["id"]]
    # Cursor pages, both sorts.
    for sort in ("recent", "popular"):
        r = await api.client.get("/v1/content", params={"limit": 1, "sort": sort}, headers=api.headers(alice))
        seen = [r.json()["items"][0]["id"]]
        while r.json()["next_cursor"]:
            r = await api.client.get(
                "/v1/content",
                params={"limit": 1, "sort": sort, "cursor": r.json()["next_cursor"]},
                headers=api.headers(alice),
            )
            seen += [i["id"] for i in r.json()["items"]]
        assert sorted(seen) == sorted([cat["id"], secret["id"], published["id"]]), sort
    for sort in ("recent", "popular"):
        r = await api.client.get(
            "/v1/content", params={"cursor": "nope", "sort": sort}, headers=api.headers(bob)
        )
        assert r.status_code == 400 and "cursor" in r.text
    # Updates by the creator; bad input names the field.
    r = await api.client.put(
        f"/v1/content/{secret['id']}",
        json={"visibility": "public", "tags": ["x"]},
        headers=api.headers(alice),
    )
    assert r.status_code == 200 and r.json()["visibility"] == "public"
    assert secret["id"] in await ids(bob)
    r = await api.client.put(
        f"/v1/content/{secret['id']}", json={"visibility": "hidden"}, headers=api.headers(alice)
    )
    assert r.status_code == 422 and "visibility" in r.text
    r = await api.client.post("/v1/content", json={"image": png_b64()}, headers=api.headers(alice))
    assert r.status_code == 422 and "title" in r.text
    r = await api.client.post(
        "/v1/content", json={"image": "not base64!", "title": "t"}, headers=api.headers(alice)
    )
    assert r.status_code == 422 and "image" in r.text
    r = await api.client.post("/v1/content", json={"title": "t"}, headers=api.headers(alice))
    assert r.status_code == 422 and "generation_id" in r.text
    assert (
        await api.client.delete(f"/v1/content/{secret['id']}", headers=api.headers(alice))
    ).status_code == 204
    assert (
        await api.client.get(f"/v1/content/{secret['id']}", headers=api.headers(alice))
    ).status_code == 404


async def test_interactions_states_events_and_bola(api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    item = await upload(api, bob, "a red circle", prompt="a red circle on a white background")
    like = await interact(api, alice, item["id"], "like")
    again = await interact(api, alice, item["id"], "like", expect=200)  # a state: no second like
    assert again["id"] == like["id"]
    await interact(api, alice, item["id"], "view", duration_s=2.5)
    await interact(api, alice, item["id"], "view")  # events: each one counts
    await interact(api, alice, item["id"], "rate", rating=4)
    await interact(api, alice, item["id"], "rate", rating=2)  # changes the rating
    r = await api.client.get(f"/v1/content/{item['id']}", headers=api.headers(bob))
    counts = r.json()["counts"]
    assert counts == {
        "views": 2,
        "likes": 1,
        "dislikes": 0,
        "downloads": 0,
        "shares": 0,
        "ratings": 1,
        "rating_mean": 2.0,
    }
    await interact(api, alice, item["id"], "dislike")  # replaces the like
    counts = (await api.client.get(f"/v1/content/{item['id']}", headers=api.headers(bob))).json()["counts"]
    assert (counts["likes"], counts["dislikes"]) == (0, 1)
    for body, field in (
        ({"content_id": item["id"], "type": "rate"}, "rating"),
        ({"content_id": item["id"], "type": "like", "rating": 3}, "rating"),
        ({"content_id": item["id"], "type": "rate", "rating": 6}, "rating"),
        ({"content_id": item["id"], "type": "like", "duration_s": 3}, "duration_s"),
        ({"content_id": item["id"], "type": "poke"}, "type"),
    ):
        r = await api.client.post("/v1/interactions", json=body, headers=api.headers(alice))
        assert r.status_code == 422 and field in r.text, (body, r.text)
    r = await api.client.post(
        "/v1/interactions", json={"content_id": "nope", "type": "like"}, headers=api.headers(alice)
    )
    assert r.status_code == 404
    # Reads: own only.
    assert (
        await api.client.get(f"/v1/interactions/{like['id']}", headers=api.headers(alice))
    ).status_code == 200
    assert (
        await api.client.get(f"/v1/interactions/{like['id']}", headers=api.headers(bob))
    ).status_code == 404
    r = await api.client.get("/v1/users/me/interactions", params={"limit": 2}, headers=api.headers(alice))
    page = r.json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    r = await api.client.get(
        "/v1/users/me/interactions", params={"cursor": page["next_cursor"]}, headers=api.headers(alice)
    )
    assert len(r.json()["items"]) == 2  # like/dislike (one state row), rate, two views = 4 rows
    r = await api.client.get("/v1/users/me/interactions", params={"type": "view"}, headers=api.headers(alice))
    assert [i["type"] for i in r.json()["items"]] == ["view", "view"]
    assert (await api.client.get("/v1/users/me/interactions", headers=api.headers(bob))).json()["items"] == []


async def test_recommendations_rows_feedback_refit_and_bola(api) -> None:
    creator = await api.user("creator")
    fans = [await api.user(f"fan{i}") for i in range(6)]
    items = [await upload(api, creator, f"item {i}", prompt=f"item {i}") for i in range(12)]
    # A community: fans like items 0-5, and the first fans also like items 6-7.
    for f, fan in enumerate(fans):
        for item in items[:6]:
            await interact(api, fan, item["id"], "like")
        if f < 3:
            await interact(api, fan, items[6]["id"], "like")
    admin = await api.user("root", role="admin")
    member = await api.user("member")
    assert (
        await api.client.post("/v1/recommendations/generate", headers=api.headers(member))
    ).status_code == 403
    r = await api.client.post("/v1/recommendations/generate", headers=api.headers(admin))
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["items"] == 12 and report["interactions"] == 39 and report["algorithm"].startswith("hybrid")

    # A fresh user: popular items first, none of their own.
    newbie = await api.user("newbie")
    r = await api.client.get("/v1/users/me/recommendations", params={"limit": 5}, headers=api.headers(newbie))
    assert r.status_code == 200, r.text
    recs = r.json()
    assert len(recs["items"]) == 5 and recs["algorithm"] == report["algorithm"]
    assert {i["content_id"] for i in recs["items"]} <= {item["id"] for item in items[:7]}
    assert all(i["reason"] == "popular" for i in recs["items"])
    assert recs["items"][0]["content"]["title"].startswith("item")
    # After likes: the liked items are gone from the rows (recomputed at once), never their own.
    mine = await upload(api, newbie, "newbie's own", prompt="mine")
    for item in items[:2]:
        await interact(api, newbie, item["id"], "like")
    r = await api.client.get(
        "/v1/users/me/recommendations", params={"limit": 50}, headers=api.headers(newbie)
    )
    got = [i["content_id"] for i in r.json()["items"]]
    assert got and not {items[0]["id"], items[1]["id"], mine["id"]} & set(got)
    assert len(got) == len(set(got))
    # New content is recommendable at once (appended to the fitted model).
    fresh = await upload(api, creator, "brand new", prompt="brand new")
    await interact(api, newbie, items[2]["id"], "view")
    r = await api.client.get(
        "/v1/users/me/recommendations", params={"limit": 50}, headers=api.headers(newbie)
    )
    assert fresh["id"] in [i["content_id"] for i in r.json()["items"]]
    # Feedback: stored, counted as an interaction, and the item leaves the list.
    first = r.json()["items"][0]
    r = await api.client.put(
        f"/v1/recommendations/{first['id']}/feedback", json={"feedback": "liked"}, headers=api.headers(newbie)
    )
    assert r.status_code == 200, r.text
    likes = await api.client.get(
        "/v1/users/me/interactions", params={"type": "like"}, headers=api.headers(newbie)
    )
    assert first["content_id"] in [i["content_id"] for i in likes.json()["items"]]
    r = await api.client.get(
        "/v1/users/me/recommendations", params={"limit": 50}, headers=api.headers(newbie)
    )
    assert first["content_id"] not in [i["content_id"] for i in r.json()["items"]]
    other = r.json()["items"][0]
    r = await api.client.put(
        f"/v1/recommendations/{other['id']}/feedback", json={"feedback": "meh"}, headers=api.headers(newbie)
    )
    assert r.status_code == 422 and "feedback" in r.text
    # BOLA: another user's recommendation and rows.
    r = await api.client.put(
        f"/v1/recommendations/{other['id']}/feedback",
        json={"feedback": "clicked"},
        headers=api.headers(member),
    )
    assert r.status_code == 404
    r = await api.client.get(f"/v1/users/{newbie['id']}/recommendations", headers=api.headers(member))
    assert r.status_code == 404
    r = await api.client.get(f"/v1/users/{newbie['id']}/recommendations", headers=api.headers(admin))
    assert r.status_code == 200
    # Deleted content disappears from the rows at once (cascade).
    await api.client.delete(f"/v1/content/{other['content_id']}", headers=api.headers(creator))
    r = await api.client.get(
        "/v1/users/me/recommendations", params={"limit": 50}, headers=api.headers(newbie)
    )
    assert other["content_id"] not in [i["content_id"] for i in r.json()["items"]]


@pytest.mark.slow
async def test_a_fresh_user_sees_recommendations_after_a_few_likes_through_triton(
    api_factory, triton, exported_repo
) -> None:
    """The demo flow (``make run``): content embedded by the served text encoder; a new user likes
    three red circles and is recommended the other red circles first."""
    api = await api_factory(
        triton_url=triton.grpc_url,
        text_tokenizer=exported_repo / "pipeline" / "1" / "assets" / "tokenizer.json",
    )
    creator, admin, user = (
        await api.user("creator"),
        await api.user("root", role="admin"),
        await api.user("new"),
    )
    prompts = [
        f"a {c} {s} on a {b} background"
        for c, s, b in (
            ("red", "circle", "white"),
            ("red", "circle", "white"),
            ("red", "circle", "white"),
            ("red", "circle", "white"),
            ("red", "circle", "white"),
            ("blue", "square", "yellow"),
            ("blue", "square", "yellow"),
            ("green", "triangle", "black"),
            ("green", "triangle", "black"),
            ("purple", "square", "orange"),
            ("yellow", "triangle", "blue"),
        )
    ]
    items = [await upload(api, creator, p, prompt=p) for p in prompts]
    services = api.app.state.services
    async with services.read_sessions() as session:
        from sqlalchemy import select

        from sfumato.control_plane.models import ContentItem

        embedded = (await session.scalars(select(ContentItem.embedding))).all()
    assert all(e is not None and len(e) == 64 * 4 for e in embedded)  # pooler_output, 64 floats
    assert (
        await api.client.post("/v1/recommendations/generate", headers=api.headers(admin))
    ).status_code == 200
    for item in items[:3]:
        await interact(api, user, item["id"], "like")
    r = await api.client.get("/v1/users/me/recommendations", params={"limit": 2}, headers=api.headers(user))
    assert r.status_code == 200, r.text
    top = r.json()["items"]
    assert {i["content_id"] for i in top} == {items[3]["id"], items[4]["id"]}, top
    assert top[0]["reason"] == "similar to content you liked"


async def test_the_scheduled_refit_writes_rows_and_ends_with_the_app(api_factory) -> None:
    """``SFUMATO_RECOMMEND_REFIT_INTERVAL_S``: the lifespan task refits on its own (rows appear for
    a user who never asked), and stops when the app does (the fixture's teardown awaits it)."""
    import asyncio
    import time

    from sqlalchemy import select

    from sfumato.control_plane.models import RecommenderState

    api = await api_factory(recommend_refit_interval_s=0.2)
    creator, fan = await api.user("creator"), await api.user("fan")
    items = [await upload(api, creator, f"item {i}", prompt=f"item {i}") for i in range(4)]
    await interact(api, fan, items[0]["id"], "like")
    services = api.app.state.services
    deadline = time.monotonic() + 120
    while True:
        async with services.read_sessions() as session:
            state = await session.get(RecommenderState, fan["id"])
            computed = (
                state is not None and state.computed_at is not None and state.computed_at >= state.changed_at
            )
        if computed:
            break
        assert time.monotonic() < deadline, "no scheduled refit within 120 s"
        await asyncio.sleep(0.1)
    async with services.read_sessions() as session:
        algorithm = await session.scalar(
            select(RecommenderState.algorithm).where(RecommenderState.user_id == fan["id"])
        )
    assert algorithm and algorithm.startswith("hybrid")


async def test_another_process_serves_with_the_saved_model(api_factory, tmp_path) -> None:
    """A refit saves the model in the object store; another replica (a second app on the same
    database and store) folds a user in against it instead of refitting."""
    store = f"file://{tmp_path / 'shared-store'}"
    first = await api_factory(storage_url=store)
    creator, admin, fan = (
        await first.user("creator"),
        await first.user("root", role="admin"),
        await first.user("fan"),
    )
    items = [await upload(first, creator, f"item {i}", prompt=f"item {i}") for i in range(5)]
    await interact(first, fan, items[0]["id"], "like")
    report = (await first.client.post("/v1/recommendations/generate", headers=first.headers(admin))).json()

    second = await api_factory(storage_url=store)
    await interact(second, fan, items[1]["id"], "like")  # stale: the next read recomputes
    r = await second.client.get("/v1/users/me/recommendations", headers=second.headers(fan))
    assert r.status_code == 200 and r.json()["algorithm"] == report["algorithm"]
    got = {i["content_id"] for i in r.json()["items"]}
    assert got == {item["id"] for item in items[2:]}
    assert second.app.state.services.recommender.fitted.model.version == report["algorithm"]


@pytest.mark.slow
async def test_items_published_while_triton_was_down_are_embedded_at_the_next_refit(
    api_factory, triton, exported_repo
) -> None:
    from sqlalchemy import select

    from sfumato.control_plane.models import ContentItem

    tokenizer = exported_repo / "pipeline" / "1" / "assets" / "tokenizer.json"
    down = await api_factory(text_tokenizer=tokenizer)  # Triton unreachable (127.0.0.1:1)
    creator = await down.user("creator")
    item = await upload(down, creator, "a red circle", prompt="a red circle on a white background")

    async def embedding(api) -> bytes | None:
        async with api.app.state.services.read_sessions() as session:
            return await session.scalar(select(ContentItem.embedding).where(ContentItem.id == item["id"]))

    assert await embedding(down) is None  # published all the same
    up = await api_factory(triton_url=triton.grpc_url, text_tokenizer=tokenizer)
    admin = await up.user("root", role="admin")
    assert (
        await up.client.post("/v1/recommendations/generate", headers=up.headers(admin))
    ).status_code == 200
    vector = await embedding(up)
    assert vector is not None and len(vector) == 64 * 4
