"""The webhook SSRF guard: every address form that must be refused is refused, before any
connection, at submission where it can be seen then and when sending; names are resolved once
(a resolver stub at the resolver boundary: no DNS server for these names can run here) and the
connection goes to that address; the operator's allow-list is what lets http and private
receivers through. No database involved."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sfumato.control_plane import webhooks
from sfumato.control_plane.webhooks import Refused
from sfumato.errors import UsageError

from .conftest import make_settings
from .webhook_receiver import TLS_HOST, Receiver, resolver_stub

PUBLIC = "93.184.216.34"

# Written as an address: refused at submission already, and when sending (no lookup at all).
REFUSED_LITERALS = {
    "https://127.0.0.1/h": "loopback",
    "https://127.1/h": "loopback",  # short form
    "https://2130706433/h": "loopback",  # one 32-bit number
    "https://0x7f000001/h": "loopback",  # hex number
    "https://0x7f.0.0.1/h": "loopback",  # hex part
    "https://0177.0.0.1/h": "not a URL",  # octal part: httpx refuses to parse it at all
    "https://017700000001/h": "loopback",  # octal number
    "https://127.0.0.1.:8443/h": "loopback",  # trailing dot
    "https://[::1]/h": "loopback",
    "https://[::ffff:127.0.0.1]/h": "loopback",  # IPv4-mapped
    "https://[::ffff:7f00:1]/h": "loopback",  # IPv4-mapped, hex
    "https://[0:0:0:0:0:ffff:7f00:0001]/h": "loopback",
    "https://[::127.0.0.1]/h": "loopback",  # IPv4-compatible (deprecated)
    "https://[2002:7f00:1::]/h": "loopback",  # 6to4 of 127.0.0.1
    "https://[64:ff9b::a9fe:a9fe]/h": "metadata",  # NAT64 of 169.254.169.254
    "https://[::ffff:169.254.169.254]/h": "metadata",
    "https://169.254.169.254/latest/meta-data/": "metadata",
    "https://0xa9fea9fe/h": "metadata",  # 169.254.169.254 as one hex number
    "https://2852039166/h": "metadata",  # ... as one decimal number
    "https://[fd00:ec2::254]/h": "metadata",  # AWS IMDS over IPv6
    "https://100.100.100.200/h": "metadata",  # Alibaba
    "https://10.0.0.1/h": "private",
    "https://172.16.5.4/h": "private",
    "https://192.168.1.1/h": "private",
    "https://[::ffff:10.1.2.3]/h": "private",
    "https://[fc00::1]/h": "private",  # unique local
    "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/h": "private",  # Teredo, client 192.0.2.45
    "https://169.254.1.1/h": "link-local",
    "https://[fe80::1]/h": "link-local",
    "https://224.0.0.1/h": "multicast",
    "https://[ff02::1]/h": "multicast",
    "https://240.0.0.1/h": "reserved",
    "https://0.0.0.0/h": "unspecified",
    "https://[::]/h": "unspecified",
    "https://100.64.0.1/h": "globally routable",  # shared address space (carrier NAT)
    "https://192.0.2.1/h": "private",  # documentation (TEST-NET-1)
}


def settings(tmp_path: Path, **overrides: object):  # -> Settings
    return make_settings("sqlite+aiosqlite:///:memory:", tmp_path, **overrides)


@pytest.mark.parametrize(("url", "why"), REFUSED_LITERALS.items())
def test_address_literals_are_refused_at_submission(url: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        webhooks.check_target(url, settings(tmp_path))
    assert caught.value.field == "webhook"
    assert why in str(caught.value)


@pytest.mark.parametrize(("url", "why"), REFUSED_LITERALS.items())
async def test_address_literals_are_refused_when_sending(url: str, why: str, tmp_path: Path) -> None:
    calls: list = []
    outcome = await webhooks.send(
        url=url, body="{}", headers={}, settings=settings(tmp_path), resolver=resolver_stub({}, calls)
    )
    assert outcome.outcome == "refused" and why in (outcome.error or "")
    assert outcome.address is None and calls == []  # no lookup, no connection


def test_every_refused_form_is_read_as_the_address_it_means() -> None:
    assert webhooks.literal_address("2130706433") == ipaddress.ip_address("127.0.0.1")
    assert webhooks.literal_address("0x7f.1") == ipaddress.ip_address("127.0.0.1")
    assert webhooks.literal_address("0177.0.0.01") == ipaddress.ip_address("127.0.0.1")
    assert webhooks.literal_address("[::ffff:127.0.0.1]") == ipaddress.ip_address("::ffff:127.0.0.1")
    assert webhooks.literal_address("example.com") is None
    assert webhooks.literal_address("cafe.de") is None  # hex letters, but a name
    with pytest.raises(Refused):
        webhooks.literal_address("1.2.3.4.5")  # neither a name nor an address


@pytest.mark.parametrize(
    "url",
    ["https://localhost/h", "https://LOCALHOST./h", "https://api.localhost/h"],
)
def test_localhost_names_are_refused_at_submission(url: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="loopback name"):
        webhooks.check_target(url, settings(tmp_path))


@pytest.mark.parametrize(
    ("name", "answers", "why"),
    [
        ("internal.example.com", ["10.0.0.5"], "private"),
        ("127.0.0.1.nip.io", ["127.0.0.1"], "loopback"),
        ("metadata.google.internal", ["169.254.169.254"], "metadata"),
        ("v6.example.com", ["::1"], "loopback"),
        ("mapped.example.com", ["::ffff:192.168.0.1"], "private"),
        ("linklocal6.example.com", ["fe80::1%eth0"], "link-local"),
        ("mixed.example.com", [PUBLIC, "127.0.0.1"], "loopback"),  # one bad answer spoils the name
        ("multicast.example.com", ["239.1.1.1"], "multicast"),
    ],
)
async def test_names_resolving_to_refused_addresses_are_refused(
    name: str, answers: list[str], why: str, tmp_path: Path
) -> None:
    webhooks.check_target(f"https://{name}/h", settings(tmp_path))  # a name passes submission
    calls: list = []
    outcome = await webhooks.send(
        url=f"https://{name}/h",
        body="{}",
        headers={},
        settings=settings(tmp_path),
        resolver=resolver_stub({name: answers}, calls),
    )
    assert outcome.outcome == "refused" and why in (outcome.error or ""), outcome
    assert calls == [(name, 443)]
    assert answers[-1] not in (outcome.error or "")  # the user is not told what a name resolves to


async def test_a_name_that_does_not_resolve_is_refused(tmp_path: Path) -> None:
    outcome = await webhooks.send(
        url="https://nowhere.example.com/h",
        body="{}",
        headers={},
        settings=settings(tmp_path),
        resolver=resolver_stub({}),
    )
    assert outcome.outcome == "refused" and "does not resolve" in (outcome.error or "")


async def test_a_public_name_resolves_once_and_pins_its_address(tmp_path: Path) -> None:
    target = webhooks.parse_target("https://hooks.example.com/h", allowed_hosts=[])
    calls: list = []
    address = await webhooks.pin_address(
        target, resolver=resolver_stub({"hooks.example.com": [PUBLIC]}, calls)
    )
    assert str(address) == PUBLIC and calls == [("hooks.example.com", 443)]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://hooks.example.com/h", "must be https"),
        ("ftp://hooks.example.com/h", "https://"),
        ("https://user:secret@hooks.example.com/h", "credentials"),
        ("https://hooks.example.com/h#frag", "fragment"),
        ("https:///h", "no host"),
        ("hooks.example.com/h", "https://"),
        ("https://hooks.example.com/h\nx", "control characters"),
    ],
)
def test_bad_urls_are_refused_naming_the_field(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        webhooks.check_target(url, settings(tmp_path))
    assert caught.value.field == "webhook"


def test_the_operators_list_allows_http_and_private_receivers(tmp_path: Path) -> None:
    allowed = settings(tmp_path, webhook_allowed_hosts="hooks.internal,10.0.0.7")
    webhooks.check_target("http://hooks.internal:8080/h", allowed)
    webhooks.check_target("http://10.0.0.7/h", allowed)
    with pytest.raises(UsageError):
        webhooks.check_target("http://10.0.0.8/h", allowed)  # not listed
    with pytest.raises(UsageError):
        webhooks.check_target("http://hooks.example.com/h", allowed)  # public, but http


async def test_pinned_connection_goes_to_the_resolved_address_with_the_urls_host(tmp_path: Path) -> None:
    """A listed name resolved (once) to the local receiver: the request reaches it, with the
    URL's host in ``Host``, and no second lookup happens."""
    receiver = await Receiver().start()
    try:
        calls: list = []
        outcome = await webhooks.send(
            url=f"http://hooks.internal:{receiver.port}/pinned",
            body='{"a":1}',
            headers={"webhook-id": "msg_x"},
            settings=settings(tmp_path, webhook_allowed_hosts=["hooks.internal"]),
            resolver=resolver_stub({"hooks.internal": ["127.0.0.1"]}, calls),
        )
    finally:
        await receiver.stop()
    assert outcome.outcome == "delivered" and outcome.address == "127.0.0.1", outcome
    assert calls == [("hooks.internal", receiver.port)]
    (request,) = receiver.requests
    assert request.path == "/pinned" and request.headers["host"] == f"hooks.internal:{receiver.port}"
    assert request.body == b'{"a":1}' and request.headers["webhook-id"] == "msg_x"


async def test_https_is_pinned_and_still_verified_against_the_host_name(tmp_path: Path) -> None:
    """TLS to the pinned address: SNI and certificate verification use the URL's name (the
    certificate names only the host, no IP); a certificate for another name is refused."""
    import ssl

    receiver = await Receiver().start(tls_dir=tmp_path / "tls")
    try:
        context = ssl.create_default_context(cafile=str(receiver.ca_file))
        listed = settings(tmp_path, webhook_allowed_hosts=[TLS_HOST, "other.sfumato.test"])
        resolver = resolver_stub({TLS_HOST: ["127.0.0.1"], "other.sfumato.test": ["127.0.0.1"]})
        good = await webhooks.send(
            url=f"https://{TLS_HOST}:{receiver.port}/tls",
            body="{}",
            headers={},
            settings=listed,
            resolver=resolver,
            ssl_context=context,
        )
        wrong_name = await webhooks.send(
            url=f"https://other.sfumato.test:{receiver.port}/tls",
            body="{}",
            headers={},
            settings=listed,
            resolver=resolver,
            ssl_context=context,
        )
    finally:
        await receiver.stop()
    assert good.outcome == "delivered", good
    assert wrong_name.outcome == "connection_error" and "CERTIFICATE" in (wrong_name.error or "").upper()
    assert receiver.paths() == ["/tls"]
