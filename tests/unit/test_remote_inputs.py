"""--fetch-allow's fetcher against a real HTTP server on 127.0.0.1: the prefix check after normalisation, the
redirects, the size cap, the deadline, the messages, and the LoRA cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.contract.errors import InvalidParameter
from server.declarations.errors import APIError
from server.declarations.settings import Settings
from server.declarations.settings_loading import load_settings
from server.front.remote_inputs import fetch_allowed, fetch_lora, fetch_loras, shown
from tests.damaged_loras import valid_lora
from tests.origin import Origin, serving

MiB = 2**20


@pytest.fixture()
def origin() -> Iterator[Origin]:
    with serving() as served:
        yield served


def settings(origin: Origin, tmp_path: Path, **extra: float) -> Settings:
    """Settings that allow the origin's /files/, with a 1 MiB cap."""
    return Settings(fetch_allow=[f"{origin.url}/files/"], weights_dir=tmp_path, fetch_max_mb=1, **extra)


def refused(call, *args: object) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as caught:
        call(*args)
    return caught.value


def test_an_allowed_url_is_fetched_and_redirects_on_the_list_are_followed(
    origin: Origin, tmp_path: Path
) -> None:
    origin.routes["/files/a.bin"] = (200, {}, b"hello")
    origin.routes["/files/hop"] = (302, {"Location": "a.bin"}, b"")
    origin.routes["/files/Hop2"] = (307, {"Location": f"{origin.url.upper()}/files/hop"}, b"")
    assert fetch_allowed(f"{origin.url}/files/a.bin", "image_prompt", settings(origin, tmp_path)) == b"hello"
    assert fetch_allowed(f"{origin.url}/files/Hop2", "image_prompt", settings(origin, tmp_path)) == b"hello"
    # A dot segment that stays under the prefix is resolved before the request is sent.
    assert (
        fetch_allowed(f"{origin.url}/files/x/../a.bin", "image_prompt", settings(origin, tmp_path))
        == b"hello"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/secret",
        "/files/../secret",
        "/files/%2e%2e/secret",
        "/files/..%2Fsecret",
        "/files-evil/a.bin",
        "/FILES/a.bin",
    ],
)
def test_a_url_off_the_list_once_normalised_is_refused_unfetched(
    origin: Origin, tmp_path: Path, path: str
) -> None:
    error = refused(fetch_allowed, f"{origin.url}{path}", "image_prompt", settings(origin, tmp_path))
    assert error.param == "image_prompt" and "--fetch-allow" in error.message
    assert not origin.gets


def test_credentials_and_other_hosts_are_refused(origin: Origin, tmp_path: Path) -> None:
    host = origin.url.removeprefix("http://")
    for url in (
        f"http://{host}@localhost:1/files/a.bin",  # userinfo: the host is what follows the '@'
        f"http://user:hunter2@{host}/files/a.bin",
        f"ftp://{host}/files/a.bin",
        f"http://localhost:{host.split(':')[1]}/files/a.bin",
    ):
        error = refused(fetch_allowed, url, "loras", settings(origin, tmp_path))
        assert error.param == "loras" and "hunter2" not in error.message
    assert not origin.gets


def test_a_redirect_off_the_list_is_not_followed(origin: Origin, tmp_path: Path) -> None:
    origin.routes["/files/away"] = (302, {"Location": "/secret?token=s3cret"}, b"")
    origin.routes["/secret?token=s3cret"] = (200, {}, b"private")
    error = refused(fetch_allowed, f"{origin.url}/files/away", "loras", settings(origin, tmp_path))
    assert "a redirect from" in error.message and "s3cret" not in error.message
    assert origin.gets == Counter({"/files/away": 1})


def test_a_redirect_loop_ends(origin: Origin, tmp_path: Path) -> None:
    origin.routes["/files/loop"] = (302, {"Location": "/files/loop"}, b"")
    error = refused(fetch_allowed, f"{origin.url}/files/loop", "loras", settings(origin, tmp_path))
    assert "redirects more than" in error.message


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_past_the_cap_is_refused(origin: Origin, tmp_path: Path, chunked: bool) -> None:
    # Chunked: no Content-Length to refuse it by, the count of the streamed bytes stops it.
    headers = {"Transfer-Encoding": "chunked"} if chunked else {}
    origin.routes["/files/big"] = (200, headers, b"x" * (MiB + 1))
    error = refused(fetch_allowed, f"{origin.url}/files/big", "loras", settings(origin, tmp_path))
    assert error.param == "loras" and "1 MiB" in error.message
    origin.routes["/files/fits"] = (200, headers, b"x" * MiB)
    assert len(fetch_allowed(f"{origin.url}/files/fits", "loras", settings(origin, tmp_path))) == MiB
    # A caller's own, smaller limit (an image's, say) holds as well.
    error = refused(
        fetch_allowed, f"{origin.url}/files/fits", "image_prompt", settings(origin, tmp_path), MiB // 2
    )
    assert error.param == "image_prompt" and "0.5 MiB" in error.message


def test_an_error_status_and_a_stall_are_400s_without_the_query(origin: Origin, tmp_path: Path) -> None:
    error = refused(fetch_allowed, f"{origin.url}/files/none?sig=s3cret", "loras", settings(origin, tmp_path))
    assert "HTTP 404" in error.message and "s3cret" not in error.message
    error = refused(
        fetch_allowed, f"{origin.url}/files/stall", "loras", settings(origin, tmp_path, fetch_timeout_s=0.3)
    )
    assert "took longer than 0.3 s" in error.message


def test_without_an_allow_list_no_url_is_fetched(origin: Origin, tmp_path: Path) -> None:
    error = refused(
        fetch_allowed, f"{origin.url}/files/a.bin", "image_prompt", Settings(weights_dir=tmp_path)
    )
    assert error.param == "image_prompt" and "allows none (--fetch-allow)" in error.message
    assert not origin.gets


def test_a_lora_is_fetched_once_into_the_cache_and_broken_bytes_are_not_kept(
    origin: Origin, tmp_path: Path
) -> None:
    lora = valid_lora()
    origin.routes["/files/style.safetensors?v=1"] = (200, {}, lora)
    url = f"{origin.url}/files/style.safetensors?v=1"
    name, path = fetch_lora(url, settings(origin, tmp_path))
    assert name == f"{origin.url}/files/style.safetensors" and path.read_bytes() == lora
    assert path.parent == tmp_path / "loras" / ".cache"
    assert fetch_loras(["local-style", url], settings(origin, tmp_path)) == {url: (name, path)}
    assert origin.gets == Counter({"/files/style.safetensors?v=1": 1})

    origin.routes["/files/broken.safetensors"] = (200, {}, b"\xff" * 64)
    error = refused(fetch_lora, f"{origin.url}/files/broken.safetensors", settings(origin, tmp_path))
    assert error.param == "loras" and "not a valid safetensors file" in error.message
    assert list(path.parent.iterdir()) == [path]


def test_the_allow_list_comes_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = ["--fetch-allow", "https://a.lan/x/", "--fetch-allow", "http://b.lan:81/"]
    assert load_settings(flags).fetch_allow == ["https://a.lan/x/", "http://b.lan:81/"]
    monkeypatch.setenv("FLUXD_FETCH_ALLOW", "https://a.lan/x/, http://b.lan:81/")
    assert load_settings([]).fetch_allow == ["https://a.lan/x/", "http://b.lan:81/"]


@pytest.mark.parametrize(
    ("url", "text"),
    [
        (
            "https://ops:hunter2@files.lan:8443/a/b.safetensors?sig=s3cret#x",
            "https://files.lan:8443/a/b.safetensors",
        ),
        ("http://[::1]:9000/a", "http://[::1]:9000/a"),
        ("http://files.lan:99999/a", "the URL"),
        ("not a url", "the URL"),
    ],
)
def test_a_url_is_shown_without_credentials_query_or_fragment(url: str, text: str) -> None:
    assert shown(url) == text


def test_a_lora_the_disk_cannot_keep_is_a_503_naming_the_reason_not_the_folder(
    origin: Origin, tmp_path: Path
) -> None:
    origin.routes["/files/style.safetensors"] = (200, {}, valid_lora())
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / ".cache").write_text("a file where the cache folder would go")
    with pytest.raises(APIError) as caught:
        fetch_lora(f"{origin.url}/files/style.safetensors", settings(origin, tmp_path))
    error = caught.value
    assert (error.status, error.code, error.param) == (503, "storage_unavailable", "loras")
    assert "File exists" in error.message or "Not a directory" in error.message
    assert str(tmp_path) not in error.message
