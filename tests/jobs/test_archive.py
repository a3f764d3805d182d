"""Job archives: zip and tar extraction, every refusal, HTTP fetching and reproducible zips."""

from __future__ import annotations

import base64
import functools
import gzip
import http.server
import io
import socket
import stat
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from helpers import serve_http
from lastlayer.errors import DataError, StorageError, UsageError
from lastlayer.jobs import archive, members

POETS = {
    "dcos-tensorflow-demos-master/README.md": b"# demos\n",
    "dcos-tensorflow-demos-master/poets/poets.py": b"import retrain\n",
    "dcos-tensorflow-demos-master/poets/retrain.py": b"def main():\n    pass\n" * 50,
}


def zip_bytes(members: dict[str, bytes], *, modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if modes and name in modes:
                info.create_system = 3
                info.external_attr = modes[name] << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for member in members:
            if isinstance(member, tuple):
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tf.addfile(info, io.BytesIO(member[1]))
            else:
                tf.addfile(member)
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refused(tmp_path: Path, data: bytes, **kwargs: object) -> str:
    """Extract ``data`` expecting a refusal; checks that nothing is left behind."""
    url = write(tmp_path, "job.bin", data)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    dest = out / "job"
    with pytest.raises(DataError) as info:
        archive.fetch_and_extract(url, dest, **kwargs)  # type: ignore[arg-type]
    assert leftovers(out) == []  # no dest, no temporary folder
    assert "\n" not in str(info.value)
    return str(info.value)


# --- extraction ----------------------------------------------------------------------------------


def test_zip_is_extracted_with_folders_and_modes(tmp_path: Path):
    members = {"top/": b"", **POETS, "top/run.sh": b"#!/bin/sh\n"}
    url = write(tmp_path, "master.zip", zip_bytes(members, modes={"top/run.sh": stat.S_IFREG | 0o755}))
    names = archive.fetch_and_extract(url, tmp_path / "job")
    assert names == ["top/", *POETS, "top/run.sh"]
    for name, data in POETS.items():
        assert (tmp_path / "job" / name).read_bytes() == data
        assert stat.S_IMODE((tmp_path / "job" / name).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "job" / "top" / "run.sh").stat().st_mode) == 0o755
    assert leftovers(tmp_path) == ["job", "master.zip"]


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w:"])
def test_tar_is_extracted_whatever_its_compression(tmp_path: Path, mode: str):
    data = tar_bytes([*POETS.items(), link("dcos-tensorflow-demos-master/poets/main.py", "poets.py")], mode)
    url = write(tmp_path, "job.zip", data)  # the name says zip: content decides
    names = archive.fetch_and_extract(f"file://{url}", tmp_path / "job")
    assert names == [*POETS, "dcos-tensorflow-demos-master/poets/main.py"]
    poets = tmp_path / "job" / "dcos-tensorflow-demos-master" / "poets"
    assert (poets / "main.py").is_symlink() and (poets / "main.py").read_bytes() == b"import retrain\n"


def test_tar_hard_links_and_root_entries(tmp_path: Path):
    root = tarfile.TarInfo("./")
    root.type = tarfile.DIRTYPE
    data = tar_bytes([root, ("./a/x.txt", b"x" * 10), link("./a/y.txt", "a/x.txt", tarfile.LNKTYPE)])
    names = archive.fetch_and_extract(write(tmp_path, "t.tgz", data), tmp_path / "job")
    assert names == ["a/x.txt", "a/y.txt"]
    assert (tmp_path / "job" / "a" / "y.txt").read_bytes() == b"x" * 10


def test_an_empty_destination_is_used_and_a_full_one_refused_unless_replaced(tmp_path: Path):
    url = write(tmp_path, "j.zip", zip_bytes(POETS))
    (tmp_path / "job").mkdir()
    archive.fetch_and_extract(url, tmp_path / "job")
    with pytest.raises(UsageError, match="it exists and is not an empty folder"):
        archive.fetch_and_extract(url, tmp_path / "job")
    (tmp_path / "job" / "stale.txt").write_text("old")
    url2 = write(tmp_path, "j2.zip", zip_bytes({"new.txt": b"new"}))
    assert archive.fetch_and_extract(url2, tmp_path / "job", replace=True) == ["new.txt"]
    assert leftovers(tmp_path / "job") == ["new.txt"]
    assert leftovers(tmp_path) == ["j.zip", "j2.zip", "job"]


# --- refusals ------------------------------------------------------------------------------------


def test_zip_slip_is_refused(tmp_path: Path):
    message = refused(tmp_path, zip_bytes({"ok.txt": b"1", "../x": b"evil"}))
    assert message.endswith(
        "member '../x' has a '..' part that would write outside the destination; "
        "refused (repack the archive without it)"
    )
    assert not (tmp_path / "x").exists()
    message = refused(tmp_path, tar_bytes([("a/../../x", b"evil")]))
    assert "member 'a/../../x' has a '..' part" in message


def test_absolute_paths_are_refused(tmp_path: Path):
    assert "member '/etc/x' has an absolute path; refused" in refused(tmp_path, zip_bytes({"/etc/x": b"1"}))
    assert "member '/etc/x' has an absolute path" in refused(tmp_path, tar_bytes([("/etc/x", b"1")]))
    assert "member 'C:/x' has an absolute path" in refused(tmp_path, zip_bytes({"C:/x": b"1"}))


def test_links_leaving_the_tree_are_refused(tmp_path: Path):
    message = refused(tmp_path, tar_bytes([("a.txt", b"1"), link("passwd", "/etc/passwd")]))
    assert message.endswith(
        "member 'passwd' is a symbolic link to '/etc/passwd', outside the extracted tree; "
        "refused (links in a job archive must stay inside it)"
    )
    assert "symbolic link to '../../x'" in refused(tmp_path, tar_bytes([link("a/b", "../../x")]))
    assert "hard link to '/etc/passwd', which is not a file earlier" in refused(
        tmp_path, tar_bytes([link("h", "/etc/passwd", tarfile.LNKTYPE)])
    )
    message = refused(tmp_path, tar_bytes([link("h", "missing.txt", tarfile.LNKTYPE)]))
    assert "hard link to 'missing.txt', which is not a file earlier in the archive" in message
    zip_link = zip_bytes({"passwd": b"/etc/passwd"}, modes={"passwd": stat.S_IFLNK | 0o777})
    assert "member 'passwd' is a symbolic link to '/etc/passwd'" in refused(tmp_path, zip_link)


def test_links_that_combine_to_leave_the_tree_are_refused(tmp_path: Path):
    # Each link alone stays inside; together "l" -> "a/.." with "a" -> "." is the folder above.
    message = refused(tmp_path, tar_bytes([link("l", "a/.."), link("a", ".")]))
    assert "member 'l' is a symbolic link that, combined with other links, leads outside" in message
    # Writing through a link that leads outside is refused before anything is written there.
    message = refused(tmp_path, tar_bytes([link("l", "a/.."), link("a", "."), link("l/evil", "x")]))
    assert "member 'l/evil' is a symbolic link that, through other links, leads outside" in message
    assert not (tmp_path / "evil").exists()


def test_links_may_point_within_the_tree(tmp_path: Path):
    data = tar_bytes([("d/f.txt", b"f"), link("d/up", "../d/f.txt"), link("self", "d")])
    archive.fetch_and_extract(write(tmp_path, "t.tgz", data), tmp_path / "job")
    assert (tmp_path / "job" / "self" / "up").read_bytes() == b"f"


def test_device_files_and_fifos_are_refused(tmp_path: Path):
    device = tarfile.TarInfo("dev/sda")
    device.type = tarfile.BLKTYPE
    assert "member 'dev/sda' is a device file; refused" in refused(tmp_path, tar_bytes([device]))
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    assert "member 'pipe' is a FIFO; refused" in refused(tmp_path, tar_bytes([fifo]))
    zip_device = zip_bytes({"tty": b""}, modes={"tty": stat.S_IFCHR | 0o600})
    assert "member 'tty' is a device file" in refused(tmp_path, zip_device)


def test_archives_expanding_past_max_bytes_are_refused_before_writing(tmp_path: Path):
    data = zip_bytes({"small.txt": b"1" * 100, "big.bin": b"\0" * 50_000})
    assert len(data) < 1_000
    message = refused(tmp_path, data, max_bytes=10_000)
    assert message.endswith(
        "member 'big.bin' brings the declared size to 50,100 bytes, over the 10,000 allowed; "
        "refused (raise max_bytes if you trust the archive)"
    )
    message = refused(tmp_path, tar_bytes([("a", b"1" * 600), ("b", b"1" * 600)]), max_bytes=1_000)
    assert "member 'b' brings the declared size to 1,200 bytes" in message


def test_bytes_are_counted_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A header that understates its size gets no further than max_bytes.
    classify = members.classify

    def understated(info: object, shown: str) -> tuple:
        raw, kind, _, mode, target = classify(info, shown)
        return raw, kind, 0, mode, target

    monkeypatch.setattr(members, "classify", understated)
    message = refused(tmp_path, zip_bytes({"a.bin": b"\0" * 5_000}), max_bytes=1_000)
    assert "member 'a.bin' takes the extracted size past the 1,000 bytes allowed" in message


def test_the_download_itself_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(archive, "DOWNLOAD_SLACK", 0)
    message = refused(tmp_path, b"\0" * 5_000, max_bytes=1_000)
    assert "the archive is over 5,000 bytes, more than the 1,000 allowed" in message


def test_corrupt_archives_are_refused(tmp_path: Path):
    good = zip_bytes(POETS)
    message = refused(tmp_path, good[: len(good) // 2])
    assert "the archive is corrupt or truncated" in message and "download it again" in message
    zdata = bytearray(good)
    zdata[60:90] = b"\xff" * 30  # inside the first member's compressed data
    assert "corrupt or truncated" in refused(tmp_path, bytes(zdata))
    tgz = tar_bytes(list(POETS.items()))
    assert "corrupt or truncated" in refused(tmp_path, tgz[:10] + b"\x00garbage" * 20)
    assert "corrupt or truncated" in refused(tmp_path, tgz[: len(tgz) // 2])


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (b"", "an empty file"),
        (
            b"<!DOCTYPE html><html><body>Sign in</body></html>",
            "an HTML or XML page (an error or login page?)",
        ),
        (b'{"message": "Not Found"}', "JSON or other text"),
        (b"print('hello')\n", "text;"),  # never quoted: it may be a secret
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "a PNG image"),
        (b"\x05\x02\0\0\0\x3a\0\x01\xff", "binary data;"),
        (gzip.compress(b"print('hello')\n"), "gzip-compressed text, not a tar"),
    ],
)
def test_non_archives_say_what_was_found(tmp_path: Path, data: bytes, found: str):
    message = refused(tmp_path, data)
    assert f"job.bin: not a zip or tar archive: found {found}" in message
    assert "hello" not in message and "Sign in" not in message  # content is never quoted
    assert message.endswith("check the URL: it must serve a .zip, .tar.gz or .tar archive")


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(UsageError, match="max_bytes must be positive"):
        archive.fetch_and_extract(write(tmp_path, "j.zip", zip_bytes(POETS)), tmp_path / "job", max_bytes=0)
    with pytest.raises(StorageError, match="check that the path exists"):
        archive.fetch_and_extract(str(tmp_path / "missing.zip"), tmp_path / "job")


# --- HTTP ----------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    authorizations: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        self.authorizations.append(self.headers.get("Authorization"))
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    with serve_http(functools.partial(_QuietHandler, directory=str(root))) as url:
        yield url, root


def test_http_download(http_root: tuple[str, Path], tmp_path: Path):
    base, root = http_root
    (root / "master.zip").write_bytes(zip_bytes(POETS))
    assert archive.fetch_and_extract(f"{base}/master.zip", tmp_path / "job") == list(POETS)
    assert (tmp_path / "job" / "dcos-tensorflow-demos-master" / "poets" / "poets.py").exists()
    with pytest.raises(StorageError) as info:
        archive.fetch_and_extract(f"{base}/missing.zip", tmp_path / "job2")
    assert str(info.value).startswith(
        f"cannot download {base}/missing.zip: HTTP 404 File not found (check the URL"
    )
    assert not (tmp_path / "job2").exists()


def test_http_user_and_token_go_in_an_authorization_header(http_root: tuple[str, Path], tmp_path: Path):
    base, root = http_root
    (root / "master.zip").write_bytes(zip_bytes(POETS))
    _QuietHandler.authorizations.clear()
    url = base.replace("http://", "http://alice:t%40ken@") + "/master.zip"
    assert archive.fetch_and_extract(url, tmp_path / "job") == list(POETS)
    assert _QuietHandler.authorizations == ["Basic " + base64.b64encode(b"alice:t@ken").decode()]


def test_a_silent_server_times_out(tmp_path: Path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # connections complete, but nobody ever answers
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            archive.fetch_and_extract(f"http://127.0.0.1:{port}/j.zip", tmp_path / "job", timeout=0.5)
        assert time.monotonic() - started < 5
    assert str(info.value) == (
        f"cannot download http://127.0.0.1:{port}/j.zip: no answer within 0.5 s (check that the server "
        "is up and reachable from this machine, or allow a longer timeout)"
    )


def test_http_download_is_bounded(
    http_root: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    base, root = http_root
    (root / "big.zip").write_bytes(b"\0" * 5_000)
    monkeypatch.setattr(archive, "DOWNLOAD_SLACK", 0)
    with pytest.raises(DataError, match="the archive is over 5,000 bytes, more than the 1,000 allowed"):
        archive.fetch_and_extract(f"{base}/big.zip", tmp_path / "job", max_bytes=1_000)


def test_an_unreachable_server_fails_fast_in_one_line(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    url = f"http://user:hunter2@127.0.0.1:{port}/master.zip"
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        archive.fetch_and_extract(url, tmp_path / "job", timeout=5)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert message.startswith(f"cannot download http://***@127.0.0.1:{port}/master.zip: ")
    assert "Connection refused" in message and "reachable from this machine" in message
    assert "\n" not in message and "hunter2" not in message
    assert not (tmp_path / "job").exists()
