"""Client-side safety of the SDK and ``atr``, with no server: which local files an upload reads
(no symbolic link out of a directory, nothing but regular files, never past a file's size) and
which URLs a request goes to (its own server only, every id one encoded path segment)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from atrium_client import AsyncAtrium, Atrium, NotFound
from atrium_client._base import collect_files, local_files
from atrium_client._cli import upload
from rich.console import Console

from tests.support.sdk import uploaded_document

ATR = Path(sys.executable).parent / "atr"
SECRET = b"ATRIUM_API_KEY=atr_secret_never_uploaded"


def _layout(tmp_path: Path) -> Path:
    """A directory holding two regular files (one in a subdirectory) and everything that must
    not be read from it: links to a file outside and to ``/proc/self/environ``, a FIFO, a
    hidden ``.env``, a link to its parent directory and a link to an outside directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "readme.md").write_text("# Readme\n")
    (root / "sub" / "guide.md").write_text("# Guide\n")
    (root / "notes.md").symlink_to(outside / "secret.txt")
    (root / "env.txt").symlink_to("/proc/self/environ")
    os.mkfifo(root / "pipe.txt")
    (root / ".env").write_bytes(SECRET)
    (root / "linkdir").symlink_to("..")
    (root / "sub" / "elsewhere").symlink_to(outside, target_is_directory=True)
    return root


# Collecting files ------------------------------------------------------------------------------


def test_a_directory_yields_only_its_regular_files(tmp_path: Path) -> None:
    root = _layout(tmp_path)
    files = collect_files(root, None)
    assert [f.name for f in files] == ["readme.md", "sub/guide.md"]
    assert all(f.follow is False for f in files)
    assert [f.read() for f in files] == [b"# Readme\n", b"# Guide\n"]
    # atr upload collects through the same function.
    assert [f.name for f in upload.collect([root])] == ["readme.md", "sub/guide.md"]


def test_a_path_named_explicitly_may_be_a_link_but_must_be_a_regular_file(
    tmp_path: Path,
) -> None:
    root = _layout(tmp_path)
    # A link given by the caller is followed: they chose it.
    (linked,) = local_files(root / "notes.md")
    assert linked.name == "notes.md" and linked.read() == SECRET
    # A FIFO is refused without being opened (opening it would block).
    with pytest.raises(ValueError, match="Not a regular file"):
        collect_files(root / "pipe.txt", None)
    with pytest.raises(ValueError, match="Not a regular file"):
        upload.collect([root / "pipe.txt"])
    with pytest.raises(FileNotFoundError):
        local_files(root / "missing.md")
    # /proc reports a size of 0: nothing past it is read, so the environment is not sent.
    (environ,) = local_files("/proc/self/environ")
    assert environ.size == 0 and environ.read() == b""


def test_a_file_swapped_for_a_link_after_the_walk_is_not_followed(tmp_path: Path) -> None:
    root = _layout(tmp_path)
    readme = next(f for f in collect_files(root, None) if f.name == "readme.md")
    (root / "readme.md").unlink()
    (root / "readme.md").symlink_to(tmp_path / "outside" / "secret.txt")
    with pytest.raises(ValueError, match="symbolic link"):
        readme.read()
    (root / "readme.md").unlink()
    os.mkfifo(root / "readme.md")
    with pytest.raises(ValueError, match="Not a regular file"):
        readme.read()


def test_uploading_the_directory_sends_no_secret(tmp_path: Path) -> None:
    root = _layout(tmp_path)
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(201, json=uploaded_document())

    with _client(handler) as client:
        client.documents.upload("c", root)
        outcomes = upload.upload_all(
            client,
            "c",
            upload.collect([root]),
            parallel=2,
            console=Console(file=io.StringIO()),
        )
    assert [o.error for o in outcomes] == [None, None]
    sent = b"".join(bodies)
    assert b"readme.md" in sent and b"sub/guide.md" in sent
    assert SECRET not in sent and b"ATRIUM_" not in sent
    assert b"notes.md" not in sent and b"env.txt" not in sent and b"pipe.txt" not in sent


def test_atr_upload_refuses_a_fifo_and_a_directory_of_links(tmp_path: Path) -> None:
    root = _layout(tmp_path)
    only_links = tmp_path / "links"
    only_links.mkdir()
    (only_links / "notes.md").symlink_to(tmp_path / "outside" / "secret.txt")
    env = {
        **os.environ,
        "ATRIUM_URL": "http://127.0.0.1:9",
        "ATRIUM_API_KEY": "atr_test",
        "ATRIUM_TENANT": "t",
    }
    for target, message in (
        (root / "pipe.txt", "Not a regular file"),
        (only_links, "Nothing to upload"),
    ):
        r = subprocess.run(
            [str(ATR), "upload", str(target), "-c", "docs"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 2, r.stderr
        assert message in r.stderr


# Where requests go -----------------------------------------------------------------------------


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> Atrium:
    return Atrium(
        "http://atrium.test", api_key="k", tenant_id="t", transport=httpx.MockTransport(handler)
    )


@pytest.mark.parametrize(
    "path",
    ["https://evil.example/x", "//evil.example/x", "/\\evil.example/x", "v1/plans", ""],
)
async def test_request_refuses_anything_but_a_path_from_the_root(path: str) -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    with _client(handler) as client, pytest.raises(ValueError, match="Not a path"):
        client.request("GET", path)
    transport = httpx.MockTransport(handler)
    async with AsyncAtrium("http://atrium.test", api_key="k", transport=transport) as aclient:
        with pytest.raises(ValueError, match="Not a path"):
            await aclient.request("GET", path)
    assert sent == []


async def test_request_sends_a_root_path_to_the_base_url() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"ok": True})

    with _client(handler) as client:
        assert client.request("GET", "/v1/tenants/{tenant_id}/usage") == {"ok": True}
    transport = httpx.MockTransport(handler)
    async with AsyncAtrium(
        "http://atrium.test", api_key="k", tenant_id="a/b", transport=transport
    ) as aclient:
        await aclient.request("GET", "/v1/tenants/{tenant_id}/usage")
    assert [(u.host, u.raw_path) for u in seen] == [
        ("atrium.test", b"/v1/tenants/t/usage"),
        ("atrium.test", b"/v1/tenants/a%2Fb/usage"),
    ]


async def test_ids_are_encoded_as_one_path_segment() -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        if request.method == "DELETE" and b"/api-keys/" in request.url.raw_path:
            return httpx.Response(204)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    with _client(handler) as client:
        for call in (
            lambda: client.documents.get("c", "../../api-keys"),
            lambda: client.collections.get("x?admin=1#frag"),
            lambda: client.tenants.get("../users/me"),
        ):
            with pytest.raises(NotFound):
                call()
        client.api_keys.revoke("k/../../x")
        # "." and ".." would be resolved as steps up the path, and "" would name the listing.
        for bad in ("..", ".", ""):
            with pytest.raises(ValueError, match="Not a valid id"):
                client.documents.get("c", bad)
        client.tenant_id = ".."
        with pytest.raises(ValueError, match="Not a valid id"):
            client.usage()
    transport = httpx.MockTransport(handler)
    async with AsyncAtrium(
        "http://atrium.test", api_key="k", tenant_id="t", transport=transport
    ) as aclient:
        with pytest.raises(NotFound):
            await aclient.documents.reindex("a/b", "../x")
        with pytest.raises(ValueError, match="Not a valid id"):
            await aclient.collections.delete("..")
    assert seen == [
        b"/v1/tenants/t/collections/c/documents/..%2F..%2Fapi-keys",
        b"/v1/tenants/t/collections/x%3Fadmin%3D1%23frag",
        b"/v1/tenants/..%2Fusers%2Fme",
        b"/v1/tenants/t/api-keys/k%2F..%2F..%2Fx",
        b"/v1/tenants/t/collections/a%2Fb/documents/..%2Fx/reindex",
    ]
