"""Job archives: fetch a zip or tar from a URL and extract it safely; zip a folder reproducibly.

:func:`fetch_and_extract` reads ``http(s)://`` with urllib and every other URL or plain path through
:mod:`lastlayer.storage`, tells zip from tar (plain, gzip, bzip2, xz) by content, and extracts into a
temporary folder next to the destination that is renamed into place only when every member passed.
Refused: absolute names, ``..`` parts, links whose target leaves the tree, device files and FIFOs, and
archives expanding past ``max_bytes`` (declared sizes are checked before anything is written, and
bytes are counted while writing).
"""

from __future__ import annotations

import base64
import bz2
import gzip
import http.client
import io
import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lastlayer import storage
from lastlayer.errors import DataError, StorageError, UsageError
from lastlayer.storage import StorageOptions

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: Most members an archive may have.
MAX_MEMBERS = 100_000
#: How much bigger than ``max_bytes`` the archive file itself may be (headers, padding).
DOWNLOAD_SLACK = 16 * 1024 * 1024
HTTP_TIMEOUT = 60.0
_CHUNK = 1 << 20
_MAX_LINK = 4096
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_UNIX = 3  # ZipInfo.create_system of archives made on Unix


@dataclass(frozen=True)
class _Member:
    """One archive entry, checked: a safe relative name and what to make of it."""

    name: str  # relative POSIX path, no '.', '..' or empty parts
    kind: str  # "dir", "file", "symlink" or "hardlink"
    size: int  # declared bytes of content ("file", and a zip symlink's target)
    executable: bool
    target: str  # symlink: as written; hardlink: the linked member's name
    source: Any  # the ZipInfo or TarInfo


# --- fetching ------------------------------------------------------------------------------------


def fetch(
    job_url: str,
    *,
    limit: int,
    storage_options: StorageOptions | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> bytes:
    """The bytes at ``job_url`` (at most ``limit``).

    Raises:
        StorageError: unreachable, refused or missing (one line).
        DataError: larger than ``limit``.
    """
    if job_url.lower().startswith(("http://", "https://")):
        return _http_get(job_url, limit, timeout)
    data = storage.read_bytes(job_url, storage_options)
    if len(data) > limit:
        raise _too_big_download(job_url, len(data), limit)
    return data


def _http_get(url: str, limit: int, timeout: float) -> bytes:
    shown = _shown(url)
    headers = {"User-Agent": "lastlayer"}
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:  # user:token@host as HTTP basic auth
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise _too_big_download(url, int(declared), limit)
            chunks: list[bytes] = []
            total = 0
            while chunk := response.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise _too_big_download(url, total, limit)
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise StorageError(
            f"cannot download {shown}: HTTP {exc.code} {_one_line(exc.reason)} (check the URL and that "
            "the server lets this machine read it)"
        ) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise _timed_out(shown, timeout) from None
        raise StorageError(
            f"cannot download {shown}: {_one_line(reason)} (check the URL and that the server is "
            "reachable from this machine)"
        ) from None
    except TimeoutError:
        raise _timed_out(shown, timeout) from None
    except (http.client.HTTPException, OSError) as exc:
        raise StorageError(
            f"cannot download {shown}: {exc.__class__.__name__}: {_one_line(exc)} (try again; check the "
            "server and the network)"
        ) from None


def _timed_out(shown: str, timeout: float) -> StorageError:
    return StorageError(
        f"cannot download {shown}: no answer within {timeout:g} s (check that the server is up and "
        "reachable from this machine, or allow a longer timeout)"
    )


def _too_big_download(url: str, size: int, limit: int) -> DataError:
    return DataError(
        f"{_shown(url)}: the archive is over {size:,} bytes, more than the {limit:,} allowed; "
        "raise max_bytes if you trust it"
    )


def _shown(url: str) -> str:
    """``url`` without a password or token in its user part."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]


# --- extracting ----------------------------------------------------------------------------------


def fetch_and_extract(
    job_url: str,
    dest_dir: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    storage_options: StorageOptions | None = None,
    timeout: float = HTTP_TIMEOUT,
    replace: bool = False,
) -> list[str]:
    """Download the zip or tar at ``job_url`` and extract it into ``dest_dir``.

    ``dest_dir`` must not exist or be empty, unless ``replace`` (then the old folder is swapped out
    after a successful extraction). Returns the extracted members' relative paths in archive order,
    folders with a trailing ``/``.

    Raises:
        UsageError: a bad ``max_bytes`` or a non-empty ``dest_dir``.
        StorageError: the URL cannot be read, or the destination cannot be written.
        DataError: not an archive, corrupt, too large, or a member that is refused (named).
    """
    if max_bytes <= 0:
        raise UsageError(f"max_bytes must be positive, got {max_bytes}")
    dest = Path(dest_dir).absolute()
    _check_dest(dest, replace)
    data = fetch(job_url, limit=max_bytes + DOWNLOAD_SLACK, storage_options=storage_options, timeout=timeout)
    return extract(data, dest, max_bytes=max_bytes, source=job_url, replace=replace)


def extract(
    data: bytes,
    dest_dir: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source: str = "the archive",
    replace: bool = False,
) -> list[str]:
    """Extract archive bytes into ``dest_dir``; see :func:`fetch_and_extract` (``source`` names it)."""
    if max_bytes <= 0:
        raise UsageError(f"max_bytes must be positive, got {max_bytes}")
    dest = Path(dest_dir).absolute()
    _check_dest(dest, replace)
    shown = _shown(source)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    except OSError as exc:
        raise StorageError(f"cannot extract {shown} into {dest}: {_one_line(exc)}") from exc
    try:
        names = _extract_into(data, work, max_bytes, shown)
        work.chmod(0o755)
        _publish(work, dest, replace)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot extract {shown} into {dest}: {_one_line(exc)}") from exc
        raise
    return names


def _check_dest(dest: Path, replace: bool) -> None:
    if dest.exists() and not replace and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(
            f"cannot extract into {dest}: it exists and is not an empty folder; remove it, choose "
            "another folder, or pass replace=True"
        )


def _publish(work: Path, dest: Path, replace: bool) -> None:
    """Rename the finished tree onto ``dest``; an old ``dest`` is moved aside first when replacing."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        if not replace:
            _check_dest(dest, replace)  # it may have been filled meanwhile
            dest.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            old.rmdir()
            dest.rename(old)
    try:
        work.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _extract_into(data: bytes, root: Path, max_bytes: int, shown: str) -> list[str]:
    """Check every member, then write files, then hard links, then symbolic links, then verify links."""
    kind = _detect(data, shown)
    try:
        with _open(kind, data) as (members, read):
            checked = _check_members(members, max_bytes, shown)
            real_root = os.path.realpath(root)
            written = 0
            for member in checked:
                if member.kind == "dir":
                    _mkdir(root, member, shown)
                elif member.kind == "file":
                    written = _write_file(root, member, read, written, max_bytes, shown)
            for member in checked:
                if member.kind == "hardlink":
                    written = _hardlink(root, member, written, max_bytes, shown)
            for member in checked:
                if member.kind == "symlink":
                    target = member.target or _read_link_target(member, read, shown)
                    _symlink(root, real_root, member, target, shown)
            for member in checked:
                if member.kind == "symlink":
                    _verify_link(root, real_root, member, shown)
            seen: dict[str, None] = {}
            for member in checked:
                seen.setdefault(member.name + ("/" if member.kind == "dir" else ""), None)
            return list(seen)
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise _corrupt(shown, exc) from None
    except gzip.BadGzipFile as exc:  # an OSError, but about the data
        raise _corrupt(shown, exc) from None
    except NotImplementedError as exc:
        raise DataError(
            f"{shown}: uses a compression method this Python cannot read ({_one_line(exc)}); "
            "repack it with deflate compression"
        ) from None


def _corrupt(shown: str, exc: BaseException) -> DataError:
    return DataError(
        f"{shown}: the archive is corrupt or truncated ({exc.__class__.__name__}: {_one_line(exc)}); "
        "download it again or rebuild it"
    )


def _detect(data: bytes, shown: str) -> str:
    """``"zip"`` or ``"tar"`` from the bytes themselves; anything else is refused, saying what it is."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[257:262] == b"ustar":
        return "tar"
    compression, head = _decompressed_head(data, shown)
    if compression:
        if head[257:262] == b"ustar":
            return "tar"
        what = f"{compression}-compressed {_describe(head)}, not a tar archive"
        raise DataError(f"{shown}: not a zip or tar archive: found {what}; {_ARCHIVE_HINT}")
    if zipfile.is_zipfile(io.BytesIO(data)):  # e.g. a self-extracting zip
        return "zip"
    raise DataError(f"{shown}: not a zip or tar archive: found {_describe(data)}; {_ARCHIVE_HINT}")


def _decompressed_head(data: bytes, shown: str) -> tuple[str, bytes]:
    """``(compression name, first decompressed bytes)``, or ``("", b"")`` when not compressed."""
    decompressor: Any
    if data[:2] == b"\x1f\x8b":
        name, decompressor = "gzip", zlib.decompressobj(31)
    elif data[:3] == b"BZh":
        name, decompressor = "bzip2", bz2.BZ2Decompressor()
    elif data[:6] == b"\xfd7zXZ\x00":
        name, decompressor = "xz", lzma.LZMADecompressor()
    else:
        return "", b""
    try:
        if name == "gzip":
            head = decompressor.decompress(data[: 1 << 20], 1024)
        else:
            head = decompressor.decompress(data[: 1 << 20], max_length=1024)
    except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise _corrupt(shown, exc) from None
    if len(head) < 512 and not decompressor.eof:
        raise _corrupt(shown, EOFError(f"the {name} stream ends after {len(head)} bytes"))
    return name, head


_ARCHIVE_HINT = "check the URL: it must serve a .zip, .tar.gz or .tar archive"


def _describe(data: bytes) -> str:
    if not data:
        return "an empty file"
    head = data[:512]
    start = head.lstrip()[:15].lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML or XML page (an error or login page?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting with {data[:8].hex(' ')}"
    if start[:1] in (b"{", b"["):
        return "JSON or other text"
    return f"text starting with {text.strip()[:40]!r}"


ReadMember = Callable[[Any], IO[bytes]]


@contextmanager
def _open(kind: str, data: bytes) -> Iterator[tuple[Iterator[Any], ReadMember]]:
    """``(raw members, open-member function)`` of a zip or tar."""
    if kind == "zip":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            yield iter(zf.infolist()), zf.open
        return
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:

        def read(info: tarfile.TarInfo) -> IO[bytes]:
            handle = tar.extractfile(info)
            if handle is None:  # pragma: no cover - only regular files are read
                raise DataError(f"{info.name}: has no content to read")
            return handle

        yield iter(tar), read


def _safe_name(raw: str, shown: str) -> str | None:
    """The member's relative POSIX path, ``None`` for the archive's root, or a refusal."""
    if "\0" in raw or "\\" in raw:
        raise DataError(
            f"{shown}: member {raw!r} has a backslash or NUL in its name; refused (repack the archive "
            "with '/' as the only separator)"
        )
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
        raise DataError(
            f"{shown}: member {raw!r} has an absolute path; refused (an archive may only hold relative "
            "paths: repack it)"
        )
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise DataError(
            f"{shown}: member {raw!r} has a '..' part that would write outside the destination; "
            "refused (repack the archive without it)"
        )
    return "/".join(parts) or None


def _classify(info: Any, shown: str) -> tuple[str, str, int, int, str]:
    """``(raw name, kind, declared size, mode, link target)`` of a ZipInfo or TarInfo."""
    if isinstance(info, zipfile.ZipInfo):
        mode = info.external_attr >> 16 if info.create_system == _UNIX else 0
        if info.flag_bits & 0x1:
            raise DataError(
                f"{shown}: member {info.filename!r} is encrypted; refused (use an unencrypted archive)"
            )
        if info.is_dir():
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
        elif stat.S_IFMT(mode) in (0, stat.S_IFREG):
            kind = "file"
        elif stat.S_ISDIR(mode):
            kind = "dir"
        else:
            kind = _special(mode)
        return info.filename, kind, info.file_size, mode, ""
    assert isinstance(info, tarfile.TarInfo)
    if info.isdir():
        kind = "dir"
    elif info.isreg():
        kind = "file"
    elif info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.ischr() or info.isblk():
        kind = "device file"
    elif info.isfifo():
        kind = "FIFO"
    else:
        kind = f"entry of tar type {info.type!r}"
    return info.name, kind, info.size if kind == "file" else 0, info.mode, info.linkname


def _special(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return f"special file (mode {mode:o})"


def _check_members(raw_members: Iterator[Any], max_bytes: int, shown: str) -> list[_Member]:
    """Every member checked before anything is written (names, kinds, link targets, sizes)."""
    members: list[_Member] = []
    kinds: dict[str, str] = {}
    declared = 0
    for count, info in enumerate(raw_members, 1):
        if count > MAX_MEMBERS:
            raise DataError(f"{shown}: more than {MAX_MEMBERS:,} members; refused (is it an archive bomb?)")
        raw, kind, size, mode, target = _classify(info, shown)
        if kind not in ("dir", "file", "symlink", "hardlink"):
            raise DataError(
                f"{shown}: member {raw!r} is a {kind}; refused (a job archive holds only files, "
                "folders and links)"
            )
        name = _safe_name(raw, shown)
        if name is None:
            if kind == "dir":
                continue
            raise DataError(f"{shown}: member {raw!r} has no name; refused (repack the archive)")
        if kind == "symlink":
            if isinstance(info, zipfile.ZipInfo):
                size = min(size, _MAX_LINK + 1)
            else:
                target = _check_symlink_target(raw, name, target, shown)
        elif kind == "hardlink":
            try:
                linked = _safe_name(target, shown) if target else None
            except DataError:
                linked = None
            if linked is None or kinds.get(linked) != "file":
                raise DataError(
                    f"{shown}: member {raw!r} is a hard link to {target!r}, which is not a file earlier in "
                    "the archive; refused"
                )
            target = linked
        declared += size
        if declared > max_bytes:
            raise DataError(
                f"{shown}: member {raw!r} brings the declared size to {declared:,} bytes, over the "
                f"{max_bytes:,} allowed; refused (raise max_bytes if you trust the archive)"
            )
        previous = kinds.get(name)
        if previous is not None and not (previous == kind and kind in ("dir", "file")):
            raise DataError(
                f"{shown}: member {raw!r} is a {kind} but the archive already has a {previous} at {name!r}; "
                "refused (repack the archive)"
            )
        kinds[name] = kind
        members.append(_Member(name, kind, size, bool(mode & 0o100), target, info))
    return members


def _check_symlink_target(raw: str, name: str, target: str, shown: str) -> str:
    """Refuse a link target that is empty, absolute, or leaves the tree (judged from the link's folder)."""
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target)) if target else ""
    if (
        not target
        or target.startswith("/")
        or "\0" in target
        or resolved == ".."
        or resolved.startswith("../")
    ):
        raise DataError(
            f"{shown}: member {raw!r} is a symbolic link to {target!r}, outside the extracted tree; "
            "refused (links in a job archive must stay inside it)"
        )
    return target


def _path(root: Path, member: _Member) -> Path:
    return root.joinpath(*member.name.split("/"))


def _conflict(shown: str, member: _Member, exc: OSError) -> DataError:
    return DataError(
        f"{shown}: member {member.name!r} cannot be created ({_one_line(exc)}): another member is in its "
        "way; refused (repack the archive)"
    )


def _mkdir(root: Path, member: _Member, shown: str) -> None:
    try:
        _path(root, member).mkdir(mode=0o755, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise _conflict(shown, member, exc) from None


def _write_file(
    root: Path, member: _Member, read: ReadMember, written: int, max_bytes: int, shown: str
) -> int:
    """Write one file (no link exists yet in the tree, and none is followed); returns bytes so far."""
    dest = _path(root, member)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(dest, flags, 0o600)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise _conflict(shown, member, exc) from None
    with os.fdopen(fd, "wb") as out, read(member.source) as src:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise DataError(
                    f"{shown}: member {member.name!r} takes the extracted size past the {max_bytes:,} bytes "
                    "allowed (more than its header declared); refused"
                )
            out.write(chunk)
        os.fchmod(out.fileno(), 0o755 if member.executable else 0o644)
    return written


def _hardlink(root: Path, member: _Member, written: int, max_bytes: int, shown: str) -> int:
    dest = _path(root, member)
    source = root.joinpath(*member.target.split("/"))
    try:
        dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if dest.exists():
            raise FileExistsError(f"{member.name} exists")
        try:
            os.link(source, dest, follow_symlinks=False)
        except OSError:
            written += source.stat().st_size
            if written > max_bytes:
                raise DataError(
                    f"{shown}: member {member.name!r} takes the extracted size past the {max_bytes:,} "
                    "bytes allowed; refused"
                ) from None
            shutil.copyfile(source, dest, follow_symlinks=False)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise _conflict(shown, member, exc) from None
    return written


def _read_link_target(member: _Member, read: ReadMember, shown: str) -> str:
    """A zip symlink's target: its content."""
    with read(member.source) as src:
        raw = src.read(_MAX_LINK + 1)
    if len(raw) > _MAX_LINK:
        raise DataError(
            f"{shown}: member {member.name!r} is a symbolic link with an overlong target; refused"
        )
    try:
        target = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{shown}: member {member.name!r} is a symbolic link whose target is not UTF-8; refused"
        ) from None
    return _check_symlink_target(member.name, member.name, target, shown)


def _inside(real_root: str, path: str) -> bool:
    return os.path.commonpath([real_root, path]) == real_root


def _symlink(root: Path, real_root: str, member: _Member, target: str, shown: str) -> None:
    """Create one link, only where its folder and its target resolve (through earlier links) inside."""
    dest = _path(root, member)
    parent = os.path.realpath(dest.parent)
    resolved = os.path.realpath(os.path.join(parent, target))
    if not _inside(real_root, parent) or not _inside(real_root, resolved):
        raise DataError(
            f"{shown}: member {member.name!r} is a symbolic link that, through other links, leads outside "
            "the extracted tree; refused"
        )
    try:
        Path(parent).mkdir(mode=0o755, parents=True, exist_ok=True)
        os.symlink(target, os.path.join(parent, dest.name))
    except (FileExistsError, NotADirectoryError) as exc:
        raise _conflict(shown, member, exc) from None


def _verify_link(root: Path, real_root: str, member: _Member, shown: str) -> None:
    """With every link in place, each must still resolve inside (links can combine to leave the tree)."""
    if not _inside(real_root, os.path.realpath(_path(root, member))):
        raise DataError(
            f"{shown}: member {member.name!r} is a symbolic link that, combined with other links, leads "
            "outside the extracted tree; refused"
        )


# --- building ------------------------------------------------------------------------------------


def build_zip(
    src_dir: str | os.PathLike[str],
    zip_path: str,
    root_name: str | None = None,
    *,
    storage_options: StorageOptions | None = None,
) -> list[str]:
    """Zip the folder ``src_dir`` into ``zip_path`` (a path or URL, written atomically).

    The same folder always gives the same bytes: members sorted by path, fixed timestamps, modes
    0644/0755. ``root_name`` (e.g. ``dcos-tensorflow-demos-master``) is put in front of every member,
    as in GitHub's archives. Symbolic links are kept as links and must stay inside the folder.
    Returns the member names in order.

    Raises:
        UsageError: ``src_dir`` is not a folder or ``root_name`` is not a safe relative path.
        DataError: a link leaves the folder, or a special file (FIFO, socket, device) is in it.
        StorageError: ``zip_path`` cannot be written.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise UsageError(f"cannot zip {src}: not a folder; give the folder holding the job's files")
    parts = [part for part in (root_name or "").split("/") if part not in ("", ".")]
    if (root_name or "").startswith("/") or ".." in parts or "\\" in (root_name or ""):
        raise UsageError(
            f"root_name {root_name!r}: must be a relative folder name without '..' or '\\', "
            "e.g. dcos-tensorflow-demos-master"
        )
    prefix = "/".join(parts)
    skip = os.path.realpath(zip_path) if "://" not in zip_path else None
    buffer = io.BytesIO()
    names: list[str] = []
    with zipfile.ZipFile(buffer, "w") as zf:
        if prefix:
            for i in range(1, len(parts) + 1):
                names.append(_zip_dir(zf, "/".join(parts[:i])))
        for rel, path in _walk(src):
            arcname = f"{prefix}/{rel}" if prefix else rel
            if path.is_symlink():
                target = os.readlink(path)
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
                if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                    raise DataError(
                        f"cannot zip {path}: a symbolic link to {target!r}, outside {src}; replace it "
                        "with the file or a link inside the folder"
                    )
                info = _zip_info(arcname, stat.S_IFLNK | 0o777)
                zf.writestr(info, target.encode("utf-8"))
            elif path.is_dir():
                names.append(_zip_dir(zf, arcname))
                continue
            elif path.is_file():
                if skip is not None and os.path.realpath(path) == skip:
                    continue
                executable = bool(path.stat().st_mode & 0o100)
                info = _zip_info(arcname, stat.S_IFREG | (0o755 if executable else 0o644))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w") as out, path.open("rb") as handle:
                    shutil.copyfileobj(handle, out, _CHUNK)
            else:
                raise DataError(f"cannot zip {path}: not a file, folder or link; remove it from {src}")
            names.append(arcname)
    storage.write_atomic(zip_path, buffer.getvalue(), storage_options)
    return names


def _walk(src: Path) -> list[tuple[str, Path]]:
    """Every entry under ``src`` as ``(relative POSIX path, path)``, sorted part by part."""
    entries: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(src):
        base = Path(folder)
        for name in dirs + files:
            path = base / name
            entries.append((path.relative_to(src).as_posix(), path))
    entries.sort(key=lambda entry: entry[0].split("/"))
    return entries


def _zip_info(arcname: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
    info.create_system = _UNIX
    info.external_attr = mode << 16
    return info


def _zip_dir(zf: zipfile.ZipFile, arcname: str) -> str:
    info = _zip_info(arcname + "/", stat.S_IFDIR | 0o755)
    info.external_attr |= 0x10  # MS-DOS directory flag
    zf.writestr(info, b"")
    return arcname + "/"
