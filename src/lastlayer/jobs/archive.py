"""Job archives: fetch a zip or tar from a URL, tell which it is by content, and extract it safely.

:func:`fetch_and_extract` downloads through :func:`lastlayer.fetch.fetch_into` (one bounded
download: ``http(s)://`` and every fsspec URL or plain path) into an unnamed temporary file, so a
large archive never sits in memory, tells zip from tar (plain, gzip, bzip2, xz) by content (and
describes what else it is without quoting it: it may be a secret served by mistake), and extracts
into a temporary folder next to the destination that is renamed into place only when every member
passed. Every member is checked before anything is written: refused are absolute names, ``..``
parts, links whose target leaves the tree, device files and FIFOs, more than
:data:`~lastlayer.jobs.members.MAX_MEMBERS` members and archives whose declared sizes pass
``max_bytes`` (:mod:`lastlayer.jobs.members`). A tar is then written by :mod:`tarfile` with its
``"data"`` filter (which also refuses writing through a link that leads outside); a zip, which
tarfile's filters do not cover, by the checks here, counting bytes while writing (a zip header can
understate a size). Last, every link must still resolve inside, since links can combine to leave the
tree.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

from lastlayer import fetch
from lastlayer.errors import DataError, StorageError, UsageError
from lastlayer.fetch import one_line
from lastlayer.jobs.members import MAX_LINK, Budget, Member, check_members, check_symlink_target
from lastlayer.storage import StorageOptions

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: How much bigger than ``max_bytes`` the archive file itself may be (headers, padding).
DOWNLOAD_SLACK = 16 * 1024 * 1024
#: Longest wall time for the whole download, seconds (each network read waits at most
#: :data:`lastlayer.fetch.READ_TIMEOUT_S`).
DOWNLOAD_TIMEOUT_S = 600.0
_CHUNK = 1 << 20
_HEAD = 1 << 20  # bytes looked at to tell what a download is


# --- extracting ----------------------------------------------------------------------------------


def fetch_and_extract(
    job_url: str,
    dest_dir: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    storage_options: StorageOptions | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    replace: bool = False,
    settings: tuple[str, str] = ("max_bytes", "timeout"),
) -> list[str]:
    """Download the zip or tar at ``job_url`` (within ``timeout`` seconds in all) and extract it into
    ``dest_dir``; messages name ``max_bytes`` and ``timeout`` as ``settings`` (e.g.
    ``("service.job_url_max_bytes", "service.job_url_timeout")``).

    ``dest_dir`` must not exist or be empty, unless ``replace`` (then the old folder is swapped out
    after a successful extraction). Returns the extracted members' relative paths in archive order,
    folders with a trailing ``/``.

    Raises:
        UsageError: a bad ``max_bytes`` or a non-empty ``dest_dir``.
        StorageError: the URL cannot be read in time, or the destination cannot be written.
        DataError: not an archive, corrupt, too large, or a member that is refused (named).
    """
    if max_bytes <= 0:
        raise UsageError(f"max_bytes must be positive, got {max_bytes}")
    dest = Path(dest_dir).absolute()
    _check_dest(dest, replace)
    limits = fetch.Limits(max_bytes + DOWNLOAD_SLACK, timeout, *settings)
    with _spool(dest, fetch.shown(job_url)) as spool:  # on disk, not in memory: an archive may be large
        fetch.fetch_into(spool, job_url, limits, storage_options=storage_options, what="the archive")
        spool.seek(0)
        return _extract(spool, dest, Budget(max_bytes, settings[0]), fetch.shown(job_url), replace)


def _spool(dest: Path, shown: str) -> IO[bytes]:
    """An unnamed temporary file (0600) next to ``dest``, for the download."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryFile(prefix=f".{dest.name}.download-", dir=dest.parent)
    except OSError as exc:
        raise StorageError(f"cannot download {shown} into {dest}: {one_line(exc)}") from exc


def _extract(data: BinaryIO, dest: Path, budget: Budget, shown: str, replace: bool) -> list[str]:
    """Extract the archive ``data`` (a seekable file) into ``dest`` (checked)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    except OSError as exc:
        raise StorageError(f"cannot extract {shown} into {dest}: {one_line(exc)}") from exc
    try:
        names = _extract_into(data, work, budget, shown)
        work.chmod(0o755)
        _publish(work, dest, replace)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot extract {shown} into {dest}: {one_line(exc)}") from exc
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


def _extract_into(data: BinaryIO, root: Path, max_bytes: Budget, shown: str) -> list[str]:
    """Check every member, write them, then verify links; returns the names in archive order."""
    kind = _detect(data, shown)
    try:
        if kind == "zip":
            checked = _extract_zip(data, root, max_bytes, shown)
        else:
            checked = _extract_tar(data, root, max_bytes, shown)
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise _corrupt(shown, exc) from None
    except gzip.BadGzipFile as exc:  # an OSError, but about the data
        raise _corrupt(shown, exc) from None
    except NotImplementedError as exc:
        raise DataError(
            f"{shown}: uses a compression method this Python cannot read ({one_line(exc)}); "
            "repack it with deflate compression"
        ) from None
    real_root = os.path.realpath(root)
    for member in checked:
        if member.kind == "symlink":
            _verify_link(root, real_root, member, shown)
    seen: dict[str, None] = {}
    for member in checked:
        seen.setdefault(member.name + ("/" if member.kind == "dir" else ""), None)
    return list(seen)


def _extract_zip(data: BinaryIO, root: Path, max_bytes: Budget, shown: str) -> list[Member]:
    """Folders and files first (no link exists yet, none is followed), then symbolic links."""
    with zipfile.ZipFile(data) as zf:
        checked = check_members(zf.infolist(), max_bytes, shown)
        written = 0
        for member in checked:
            if member.kind == "dir":
                _mkdir(root, member, shown)
            elif member.kind == "file":
                written = _write_file(root, member, zf.open, written, max_bytes, shown)
        real_root = os.path.realpath(root)
        for member in checked:
            if member.kind == "symlink":
                target = _read_link_target(member, zf.open, shown)
                _symlink(root, real_root, member, target, shown)
    return checked


def _extract_tar(data: BinaryIO, root: Path, max_bytes: Budget, shown: str) -> list[Member]:
    """The checked members, written by tarfile through its ``"data"`` filter (modes 0644 / 0755).

    A tar writes exactly the sizes its headers declare, so the declared total bounds the bytes
    written; a hard link costs nothing, except where the file system makes no hard links and tarfile
    copies the file instead: then it counts as a copy.
    """
    with tarfile.open(fileobj=data, mode="r:*") as tar:
        checked = check_members(tar, max_bytes, shown, hard_links_copy=not _hard_links_work(root))
        by_info = {id(member.source): member for member in checked}

        def data_filter(info: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
            try:
                info = tarfile.data_filter(info, dest)
            except tarfile.FilterError as exc:
                raise _refused(shown, by_info[id(exc.tarinfo)], exc) from None
            if info.isreg() or info.islnk():
                info = info.replace(mode=0o755 if info.mode & 0o100 else 0o644, deep=False)
            return info

        tar.extractall(root, members=[member.source for member in checked], filter=data_filter)
    return checked


def _hard_links_work(folder: Path) -> bool:
    """Whether the file system of ``folder`` makes hard links."""
    probe, linked = folder / ".hard-link-probe", folder / ".hard-link-probe-2"
    try:
        probe.touch()
        os.link(probe, linked)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
        linked.unlink(missing_ok=True)


def _refused(shown: str, member: Member, exc: tarfile.FilterError) -> DataError:
    """The message for what tarfile's ``"data"`` filter refused (the checks before leave only links)."""
    kind = {"symlink": "symbolic link", "hardlink": "hard link"}.get(member.kind)
    if kind and isinstance(exc, tarfile.OutsideDestinationError | tarfile.LinkOutsideDestinationError):
        return DataError(
            f"{shown}: member {member.name!r} is a {kind} that, through other links, leads outside "
            "the extracted tree; refused"
        )
    if isinstance(exc, tarfile.OutsideDestinationError):
        return DataError(
            f"{shown}: member {member.name!r} would be written outside the extracted tree through a "
            "symbolic link; refused (links in a job archive must stay inside it)"
        )
    return DataError(f"{shown}: member {member.name!r} is refused ({one_line(exc)}); repack the archive")


def _corrupt(shown: str, exc: BaseException) -> DataError:
    return DataError(
        f"{shown}: the archive is corrupt or truncated ({exc.__class__.__name__}: {one_line(exc)}); "
        "download it again or rebuild it"
    )


def _detect(source: BinaryIO, shown: str) -> str:
    """``"zip"`` or ``"tar"`` from the bytes themselves; anything else is refused, saying what it is.
    ``source`` is left at its start."""
    data = source.read(_HEAD)
    source.seek(0)
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
    found = zipfile.is_zipfile(source)  # e.g. a self-extracting zip
    source.seek(0)
    if found:
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
            head = decompressor.decompress(data, 1024)
        else:
            head = decompressor.decompress(data, max_length=1024)
    except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise _corrupt(shown, exc) from None
    if len(head) < 512 and not decompressor.eof:
        raise _corrupt(shown, EOFError(f"the {name} stream ends after {len(head)} bytes"))
    return name, head


_ARCHIVE_HINT = "check the URL: it must serve a .zip, .tar.gz or .tar archive"


#: Formats told by their first bytes when a download is not an archive.
_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
    b"\x7fELF": "an ELF program",
}


def _describe(data: bytes) -> str:
    """What ``data`` looks like, never quoting it (it may be a secret served by mistake)."""
    if not data:
        return "an empty file"
    head = data[:512]
    start = head.lstrip()[:15].lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML or XML page (an error or login page?)"
    for magic, name in _MAGIC.items():
        if data.startswith(magic):
            return name
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    if start[:1] in (b"{", b"["):
        return "JSON or other text"
    return "text"


ReadMember = Callable[[Any], IO[bytes]]


def _path(root: Path, member: Member) -> Path:
    return root.joinpath(*member.name.split("/"))


def _conflict(shown: str, member: Member, exc: OSError) -> DataError:
    return DataError(
        f"{shown}: member {member.name!r} cannot be created ({one_line(exc)}): another member is in its "
        "way; refused (repack the archive)"
    )


def _mkdir(root: Path, member: Member, shown: str) -> None:
    try:
        _path(root, member).mkdir(mode=0o755, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise _conflict(shown, member, exc) from None


def _write_file(
    root: Path, member: Member, read: ReadMember, written: int, max_bytes: Budget, shown: str
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
            if written > max_bytes.size:
                raise DataError(
                    f"{shown}: member {member.name!r} takes the extracted size past the {max_bytes.size:,} "
                    f"bytes allowed by {max_bytes.setting} (more than its header declared); refused"
                )
            out.write(chunk)
        os.fchmod(out.fileno(), 0o755 if member.executable else 0o644)
    return written


def _read_link_target(member: Member, read: ReadMember, shown: str) -> str:
    """A zip symlink's target: its content."""
    with read(member.source) as src:
        raw = src.read(MAX_LINK + 1)
    if len(raw) > MAX_LINK:
        raise DataError(
            f"{shown}: member {member.name!r} is a symbolic link with an overlong target; refused"
        )
    try:
        target = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{shown}: member {member.name!r} is a symbolic link whose target is not UTF-8; refused"
        ) from None
    return check_symlink_target(member.name, member.name, target, shown)


def _inside(real_root: str, path: str) -> bool:
    return os.path.commonpath([real_root, path]) == real_root


def _symlink(root: Path, real_root: str, member: Member, target: str, shown: str) -> None:
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


def _verify_link(root: Path, real_root: str, member: Member, shown: str) -> None:
    """With every link in place, each must still resolve inside (links can combine to leave the tree)."""
    if not _inside(real_root, os.path.realpath(_path(root, member))):
        raise DataError(
            f"{shown}: member {member.name!r} is a symbolic link that, combined with other links, leads "
            "outside the extracted tree; refused"
        )
