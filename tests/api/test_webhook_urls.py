"""Webhook URL safety: which URLs are a 400 naming `url`, and where a POST really connects. A
name is resolved once per attempt and the connection goes to the address that was checked, with
the URL's host in the Host header and the TLS server name, whatever the name answers next (DNS
rebinding). Receivers are real servers on loopback addresses; no other address is connected to."""
from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from api.services import webhook_urls
from api.services.webhook_urls import UnsafeURL, check_url
from api.services.webhooks import REFUSED
from tests.api.conftest import ClientFactory
from tests.api.test_jobs_api import ALICE, KEYS
from tests.fixtures.s3 import _free_port as free_port
from tests.fixtures.servers import TLSReceiver, make_test_ca
from tests.fixtures.webhook_receiver import Receiver
from worker.webhook_http import post_webhook
from worker.webhooks import OutgoingPost, post

PUBLIC = "93.184.215.14"  # a public address: checked, never connected to (nothing POSTs here)
REBINDING_HOST = "hooks.rebind.test"


REFUSED_URLS = [
    ("ftp://example.com/hook", "http:// or https://"),
    ("http:///nohost", "http:// or https://"),
    ("http://10.1.2.3/hook", "non-public address 10.1.2.3"),
    ("http://169.254.169.254/latest/meta-data", "non-public address 169.254.169.254"),
    ("http://user:pw@example.com/", "credentials"),
    # IPv6 addresses that carry a non-public IPv4 one are judged by it, even with loopback
    # allowed: IPv4-compatible, NAT64, 6to4, Teredo (client 192.0.2.45), IPv4-mapped
    ("http://[::127.0.0.1]/hook", "non-public address ::7f00:1"),
    ("http://[64:ff9b::7f00:1]/hook", "non-public address 64:ff9b::7f00:1"),
    ("http://[64:ff9b::a9fe:a9fe]/hook", "non-public address 64:ff9b::a9fe:a9fe"),
    ("http://[2002:7f00:1::1]/hook", "non-public address 2002:7f00:1::1"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook", "non-public address"),
    ("http://[::ffff:127.0.0.1]/hook", "non-public address"),
    (f"http://{PUBLIC}:0/hook", "port must be 1-65535"),
    (f"http://{PUBLIC}:99999/hook", "not a valid URL"),
    (f"http://{PUBLIC}/ho\tok", "without spaces, tabs or control characters"),
    ("http://127.0.0.1\t.example.com/hook", "without spaces, tabs or control characters"),
    (f"http://{PUBLIC}/a b", "without spaces, tabs or control characters"),
]


def _assert_refused(client, url: str, fragment: str) -> None:
    answer = client.post("/v1/webhooks", json={"url": url}, headers=ALICE)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "url" and fragment in error["message"], error


@pytest.mark.parametrize("url, fragment", [
    *REFUSED_URLS, ("http://127.0.0.1:9/hook", "SPEFT_WEBHOOK_ALLOW_LOOPBACK")])
def test_unsafe_urls_are_a_400_naming_the_url(make_client: ClientFactory, url, fragment):
    _assert_refused(make_client(api_keys=KEYS), url, fragment)


@pytest.mark.parametrize("url, fragment", REFUSED_URLS)
def test_unsafe_urls_stay_refused_with_loopback_allowed(make_client: ClientFactory, url,
                                                        fragment):
    _assert_refused(make_client(api_keys=KEYS, webhook_allow_loopback=True), url, fragment)


def test_a_names_internal_answer_is_refused_without_showing_it(monkeypatch):
    monkeypatch.setattr(webhook_urls, "resolver", lambda host, port: [PUBLIC, "10.0.0.7"])
    with pytest.raises(UnsafeURL) as refused:
        check_url("https://internal.example/hook", allow_loopback=True)
    assert "non-public address" in str(refused.value) and "10.0.0.7" not in str(refused.value)


class RebindingResolver:
    """A name that answers `first` once and `then` ever after (a DNS rebinding attacker)."""

    def __init__(self, first: str, then: str) -> None:
        self.first, self.then, self.calls = first, then, 0

    def __call__(self, host: str, port: int) -> list[str]:
        assert host == REBINDING_HOST
        self.calls += 1
        return [self.first if self.calls == 1 else self.then]


@pytest.fixture
def loopback_allowed(monkeypatch):
    from api.core.config import get_settings

    monkeypatch.setenv("SPEFT_WEBHOOK_ALLOW_LOOPBACK", "true")
    monkeypatch.setenv("SPEFT_WEBHOOK_TIMEOUT_S", "5")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_a_post_connects_to_the_checked_address_when_the_name_rebinds(
        tmp_path: Path, monkeypatch, loopback_allowed):
    """The name answers 127.0.0.1 (checked) and then 127.0.0.2: the POST reaches 127.0.0.1 with
    the name in its Host header; the receiver on 127.0.0.2, same port, gets nothing."""
    port = free_port()
    checked = Receiver(port, tmp_path / "checked.jsonl", host="127.0.0.1").start()
    rebound = Receiver(port, tmp_path / "rebound.jsonl", host="127.0.0.2").start()
    resolver = RebindingResolver("127.0.0.1", "127.0.0.2")
    monkeypatch.setattr(webhook_urls, "resolver", resolver)
    try:
        status, error = post(OutgoingPost("msg-1", f"http://{REBINDING_HOST}:{port}/hooks?x=1",
                                          "whsec_" + "A" * 44, '{"type":"t"}'))
    finally:
        checked.stop()
        rebound.stop()
    assert (status, error) == (204, None)
    assert rebound.received() == []
    [got] = checked.received()
    assert got["headers"]["Host"] == f"{REBINDING_HOST}:{port}" and got["body"] == '{"type":"t"}'
    assert resolver.calls == 1


def test_a_name_that_answers_a_refused_address_is_not_connected_to(tmp_path: Path, monkeypatch):
    """Loopback not allowed: the name's loopback answer is refused, the attempt records no
    network detail, and the receiver listening there gets nothing."""
    receiver = Receiver(free_port(), tmp_path / "received.jsonl").start()
    monkeypatch.setattr(webhook_urls, "resolver", lambda host, port: ["127.0.0.1"])
    try:
        outcome = post(OutgoingPost("msg-1", f"http://{REBINDING_HOST}:{receiver.port}/hooks",
                                    "whsec_" + "A" * 44, "{}"))
    finally:
        receiver.stop()
    assert outcome == (None, REFUSED) and receiver.received() == []


def test_https_keeps_the_name_for_sni_the_certificate_and_the_host_header(
        tmp_path: Path, monkeypatch):
    """The name resolves to 127.0.0.1 where an HTTPS server holds a certificate for the name
    only: the handshake asks for the name (SNI), the certificate is checked against it, and the
    Host header carries it."""
    ca, cert, key = make_test_ca(tmp_path, REBINDING_HOST)
    trusting = ssl.create_default_context(cafile=str(ca))
    monkeypatch.setattr(webhook_urls, "resolver", RebindingResolver("127.0.0.1", "127.0.0.2"))
    with TLSReceiver(cert, key) as receiver:
        target = check_url(f"https://{REBINDING_HOST}:{receiver.port}/hooks",
                           allow_loopback=True)
        assert target.addresses == ("127.0.0.1",)
        status = post_webhook(target, headers={}, body=b"{}", timeout_s=10,
                              ssl_context=trusting)
    assert status == 204
    assert receiver.seen == [{"host": f"{REBINDING_HOST}:{receiver.port}",
                              "sni": REBINDING_HOST}]
