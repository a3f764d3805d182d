"""The reproducible job zip: ``lastlayer job package SRC_DIR ZIP`` (the same folder gives the same bytes)."""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import stat
import zipfile
from pathlib import Path

from lastlayer import storage
from lastlayer.errors import DataError, UsageError
from lastlayer.jobs.members import UNIX_SYSTEM
from lastlayer.storage import StorageOptions

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1 << 20


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
    info.create_system = UNIX_SYSTEM
    info.external_attr = mode << 16
    return info


def _zip_dir(zf: zipfile.ZipFile, arcname: str) -> str:
    info = _zip_info(arcname + "/", stat.S_IFDIR | 0o755)
    info.external_attr |= 0x10  # MS-DOS directory flag
    zf.writestr(info, b"")
    return arcname + "/"
