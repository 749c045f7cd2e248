"""Rate limits shared across replicas through Redis (``SFUMATO_REDIS_URL``)."""

from __future__ import annotations

import redis


async def test_two_replicas_share_one_limit_through_redis(api_factory) -> None:
    url = "redis://127.0.0.1:6379/0"
    redis.Redis.from_url(url).ping()  # the project's Redis; .ci/run starts it when it is down
    first = await api_factory(redis_url=url, rate_limit="4/minute")
    second = await api_factory(redis_url=url, rate_limit="4/minute")
    alice = await first.user("alice")  # both replicas share the database, so the key works on both
    codes = []
    for replica in (first, second, first, second, first):
        response = await replica.client.get("/v1/generations", headers=replica.headers(alice))
        codes.append(response.status_code)
    assert codes == [200, 200, 200, 200, 429]
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["content-type"] == "application/problem+json"


async def test_in_memory_limits_are_per_replica(api_factory) -> None:
    first = await api_factory(rate_limit="2/minute")
    second = await api_factory(rate_limit="2/minute")
    alice = await first.user("alice")
    codes = [
        (await replica.client.get("/v1/generations", headers=replica.headers(alice))).status_code
        for replica in (first, first, second, second, first)
    ]
    assert codes == [200, 200, 200, 200, 429]
