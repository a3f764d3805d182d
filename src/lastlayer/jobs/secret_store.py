"""A local secret store: one file per secret in a private folder.

The folder is ``store`` when given, else ``$LASTLAYER_SECRETS_DIR``, else ``~/.lastlayer/secrets``. A
secret named ``a/b`` is the file ``<store>/a/b``. As in DC/OS, a secret whose name (its last part)
starts with ``__dcos_base64__`` holds base64 text and is decoded when read (e.g. a keytab). A secret
file must belong to the user reading it and be closed to group and others (``chmod 600``). Secret
bytes never appear in messages or logs. Secrets are written by :func:`lastlayer.storage.write_private`,
the one owner-only file writer (the job service's keytab and krb5.conf use it too).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from lastlayer import storage
from lastlayer.errors import UsageError

ENV_VAR = "LASTLAYER_SECRETS_DIR"
BASE64_PREFIX = "__dcos_base64__"
_TEMP_PREFIX = storage.PRIVATE_TEMP_PREFIX
_LISTED = 20  # names shown when a secret is missing
#: Largest secret value, bytes (a keytab is a few KiB).
MAX_SECRET_BYTES = 1 << 20


def store_dir(store: str | os.PathLike[str] | None = None) -> Path:
    """The store folder: ``store``, else ``$LASTLAYER_SECRETS_DIR``, else ``~/.lastlayer/secrets``."""
    if store is not None and str(store):
        return Path(store).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".lastlayer" / "secrets"


def secret_path(name: str, store: str | os.PathLike[str] | None = None) -> Path:
    """The file holding secret ``name``. Raises UsageError for an unsafe or empty name."""
    return store_dir(store).joinpath(*_parts(name))


def is_base64_name(name: str) -> bool:
    """Whether the secret's value is stored as base64 (its last name part has the DC/OS prefix)."""
    return _parts(name)[-1].startswith(BASE64_PREFIX)


def read_secret(name: str, store: str | os.PathLike[str] | None = None) -> bytes:
    """The value of secret ``name`` (base64-decoded for ``__dcos_base64__`` names).

    Raises:
        UsageError: the secret is missing (the message lists the names the store holds), its file is
            not the current user's or is open to group or others, or its base64 does not decode.
    """
    path = secret_path(name, store)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(_missing_message(name, path, store)) from None
    except PermissionError as exc:
        raise UsageError(
            f"secret {name!r}: cannot open {path} ({exc.strerror}); it must be readable by the user "
            "running the job: chown it to that user and chmod 600 it"
        ) from None
    try:
        _check_file(name, path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise UsageError(
            f"secret {name!r}: {path} holds more than {MAX_SECRET_BYTES:,} bytes, too many for a secret; "
            "store the right file"
        )
    if not is_base64_name(name):
        return data
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(
            f"secret {name!r}: its name starts with {BASE64_PREFIX} so {path} must hold base64 text, but "
            f"it does not decode ({exc}); store the value base64-encoded (e.g. `base64 -w0 keytab`) "
            f"or drop the {BASE64_PREFIX} prefix from the name"
        ) from None


def write_secret(
    name: str, data: bytes, store: str | os.PathLike[str] | None = None, base64_encode: bool = False
) -> Path:
    """Store secret ``name`` atomically (file 0600; folders created 0700); returns its path.

    With ``base64_encode`` the bytes are stored base64-encoded, which needs a ``__dcos_base64__``
    name so that :func:`read_secret` decodes them; such a name given without it must get base64 text.

    Raises:
        UsageError: an unsafe name, or a name and value that do not agree on base64.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError(f"secret {name!r}: the value must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if base64_encode:
        if not is_base64_name(name):
            raise UsageError(
                f"secret {name!r}: a base64-encoded secret needs a name starting with {BASE64_PREFIX} "
                f"(e.g. {BASE64_PREFIX}{_parts(name)[-1]}) so that it is decoded when read"
            )
        data = base64.b64encode(data)
    elif is_base64_name(name):
        try:
            base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(
                f"secret {name!r}: a {BASE64_PREFIX} secret must hold base64 text and this value is not "
                "base64; pass base64_encode=True to encode it"
            ) from None
    path = secret_path(name, store)
    _make_private_dirs(path.parent)
    storage.write_private(path, data)
    return path


def read_value_file(path: str) -> bytes:
    """The bytes of ``path``, the file holding a secret's value to store (a regular file of at most
    :data:`MAX_SECRET_BYTES`).

    Raises:
        UsageError: missing, unreadable, not a regular file, or too large (one line each).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(
            f"cannot read {path}: {exc.strerror}; give the file holding the secret's value"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file; give the file holding the secret's value")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise UsageError(
            f"{path} holds more than {MAX_SECRET_BYTES:,} bytes, too many for a secret; give the file "
            "holding the secret's value (e.g. the keytab)"
        )
    return data


def list_secrets(store: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the secrets in the store, sorted (never their values); an absent store holds none."""
    root = store_dir(store)
    names: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        names.extend(
            (rel / f).as_posix()
            for f in files
            if not f.startswith(_TEMP_PREFIX) and Path(folder, f).is_file()
        )
    return sorted(names)


def _parts(name: str) -> list[str]:
    """Split a secret name on ``/``, refusing names that could leave the store."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError("a secret name must be a non-empty string, e.g. __dcos_base64__tensorflow_keytab")
    if name.startswith(("/", "~")) or "\\" in name or "\0" in name:
        raise UsageError(
            f"secret name {name!r}: must be relative to the store, with '/' between parts and no "
            "leading '/' or '~', e.g. hdfs/keytab"
        )
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UsageError(
            f"secret name {name!r}: has an empty, '.' or '..' part; name the secret without them, "
            "e.g. hdfs/keytab"
        )
    if parts[-1].startswith(_TEMP_PREFIX):
        raise UsageError(f"secret name {name!r}: names starting with {_TEMP_PREFIX} are reserved")
    return parts


def _check_file(name: str, path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"secret {name!r}: {path} is not a regular file; store the secret as a plain file")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise UsageError(
            f"secret {name!r}: {path} belongs to uid {info.st_uid}, not to the user reading it (uid {uid}); "
            f"chown it to that user and chmod 600 {path}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise UsageError(
            f"secret {name!r}: {path} has mode {mode:04o}, open to group or others; run chmod 600 {path}"
        )


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and the missing folders above it, each 0700."""
    missing: list[Path] = []
    current = folder
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    try:
        for path in reversed(missing):
            path.mkdir(mode=0o700, exist_ok=True)
            path.chmod(0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise UsageError(
            f"cannot create the secret folder {folder}: {exc.strerror}; check that no file is in its way "
            "and that you may write there"
        ) from None
    if not folder.is_dir():
        raise UsageError(f"cannot store the secret: {folder} exists but is not a folder; remove or rename it")


def _missing_message(name: str, path: Path, store: str | os.PathLike[str] | None) -> str:
    root = store_dir(store)
    where = f"set {ENV_VAR} or pass the store to use" if store is None else "pass the store that holds it"
    if not root.is_dir():
        return (
            f"secret {name!r}: the secret store {root} does not exist; create it with the secret "
            f"in it (a file {path}, chmod 600), or {where}"
        )
    names = list_secrets(store)
    held = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
    return (
        f"secret {name!r}: no file {path} in the store {root} (it holds: {held or 'nothing'}); "
        f"add it there (chmod 600), or {where}"
    )
