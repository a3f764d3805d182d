"""An archive's members checked before anything is written: safe relative names, the kinds of file
allowed, the sizes declared against the budget and link targets that stay inside the tree (for
:mod:`lastlayer.jobs.archive`)."""

from __future__ import annotations

import posixpath
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lastlayer.errors import DataError

#: Most members an archive may have.
MAX_MEMBERS = 100_000
#: ``ZipInfo.create_system`` of archives made on Unix (their ``external_attr`` holds a file mode).
UNIX_SYSTEM = 3
#: Longest symbolic link target read, bytes.
MAX_LINK = 4096


@dataclass(frozen=True)
class Budget:
    """The most bytes an archive may extract to, and the setting that says so (for messages)."""

    size: int
    setting: str


@dataclass(frozen=True)
class Member:
    """One archive entry, checked: a safe relative name and what to make of it."""

    name: str  # relative POSIX path, no '.', '..' or empty parts
    kind: str  # "dir", "file", "symlink" or "hardlink"
    size: int  # declared bytes of content ("file", and a zip symlink's target)
    executable: bool
    target: str  # symlink: as written; hardlink: the linked member's name
    source: Any  # the ZipInfo or TarInfo


def safe_name(raw: str, shown: str) -> str | None:
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


def classify(info: Any, shown: str) -> tuple[str, str, int, int, str]:
    """``(raw name, kind, declared size, mode, link target)`` of a ZipInfo or TarInfo."""
    if isinstance(info, zipfile.ZipInfo):
        mode = info.external_attr >> 16 if info.create_system == UNIX_SYSTEM else 0
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
            kind = special(mode)
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


def special(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return f"special file (mode {mode:o})"


def check_members(
    raw_members: Iterable[Any], max_bytes: Budget, shown: str, *, hard_links_copy: bool = False
) -> list[Member]:
    """Every member checked before anything is written (names, kinds, link targets, sizes).

    ``hard_links_copy``: a hard link costs its file's size (it will be written as a copy).
    """
    members: list[Member] = []
    kinds: dict[str, str] = {}
    file_sizes: dict[str, int] = {}
    declared = 0
    for count, info in enumerate(raw_members, 1):
        if count > MAX_MEMBERS:
            raise DataError(f"{shown}: more than {MAX_MEMBERS:,} members; refused (is it an archive bomb?)")
        raw, kind, size, mode, target = classify(info, shown)
        if kind not in ("dir", "file", "symlink", "hardlink"):
            raise DataError(
                f"{shown}: member {raw!r} is a {kind}; refused (a job archive holds only files, "
                "folders and links)"
            )
        name = safe_name(raw, shown)
        if name is None:
            if kind == "dir":
                continue
            raise DataError(f"{shown}: member {raw!r} has no name; refused (repack the archive)")
        if kind == "symlink":
            if isinstance(info, zipfile.ZipInfo):
                size = min(size, MAX_LINK + 1)
            else:
                target = check_symlink_target(raw, name, target, shown)
        elif kind == "hardlink":
            target = check_hard_link(raw, target, kinds, shown)
            size = file_sizes[target] if hard_links_copy else 0
        declared += size
        if declared > max_bytes.size:
            raise DataError(
                f"{shown}: member {raw!r} brings the declared size to {declared:,} bytes, over the "
                f"{max_bytes.size:,} allowed; refused (raise {max_bytes.setting} if you trust the archive)"
            )
        previous = kinds.get(name)
        if previous is not None and not (previous == kind and kind in ("dir", "file")):
            raise DataError(
                f"{shown}: member {raw!r} is a {kind} but the archive already has a {previous} at {name!r}; "
                "refused (repack the archive)"
            )
        kinds[name] = kind
        if kind == "file":
            file_sizes[name] = size
        members.append(Member(name, kind, size, bool(mode & 0o100), target, info))
    return members


def check_hard_link(raw: str, target: str, kinds: dict[str, str], shown: str) -> str:
    """The linked member's name; it must be a file earlier in the archive."""
    try:
        linked = safe_name(target, shown) if target else None
    except DataError:
        linked = None
    if linked is None or kinds.get(linked) != "file":
        raise DataError(
            f"{shown}: member {raw!r} is a hard link to {target!r}, which is not a file earlier in "
            "the archive; refused"
        )
    return linked


def check_symlink_target(raw: str, name: str, target: str, shown: str) -> str:
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
