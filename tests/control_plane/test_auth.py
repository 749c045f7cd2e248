"""Who may call what, on SQLite and on PostgreSQL: API keys (malformed, wrong, revoked,
``last_used_at``), password login and JWTs (forged, expired, wrong audience / issuer / key /
algorithm), admin-only routes, one's own keys, object-level authorisation on every route that
takes an id, the settings' refusal of the development key, and ``sfumato admin create-key``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import ValidationError
from sqlalchemy import event

from sfumato.control_plane.settings import DEVELOPMENT_SECRET, Settings
from sfumato.errors import UsageError

from .problems import assert_problem

PROMPT = "a red circle on a white background"
KEY_PATTERN = re.compile(r"^sfm_[a-z0-9]{12}_[A-Za-z0-9_-]{43}$")
SECRET = "a-production-secret-key-0123456789-abcdefghijklmnop"


def assert_unauthorized(response: Any) -> dict[str, Any]:
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer"), response.headers
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def key_id(key: str) -> str:
    return key[len("sfm_") :].split("_", 1)[0]


# --------------------------------------------------------------------------- API keys


async def test_missing_malformed_wrong_and_revoked_keys_are_401(api) -> None:
    alice = await api.user("alice")
    protected = [
        ("GET", "/v1/generations"),
        ("POST", "/v1/generations"),
        ("GET", "/v1/generations/abc"),
        ("POST", "/v1/generations/abc/cancel"),
        ("DELETE", "/v1/generations/abc"),
        ("GET", "/v1/generations/abc/images/0"),
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("DELETE", "/v1/keys/abc"),
        ("GET", "/v1/users"),
        ("POST", "/v1/users"),
        ("POST", "/v1/users/abc/keys"),
    ]
    for method, path in protected:
        kwargs = {"json": {"prompt": PROMPT, "name": "x"}} if method == "POST" else {}
        assert_unauthorized(await api.client.request(method, path, **kwargs))

    lookup = key_id(alice["key"])
    wrong_secret = f"sfm_{lookup}_{'A' * 43}"
    unknown = f"sfm_{'z' * 12}_{alice['key'].rsplit('_', 1)[1]}"
    for header in (
        {"Authorization": f"Basic {base64.b64encode(b'alice:pw').decode()}"},
        {"Authorization": alice["key"]},  # no scheme
        bearer("sfm_short"),
        bearer(f"sfm_{lookup}"),
        bearer(f"sfm_{lookup}_"),
        bearer("not-a-key-nor-a-token"),
        bearer(wrong_secret),
        bearer(unknown),
    ):
        assert_unauthorized(await api.client.get("/v1/generations", headers=header))
    # Unknown id and wrong secret read the same: no oracle for which key ids exist.
    a = (await api.client.get("/v1/keys", headers=bearer(wrong_secret))).json()["detail"]
    b = (await api.client.get("/v1/keys", headers=bearer(unknown))).json()["detail"]
    assert a == b

    # Revoke: the key stops working at once; the user's other keys keep working.
    second = (await api.client.post("/v1/keys", json={"name": "spare"}, headers=api.headers(alice))).json()
    r = await api.client.delete(f"/v1/keys/{lookup}", headers=api.headers(alice))
    assert r.status_code == 204
    body = assert_unauthorized(await api.client.get("/v1/generations", headers=api.headers(alice)))
    assert "revoked" in body["detail"]
    assert (await api.client.get("/v1/generations", headers=bearer(second["key"]))).status_code == 200


async def test_last_used_at_is_written_in_batches_off_the_request_path(api_factory) -> None:
    api = await api_factory(key_usage_flush_s=0.1)
    alice = await api.user("alice")
    services = api.app.state.services
    r = await api.client.post("/v1/keys", json={"name": "ci"}, headers=api.headers(alice))
    new = r.json()
    assert r.status_code == 201 and new["last_used_at"] is None

    async def last_used() -> datetime | None:
        keys = (await api.client.get("/v1/keys", headers=api.headers(alice))).json()
        value = next(k for k in keys if k["id"] == new["id"])["last_used_at"]
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None

    assert await last_used() is None  # not used yet

    # Record which keys are written while the new key is used many times.
    written: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            rows = parameters if executemany else [parameters]
            written.extend(row[-1] for row in rows)  # WHERE api_keys.id = <the last parameter>

    event.listen(services.engine.sync_engine, "before_cursor_execute", record)
    try:
        before = datetime.now(UTC)
        for _ in range(20):
            assert (await api.client.get("/v1/generations", headers=bearer(new["key"]))).status_code == 200
        deadline = time.monotonic() + 30
        while (used := await last_used()) is None:
            assert time.monotonic() < deadline, "last_used_at was never written"
            await asyncio.sleep(0.05)
        assert before - timedelta(seconds=1) <= used <= datetime.now(UTC) + timedelta(seconds=1)
        # More uses within the resolution (a minute): nothing more to write.
        for _ in range(20):
            assert (await api.client.get("/v1/generations", headers=bearer(new["key"]))).status_code == 200
        await services.key_usage.flush(sessions=services.sessions)
    finally:
        event.remove(services.engine.sync_engine, "before_cursor_execute", record)
    # The new key was written exactly once however often it was used; alice's own key (used by
    # last_used()) at most once: the background flush may have written it before the listener.
    assert written.count(new["id"]) == 1, written
    alices = key_id(alice["key"])
    assert written.count(alices) <= 1 and set(written) <= {new["id"], alices}, written
    assert await last_used() == used


# --------------------------------------------------------------------------- passwords and JWTs


async def test_password_login_issues_a_usable_access_token(api) -> None:
    alice = await api.user("alice", password="correct horse battery")
    await api.user("nopassword")
    job = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    ).json()

    r = await api.client.post(
        "/v1/auth/token", json={"username": "alice", "password": "correct horse battery"}
    )
    assert r.status_code == 200, r.text
    grant = r.json()
    assert grant["token_type"] == "bearer" and grant["expires_in"] == api.settings.access_token_ttl_s
    secret = api.settings.secret_key.get_secret_value()
    claims = jwt.decode(
        grant["access_token"], secret, algorithms=["HS256"], audience="sfumato", issuer="sfumato"
    )
    assert claims["sub"] == alice["id"] and claims["exp"] - claims["iat"] == api.settings.access_token_ttl_s

    token = bearer(grant["access_token"])
    r = await api.client.get("/v1/generations", headers=token)
    assert r.status_code == 200 and [i["id"] for i in r.json()["items"]] == [job["id"]]
    r = await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=token)
    assert r.status_code == 202
    assert (await api.client.get(f"/v1/generations/{job['id']}", headers=token)).status_code == 200

    for body in (
        {"username": "alice", "password": "wrong horse"},
        {"username": "nobody", "password": "correct horse battery"},
        {"username": "nopassword", "password": "anything"},
    ):
        body = assert_unauthorized(await api.client.post("/v1/auth/token", json=body))
        assert "access_token" not in body
    r = await api.client.post("/v1/auth/token", json={"username": "alice", "password": "x", "scope": "all"})
    assert_problem(r, 422)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the throttle holds no rows
async def test_password_login_is_throttled_per_user_name(api) -> None:
    await api.user("alice", password="correct horse battery")
    for _ in range(10):
        r = await api.client.post("/v1/auth/token", json={"username": "alice", "password": "guess"})
        assert r.status_code == 401
    r = await api.client.post(
        "/v1/auth/token", json={"username": "alice", "password": "correct horse battery"}
    )
    assert_problem(r, 429)
    assert int(r.headers["retry-after"]) >= 1


def _unsigned(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_forged_expired_and_foreign_tokens_are_401(api) -> None:
    alice = await api.user("alice")
    now = datetime.now(UTC)
    good = {
        "sub": alice["id"],
        "role": "member",
        "aud": "sfumato",
        "iss": "sfumato",
        "iat": now,
        "exp": now + timedelta(minutes=5),
    }

    secret = api.settings.secret_key.get_secret_value()

    def signed(claims: dict[str, Any], key: str = secret, algorithm: str = "HS256") -> str:
        with warnings.catch_warnings():  # HS512 with a 53-byte key: PyJWT's key-length warning
            warnings.simplefilter("ignore")
            return jwt.encode(claims, key, algorithm=algorithm)

    # The control: a token made exactly like the service's own is accepted.
    assert (await api.client.get("/v1/keys", headers=bearer(signed(good)))).status_code == 200

    def without(name: str) -> dict[str, Any]:
        return {k: v for k, v in good.items() if k != name}

    valid = signed(good)
    header, payload, signature = valid.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    tampered_claims["sub"] = "someone-else"
    tampered = ".".join(
        [
            header,
            base64.urlsafe_b64encode(json.dumps(tampered_claims).encode()).decode().rstrip("="),
            signature,
        ]
    )
    forged = {
        "alg none": _unsigned(json.loads(json.dumps(good, default=lambda d: int(d.timestamp())))),
        "expired": signed(good | {"iat": now - timedelta(hours=2), "exp": now - timedelta(hours=1)}),
        "wrong audience": signed(good | {"aud": "someone-else"}),
        "wrong issuer": signed(good | {"iss": "evil"}),
        "another key": signed(good, key="another-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"),
        "another algorithm": signed(good, algorithm="HS512"),
        "no exp": signed(without("exp")),
        "no iat": signed(without("iat")),
        "no sub": signed(without("sub")),
        "no aud": signed(without("aud")),
        "not yet valid": signed(good | {"nbf": now + timedelta(hours=1)}),
        "unknown user": signed(good | {"sub": "0" * 32}),
        "tampered": tampered,
        "truncated": valid[:-5],
    }
    for why, token in forged.items():
        r = await api.client.get("/v1/keys", headers=bearer(token))
        assert r.status_code == 401, f"{why}: {r.status_code} {r.text}"
        assert_unauthorized(r)

    # The role comes from the user record, not from the token.
    r = await api.client.get("/v1/users", headers=bearer(signed(good | {"role": "admin"})))
    assert_problem(r, 403)


# --------------------------------------------------------------------------- roles and keys


async def test_admin_only_routes(api) -> None:
    admin, alice = await api.user("root", role="admin"), await api.user("alice")
    for method, path, body in [
        ("POST", "/v1/users", {"name": "mallory", "role": "admin"}),
        ("GET", "/v1/users", None),
        ("POST", f"/v1/users/{alice['id']}/keys", {"name": "x"}),
        ("POST", f"/v1/users/{admin['id']}/keys", {"name": "x"}),
    ]:
        r = await api.client.request(method, path, json=body, headers=api.headers(alice))
        assert_problem(r, 403)
        assert "key" not in r.json() and "mallory" not in r.text
    assert (
        await api.client.post("/v1/auth/token", json={"username": "mallory", "password": "x"})
    ).status_code == 401

    r = await api.client.post(
        "/v1/users", json={"name": "carol", "password": "long enough password"}, headers=api.headers(admin)
    )
    assert r.status_code == 201, r.text
    carol = r.json()
    assert carol["name"] == "carol" and carol["role"] == "member" and carol["disabled"] is False
    assert set(carol) == {"id", "name", "role", "created_at", "disabled"}  # no password hash
    r = await api.client.post(
        "/v1/auth/token", json={"username": "carol", "password": "long enough password"}
    )
    assert r.status_code == 200

    assert_problem(
        await api.client.post("/v1/users", json={"name": "carol"}, headers=api.headers(admin)), 409
    )
    for body, field in [
        ({"name": "bad name!"}, "name"),
        ({"name": "dave", "role": "owner"}, "role"),
        ({"name": "dave", "password": "short"}, "password"),
        ({"name": "dave", "admin": True}, "admin"),
    ]:
        problem = assert_problem(
            await api.client.post("/v1/users", json=body, headers=api.headers(admin)), 422
        )
        assert field in [e["field"] for e in problem["errors"]]

    r = await api.client.get("/v1/users", headers=api.headers(admin))
    assert r.status_code == 200
    assert {u["name"]: u["role"] for u in r.json()} == {"root": "admin", "alice": "member", "carol": "member"}

    r = await api.client.post(
        f"/v1/users/{carol['id']}/keys", json={"name": "svc"}, headers=api.headers(admin)
    )
    assert r.status_code == 201, r.text
    made = r.json()
    assert KEY_PATTERN.match(made["key"]) and made["user_id"] == carol["id"] and made["name"] == "svc"
    keys = (await api.client.get("/v1/keys", headers=bearer(made["key"]))).json()
    assert [(k["id"], k["user_id"]) for k in keys] == [(made["id"], carol["id"])]
    r = await api.client.post("/v1/users/nobody/keys", json={}, headers=api.headers(admin))
    assert_problem(r, 404)


async def test_a_member_creates_lists_and_revokes_own_keys(api) -> None:
    alice, bob, admin = await api.user("alice"), await api.user("bob"), await api.user("root", role="admin")
    r = await api.client.post("/v1/keys", json={"name": "laptop"}, headers=api.headers(alice))
    assert r.status_code == 201, r.text
    made = r.json()
    assert KEY_PATTERN.match(made["key"]) and made["id"] == key_id(made["key"])
    assert made["user_id"] == alice["id"] and made["name"] == "laptop" and made["revoked"] is False
    r = await api.client.post("/v1/keys", json={"name": "n" * 65}, headers=api.headers(alice))
    assert_problem(r, 422)

    keys = (await api.client.get("/v1/keys", headers=bearer(made["key"]))).json()
    assert {k["id"] for k in keys} == {key_id(alice["key"]), made["id"]}
    assert all("key" not in k for k in keys) and made["key"] not in json.dumps(keys)

    assert (await api.client.delete(f"/v1/keys/{made['id']}", headers=api.headers(alice))).status_code == 204
    assert (await api.client.delete(f"/v1/keys/{made['id']}", headers=api.headers(alice))).status_code == 204
    keys = {k["id"]: k for k in (await api.client.get("/v1/keys", headers=api.headers(alice))).json()}
    assert keys[made["id"]]["revoked"] is True and keys[key_id(alice["key"])]["revoked"] is False
    assert_unauthorized(await api.client.get("/v1/keys", headers=bearer(made["key"])))
    assert_problem(await api.client.delete("/v1/keys/nosuchkey123", headers=api.headers(alice)), 404)
    assert_problem(await api.client.delete(f"/v1/keys/{'k' * 17}", headers=api.headers(alice)), 422)

    # An admin may revoke anyone's key.
    bob_key = key_id(bob["key"])
    assert (await api.client.delete(f"/v1/keys/{bob_key}", headers=api.headers(admin))).status_code == 204
    assert_unauthorized(await api.client.get("/v1/keys", headers=api.headers(bob)))


async def test_another_users_ids_answer_404_on_every_route(api, complete_job) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    done = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    ).json()
    await complete_job(api, done["id"])
    queued = (
        await api.client.post("/v1/generations", json={"prompt": PROMPT}, headers=api.headers(alice))
    ).json()
    alice_key = key_id(alice["key"])

    def attempts(job_id: str, key: str) -> list[tuple[str, str]]:
        return [
            ("GET", f"/v1/generations/{job_id}"),
            ("GET", f"/v1/generations/{job_id}/images/0"),
            ("POST", f"/v1/generations/{job_id}/cancel"),
            ("DELETE", f"/v1/generations/{job_id}"),
            ("DELETE", f"/v1/keys/{key}"),
        ]

    for job_id in (done["id"], queued["id"]):
        theirs = attempts(job_id, alice_key)
        missing = attempts("0" * 32, "nosuchkey123")
        for (method, path), (_, missing_path) in zip(theirs, missing, strict=True):
            r = await api.client.request(method, path, headers=api.headers(bob))
            body = assert_problem(r, 404)
            assert PROMPT not in r.text and alice["id"] not in r.text and "params" not in body
            # Indistinguishable from an id that does not exist.
            twin = (await api.client.request(method, missing_path, headers=api.headers(bob))).json()
            assert body["title"] == twin["title"]
            assert (
                body["detail"].replace(job_id, "0" * 32).replace(alice_key, "nosuchkey123") == twin["detail"]
            )
    # Admin routes: a member is refused by role (403), never shown the other user.
    r = await api.client.post(f"/v1/users/{alice['id']}/keys", json={}, headers=api.headers(bob))
    assert_problem(r, 403)
    assert "alice" not in r.text

    # Nothing happened to alice's things.
    r = await api.client.get(f"/v1/generations/{queued['id']}", headers=api.headers(alice))
    assert r.status_code == 200 and r.json()["status"] == "queued"
    r = await api.client.get(f"/v1/generations/{done['id']}/images/0", headers=api.headers(alice))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    listed = (await api.client.get("/v1/generations", headers=api.headers(alice))).json()["items"]
    assert {i["id"] for i in listed} == {done["id"], queued["id"]}
    assert (await api.client.get("/v1/generations", headers=api.headers(bob))).json()["items"] == []
    keys = (await api.client.get("/v1/keys", headers=api.headers(alice))).json()
    assert [k["revoked"] for k in keys] == [False]


# --------------------------------------------------------------------------- settings and CLI


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SFUMATO_"):
            monkeypatch.delenv(name)


def _cli_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFUMATO_")}
    env.update(values)
    return env


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("sfumato")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sfumato.cli"]


def test_the_public_development_key_is_for_tests_only(clean_env, monkeypatch, tmp_path) -> None:
    for env in ("production", "development"):
        for name in ("secret_key", "triton_admin_key"):
            with pytest.raises(ValidationError, match="public development key"):
                Settings(env=env, **{name: DEVELOPMENT_SECRET})
    with pytest.raises(ValidationError, match="SFUMATO_SECRET_KEY"):
        Settings(env="production", secret_key="too-short")
    test = Settings(env="test", secret_key=DEVELOPMENT_SECRET)
    assert test.signing_key() == DEVELOPMENT_SECRET
    assert DEVELOPMENT_SECRET not in repr(test)  # a SecretStr, never printed

    monkeypatch.setenv("SFUMATO_ENV", "production")
    monkeypatch.setenv("SFUMATO_SECRET_KEY", DEVELOPMENT_SECRET)
    with pytest.raises(ValidationError, match="SFUMATO_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("SFUMATO_SECRET_KEY", SECRET)
    assert Settings().signing_key() == SECRET

    # The command line refuses too, with the reason and without a traceback.
    done = subprocess.run(
        [*_cli(), "admin", "create-key", "--user", "root"],
        env=_cli_env(
            SFUMATO_ENV="production", SFUMATO_SECRET_KEY=DEVELOPMENT_SECRET, SFUMATO_DATA_DIR=str(tmp_path)
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and done.stdout == ""
    assert "SFUMATO_SECRET_KEY" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "sfumato.db").exists()


def test_each_installation_generates_its_own_secrets(clean_env, tmp_path) -> None:
    one = Settings(data_dir=tmp_path / "one")
    keys = {name: getattr(one, name)() for name in ("signing_key", "triton_restricted_key")}
    for name, key in keys.items():
        assert len(key) >= 64 and key != DEVELOPMENT_SECRET, name
        assert getattr(Settings(data_dir=tmp_path / "one"), name)() == key, "not reused on restart"
        assert getattr(Settings(data_dir=tmp_path / "two"), name)() != key, "shared between installations"
    assert keys["signing_key"] != keys["triton_restricted_key"]
    for path in (tmp_path / "one" / "secrets").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (tmp_path / "one" / "secrets").stat().st_mode & 0o777 == 0o700

    # A key file that others can read is refused, not trusted.
    leaked = tmp_path / "one" / "secrets" / "jwt-signing-key"
    leaked.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        Settings(data_dir=tmp_path / "one").signing_key()


async def test_cli_create_key_prints_a_key_that_authenticates(api, database_url, tmp_path) -> None:
    env = _cli_env(
        SFUMATO_DATABASE_URL=database_url,
        SFUMATO_ENV="test",
        SFUMATO_SECRET_KEY=SECRET,
        SFUMATO_DATA_DIR=str(tmp_path / "cli"),
    )
    command = [*_cli(), "admin", "create-key", "--user", "root", "--role", "admin", "--name", "boot"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert done.stdout == f"{key}\n" and KEY_PATTERN.match(key), done.stdout  # the key alone

    # The app (another secret key: API keys do not depend on it) on the same database.
    r = await api.client.get("/v1/users", headers=bearer(key))  # admin-only
    assert r.status_code == 200, r.text
    assert [(u["name"], u["role"]) for u in r.json()] == [("root", "admin")]
    keys = (await api.client.get("/v1/keys", headers=bearer(key))).json()
    assert [(k["id"], k["name"]) for k in keys] == [(key_id(key), "boot")]

    # Again for the same user: a second key, not a second user.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() != key
    assert len((await api.client.get("/v1/users", headers=bearer(again.stdout.strip()))).json()) == 1
