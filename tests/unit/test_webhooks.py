"""Webhook signing as the Standard Webhooks spec defines it, the allow-list, and the Prefer header."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook
from starlette.requests import Request

from pipelines.contract.errors import InvalidParameter
from server.declarations.settings_loading import load_settings
from server.declarations.webhook_targets import secret_key
from server.jobs.headers import wants_async
from server.jobs.webhooks import Webhooks, sign

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
ALLOW = ["https://hooks.lan:9000/fluxd", "http://127.0.0.1:8765/"]


def test_signature_matches_the_specs_example() -> None:
    # The example of the Standard Webhooks spec (and of its reference libraries' tests).
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specs_library_verifies_the_headers() -> None:
    body = b'{"type": "image.job.succeeded", "data": {"id": "job_x"}}'
    headers = Webhooks(ALLOW, SECRET).headers("job_x", body)
    assert headers["webhook-id"] == "job_x" and headers["webhook-timestamp"].isdigit()
    assert Webhook(SECRET).verify(body, headers)["data"]["id"] == "job_x"
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body + b" ", headers)


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()])
def test_a_bad_secret_is_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        secret_key(secret)


def test_a_secret_without_its_prefix_is_the_same_key() -> None:
    assert secret_key(SECRET) == secret_key(SECRET.removeprefix("whsec_")) == bytes(range(32))


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.lan:9000/fluxd",
        "https://hooks.lan:9000/fluxd/",
        "https://HOOKS.lan:9000/fluxd/done?x=1",
        "http://127.0.0.1:8765/anything",
        "http://127.0.0.1:8765",
    ],
)
def test_urls_under_an_allowed_prefix_pass(url: str) -> None:
    Webhooks(ALLOW, SECRET).check(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.lan:9000/fluxd-evil",  # a path prefix stops at a '/'
        "https://hooks.lan:9000/other",
        "https://hooks.lan/fluxd",  # another port
        "http://hooks.lan:9000/fluxd",  # another scheme
        "https://hooks.lan.evil.com:9000/fluxd",  # not a text prefix match
        "https://user:pw@hooks.lan:9000/fluxd",
        "http://127.0.0.1:8766/",
        "http://localhost:8765/",
        "http://127.0.0.1:notaport/",
        "ftp://127.0.0.1:8765/",
        "not a url",
        # Dot segments and escapes that would climb out of a prefix once normalised (RFC 3986), or once a
        # receiver decodes an escaped separator:
        "https://hooks.lan:9000/fluxd/../admin",
        "https://hooks.lan:9000/fluxd/%2e%2E/admin",
        "https://hooks.lan:9000/fluxd/./a/../../admin",
        "https://hooks.lan:9000/fluxd/..%2Fadmin",
        "https://hooks.lan:9000/fluxd/..%5cadmin",
        "https://hooks.lan:9000/fluxd\\..\\admin",
        "https://hooks.lan:9000/fluxd/%zz",
        "https://hooks.lan:9000/fluxd/a b",
    ],
)
def test_other_urls_are_a_400_naming_webhook_url(url: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        Webhooks(ALLOW, SECRET).check(url)
    assert info.value.param == "webhook_url"


def test_an_empty_allow_list_refuses_every_webhook() -> None:
    with pytest.raises(InvalidParameter, match="no webhook"):
        Webhooks([], None).check("http://127.0.0.1:8765/")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXD_WEBHOOK_ALLOW", "http://a:1/x, http://b:2/")
    monkeypatch.setenv("FLUXD_WEBHOOK_SECRET", SECRET)
    assert load_settings([]).webhook_allow == ["http://a:1/x", "http://b:2/"]
    monkeypatch.delenv("FLUXD_WEBHOOK_SECRET")
    with pytest.raises(ValidationError, match="webhook_secret"):
        load_settings([])
    with pytest.raises(ValidationError, match="webhook_secret"):
        load_settings(["--webhook-secret", "whsec_???"])
    with pytest.raises(ValueError, match=r"entry 'hooks\.lan/x'"):
        Webhooks(["hooks.lan/x"], SECRET)


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://hooks.lan:9000/fluxd/a/../b", "https://hooks.lan:9000/fluxd/b"),
        ("HTTPS://Hooks.LAN:9000/fluxd/./%7Euser?q=%2f", "https://hooks.lan:9000/fluxd/~user?q=%2F"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765/"),
        ("http://127.0.0.1:8765/é#fragment", "http://127.0.0.1:8765/%C3%A9"),
    ],
)
def test_the_url_compared_is_the_normal_one_and_the_one_sent(url: str, sent: str) -> None:
    import httpx

    assert Webhooks(ALLOW, SECRET).check(url) == sent
    assert str(httpx.URL(sent)) == sent


def test_allow_entries_are_normalised_and_a_bad_one_masks_its_password() -> None:
    webhooks = Webhooks(["https://hooks.lan/a/../fluxd/"], SECRET)
    assert webhooks.check("https://hooks.lan/fluxd/x") == "https://hooks.lan/fluxd/x"
    with pytest.raises(ValueError, match=r"https://\*\*\*@hooks") as info:
        Webhooks(["https://user:hunter2@hooks.lan/x"], SECRET)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], False),
        ([(b"prefer", b"respond-async")], True),
        ([(b"prefer", b"return=minimal, Respond-Async; x=1, wait=10")], True),
        ([(b"prefer", b"return=minimal"), (b"prefer", b"respond-async")], True),
        ([(b"prefer", b"respond-asynchronously")], False),
        ([(b"x-prefer", b"respond-async")], False),
    ],
)
def test_prefer_respond_async_as_rfc_7240_writes_it(headers: list, expected: bool) -> None:
    assert wants_async(Request({"type": "http", "headers": headers})) is expected


def test_a_stored_url_the_list_no_longer_admits_is_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    # Port 9 (discard) is never tried: the URL is refused before any connection, and the log says why.
    webhooks = Webhooks(["http://127.0.0.1:9/other"], SECRET)
    assert not asyncio.run(webhooks.deliver("job_x", "http://127.0.0.1:9/hooks/x", b"{}"))
    assert "not under --webhook-allow" in caplog.text and "try 1" not in caplog.text
