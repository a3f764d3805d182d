"""The job options file: the DC/OS TensorFlow service 0.2.0 options, as the walkthrough's ``poets.json``.

Every option is declared once, as a field of a frozen dataclass: its name, type, default, help
(``metadata["doc"]``) and limits (``minimum``, ``above``, ``maximum``, ``choices``, ``aliases``).
:meth:`JobSpec.from_dict` reads the parsed JSON against these declarations: unknown keys are refused
with the closest valid one, a misspelling the walkthrough itself makes (``worker.cpu``) is read with a
warning, and every error names the option's full path (``worker.count: must be >= 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_type_hints

from lastlayer import storage
from lastlayer.errors import UsageError
from lastlayer.storage import StorageOptions

LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL")
_SERVICE_NAME_RE = re.compile(r"/?[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:/[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
_MODULE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _meta(
    doc: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> dict[str, Any]:
    """An option's help and limits, kept in its field's ``metadata``."""
    return {
        "doc": doc,
        "minimum": minimum,
        "above": above,
        "maximum": maximum,
        "choices": choices,
        "aliases": aliases,
    }


def _opt(default: Any = MISSING, doc: str = "", **limits: Any) -> Any:
    """A scalar option; no default means required."""
    return field(default=default, metadata=_meta(doc, **limits))


@dataclass(frozen=True, kw_only=True)
class KdcSpec:
    """Where the Kerberos KDC listens."""

    hostname: str = _opt("", "Host name of the KDC.")
    port: int = _opt(88, "Port of the KDC.", minimum=1, maximum=65535)


@dataclass(frozen=True, kw_only=True)
class KerberosSpec:
    """Kerberos login of the job's tasks."""

    enabled: bool = _opt(False, "Log in to Kerberos (needed for a Kerberized HDFS).")
    debug: bool = _opt(False, "Verbose Kerberos logging.")
    kdc: KdcSpec = field(default_factory=KdcSpec, metadata=_meta("The KDC to use."))
    primary: str = _opt("", "Primary of the principal to log in as (e.g. tensorflow).")
    realm: str = _opt("", "Kerberos realm of the principal (e.g. LOCAL).")
    keytab_secret: str = _opt(
        "", "Name of the secret holding the principal's keytab (__dcos_base64__ prefix: stored as base64)."
    )


@dataclass(frozen=True, kw_only=True)
class SecuritySpec:
    """Security settings of the service."""

    kerberos: KerberosSpec = field(default_factory=KerberosSpec, metadata=_meta("Kerberos settings."))


@dataclass(frozen=True, kw_only=True)
class HdfsSpec:
    """How the tasks reach HDFS."""

    config_uri: str = _opt(
        "", "Base URL serving core-site.xml and hdfs-site.xml (e.g. the HDFS service's endpoints)."
    )


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """The ``service`` section: what to run and how."""

    name: str = _opt("tensorflow", "Name of the service (lower-case letters, digits, '-', '/' for folders).")
    user: str = _opt("root", "User the tasks run as.")
    log_level: str = _opt("INFO", "Log level of the job.", choices=LOG_LEVELS)
    job_url: str = _opt(doc="URL of the job archive (zip or tar.gz), e.g. a GitHub master.zip.")
    job_path: str = _opt("", "Folder inside the extracted archive that holds the job's Python file.")
    job_name: str = _opt(doc="Name of the job's Python file without .py (e.g. poets for poets.py).")
    job_context: str = _opt("{}", "A JSON object, as a string, handed to the job (e.g. its args).")
    shared_filesystem: str = _opt("", "URL of the job's shared folder; replaces {{shared_filesystem}}.")
    use_tensorboard: bool = _opt(False, "Run TensorBoard on the shared folder's summaries.")
    hdfs: HdfsSpec = field(default_factory=HdfsSpec, metadata=_meta("HDFS client settings."))
    security: SecuritySpec = field(default_factory=SecuritySpec, metadata=_meta("Security settings."))


@dataclass(frozen=True, kw_only=True)
class TaskGroupSpec:
    """One group of identical tasks (workers, parameter servers, GPU workers)."""

    count: int = _opt(1, "Number of tasks in the group.", minimum=0)
    cpus: float = _opt(1.0, "CPUs per task.", above=0, aliases=("cpu",))
    mem: float = _opt(1024.0, "Memory per task, MiB.", above=0)
    disk: float = _opt(0.0, "Disk per task, MiB.", minimum=0)
    gpus: int = _opt(0, "GPUs per task.", minimum=0)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole job options file (``poets.json``). Construction validates; see :meth:`from_dict`."""

    service: ServiceSpec = field(metadata=_meta("What to run and how."))
    worker: TaskGroupSpec = field(
        default_factory=lambda: TaskGroupSpec(count=1), metadata=_meta("The CPU workers.")
    )
    parameter_server: TaskGroupSpec = field(
        default_factory=lambda: TaskGroupSpec(count=0), metadata=_meta("The parameter servers.")
    )
    gpu_worker: TaskGroupSpec = field(
        default_factory=lambda: TaskGroupSpec(count=0, gpus=1), metadata=_meta("The GPU workers.")
    )

    def __post_init__(self) -> None:
        problems = _check(self, "")
        if problems:
            raise UsageError(_summary(problems))

    @classmethod
    def from_dict(cls, data: Any) -> tuple[JobSpec, list[str]]:
        """Read parsed JSON into a validated spec; returns ``(spec, warning lines)``.

        Raises:
            UsageError: naming the option path of every problem found (unknown or missing options,
                wrong types, out-of-range values).
        """
        warnings: list[str] = []
        problems: list[str] = []
        spec = _read(cls, data, "", None, warnings, problems)
        if problems or spec is None:
            raise UsageError(_summary(problems))
        return spec, warnings

    @classmethod
    def load(
        cls, path_or_url: str, storage_options: StorageOptions | None = None
    ) -> tuple[JobSpec, list[str]]:
        """Read a JSON options file (local path or fsspec URL); returns ``(spec, warning lines)``.

        Raises:
            StorageError: the file cannot be read.
            UsageError: it is not JSON (with line and column) or its options are wrong.
        """
        raw = storage.read_bytes(path_or_url, storage_options)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{path_or_url}: not UTF-8 text (byte {exc.start}): save the options file as UTF-8 JSON"
            ) from exc
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path_or_url}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                "fix the file (check quotes, commas and braces there)"
            ) from exc
        except _DuplicateKeyError as exc:
            raise UsageError(f"{path_or_url}: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data, every option spelled as declared (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    def context(self) -> dict[str, Any]:
        """``service.job_context`` parsed (a fresh dict on every call)."""
        return _parse_context(self.service.job_context)[0] or {}


def describe_options() -> Iterator[tuple[str, str, Any, str]]:
    """Every option as ``(path, type name, default, doc)``; required options have default ``None``."""
    yield from _describe(JobSpec, "", None)


# --- reading -------------------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f'the key "{key}" appears twice in one object: keep one of them')
        out[key] = value
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _summary(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the job options: " + "; ".join(problems)


def _is_spec(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _read(
    cls: type,
    data: Any,
    path: str,
    base: Any,
    warnings: list[str],
    problems: list[str],
) -> Any:
    """Build ``cls`` from ``data``; absent options come from ``base`` (an instance) or the defaults."""
    where = path or "the job options"
    if not isinstance(data, Mapping):
        problems.append(f"{where}: must be a JSON object, got {_json_type(data)}")
        return None
    hints = get_type_hints(cls)
    by_key: dict[str, dataclasses.Field[Any]] = {}
    for f in fields(cls):
        by_key[f.name] = f
        for alias in f.metadata["aliases"]:
            by_key[alias] = f
    given: dict[str, str] = {}  # field name -> key used
    for key in data:
        f = by_key.get(key) if isinstance(key, str) else None
        if f is None:
            valid = [f.name for f in fields(cls)]
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = (
                f" (did you mean {_join(path, close[0])}?)"
                if close
                else f": remove it (options here: {', '.join(_join(path, v) for v in valid)})"
            )
            problems.append(f"unknown option {_join(path, str(key))}{hint}")
            continue
        if f.name in given:
            problems.append(
                f"{_join(path, given[f.name])} and {_join(path, key)} both set {_join(path, f.name)}: "
                "keep one"
            )
            continue
        given[f.name] = key
        if key != f.name:
            warnings.append(
                f"{_join(path, key)} is read as {_join(path, f.name)}: rename the key to {f.name!r} "
                "(the service's option name)"
            )
    values: dict[str, Any] = {}
    for f in fields(cls):
        full = _join(path, f.name)
        kind = hints[f.name]
        default = getattr(base, f.name) if base is not None else _default(f)
        if f.name not in given:
            if default is MISSING and _is_spec(kind):
                values[f.name] = _read(kind, {}, full, None, warnings, problems)
            elif default is MISSING:
                problems.append(f"{full} is required: {f.metadata['doc']} Add it to the options file")
            else:
                values[f.name] = default
            continue
        value = data[given[f.name]]
        if _is_spec(kind):
            base_value = None if default is MISSING else default
            values[f.name] = _read(kind, value, full, base_value, warnings, problems)
        else:
            values[f.name] = _coerce(kind, value, _join(path, given[f.name]), problems)
    if problems:
        return None
    return cls(**values)  # a JobSpec validates itself here and raises UsageError


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _coerce(kind: Any, value: Any, full: str, problems: list[str]) -> Any:
    """Check a JSON value against a field's type; numbers become the declared type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{full}: must be true or false, got {_json_type(value)} ({json.dumps(value)})")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{full}: must be a whole number, got {_json_type(value)} ({json.dumps(value)})")
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{full}: must be a number, got {_json_type(value)} ({json.dumps(value)})")
    elif kind is str:
        if isinstance(value, str):
            return value
        problems.append(f"{full}: must be a string, got {_json_type(value)} ({json.dumps(value)})")
    else:  # pragma: no cover - every declared type is handled above
        raise TypeError(f"{full}: unsupported option type {kind!r}")
    return None


# --- validation ----------------------------------------------------------------------------------


def _check(spec: Any, path: str) -> list[str]:
    """Limits from field metadata, then each section's own rules; messages name the option path."""
    problems: list[str] = []
    hints = get_type_hints(type(spec))
    for f in fields(spec):
        value = getattr(spec, f.name)
        full = _join(path, f.name)
        if _is_spec(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                problems.append(f"{full}: must be a {hints[f.name].__name__}, got {type(value).__name__}")
            else:
                problems.extend(_check(value, full))
            continue
        if not _type_ok(hints[f.name], value):
            problems.append(f"{full}: must be a {hints[f.name].__name__}, got {type(value).__name__}")
            continue
        meta = f.metadata
        shown = json.dumps(value) if isinstance(value, str) else repr(value)
        if meta["minimum"] is not None and value < meta["minimum"]:
            problems.append(f"{full}: must be >= {meta['minimum']}, got {shown}")
        if meta["above"] is not None and value <= meta["above"]:
            problems.append(f"{full}: must be > {meta['above']}, got {shown}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            problems.append(f"{full}: must be <= {meta['maximum']}, got {shown}")
        if meta["choices"] is not None and str(value).upper() not in meta["choices"]:
            problems.append(f"{full}: must be one of {', '.join(meta['choices'])}, got {shown}")
    if isinstance(spec, ServiceSpec):
        problems.extend(_check_service(spec, path))
    elif isinstance(spec, KerberosSpec):
        problems.extend(_check_kerberos(spec, path))
    elif isinstance(spec, JobSpec) and spec.gpu_worker.count > 0 and spec.gpu_worker.gpus < 1:
        problems.append(
            f"gpu_worker.gpus: must be >= 1 when gpu_worker.count is {spec.gpu_worker.count}, "
            f"got {spec.gpu_worker.gpus}; give each GPU worker a GPU, or use worker for CPU tasks"
        )
    return problems


def _type_ok(kind: Any, value: Any) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _check_service(spec: ServiceSpec, path: str) -> list[str]:
    problems: list[str] = []
    if not _SERVICE_NAME_RE.fullmatch(spec.name):
        problems.append(
            f"{_join(path, 'name')}: {spec.name!r} is not a service name: use lower-case letters, digits "
            "and '-' (not at either end), with '/' between folder levels, e.g. tensorflow or dev/poets"
        )
    if not spec.user:
        problems.append(f"{_join(path, 'user')}: must not be empty; name the user the tasks run as")
    if not spec.job_url.strip():
        problems.append(f"{_join(path, 'job_url')}: must not be empty; give the URL of the job archive")
    if not _MODULE_NAME_RE.fullmatch(spec.job_name):
        hint = (
            f"drop the .py: {spec.job_name[:-3]!r}"
            if spec.job_name.endswith(".py")
            else "give the name of the job's Python file without .py, e.g. poets"
        )
        problems.append(f"{_join(path, 'job_name')}: {spec.job_name!r} is not a module name; {hint}")
    job_path = spec.job_path
    if job_path.startswith("/") or ".." in job_path.replace("\\", "/").split("/"):
        problems.append(
            f"{_join(path, 'job_path')}: {job_path!r} must be a folder relative to the archive's root, "
            f"without '..', e.g. {posixpath.basename(job_path.rstrip('/')) or 'poets'!r}"
        )
    _, error = _parse_context(spec.job_context)
    if error:
        problems.append(f"{_join(path, 'job_context')}: {error}")
    return problems


def _check_kerberos(spec: KerberosSpec, path: str) -> list[str]:
    if not spec.enabled:
        return []
    needed = {
        "primary": (spec.primary, "the principal's primary, e.g. tensorflow"),
        "realm": (spec.realm, "the realm, e.g. LOCAL"),
        "kdc.hostname": (spec.kdc.hostname, "the KDC's host name"),
        "keytab_secret": (spec.keytab_secret, "the name of the secret holding the keytab"),
    }
    return [
        f"{_join(path, name)}: must be set when {_join(path, 'enabled')} is true; give {what}, "
        f"or set {_join(path, 'enabled')} to false"
        for name, (value, what) in needed.items()
        if not value.strip()
    ]


def _parse_context(text: str) -> tuple[dict[str, Any] | None, str]:
    """``(parsed object, "")`` or ``(None, what is wrong)``."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, (
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
            'it must be a JSON object written as a string, e.g. "{\\"args\\": {}}"'
        )
    if not isinstance(parsed, dict):
        return None, f'must hold a JSON object, got {_json_type(parsed)}; wrap it as {{"args": ...}}'
    return parsed, ""


def _describe(cls: type, path: str, base: Any) -> Iterator[tuple[str, str, Any, str]]:
    hints = get_type_hints(cls)
    for f in fields(cls):
        full = _join(path, f.name)
        default = getattr(base, f.name) if base is not None else _default(f)
        if _is_spec(hints[f.name]):
            yield from _describe(hints[f.name], full, None if default is MISSING else default)
        else:
            yield full, hints[f.name].__name__, None if default is MISSING else default, f.metadata["doc"]
