"""The job options file: the DC/OS TensorFlow service 0.2.0 options, as the walkthrough's ``poets.json``.

Every option is declared once, as a field made by :func:`lastlayer.settings.fields.option`: its name, type,
default, help and limits (``minimum``, ``above``, ``maximum``, ``choices``, ``aliases``). Options
the service accepts without acting on them carry an ``unsupported`` note that says what happens
instead. :meth:`JobSpec.from_dict` reads the parsed JSON against these declarations: unknown keys
are refused with the closest valid one, a misspelling the walkthrough itself makes (``worker.cpu``)
and an unsupported option set to another value than its default are read with a warning, and every
error names the option's full path (``worker.count: must be >= 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass
from typing import Any, get_type_hints

from lastlayer import storage
from lastlayer.errors import DataError, UsageError
from lastlayer.fetch import Limits, fetch, shown
from lastlayer.settings import fields
from lastlayer.settings.fields import LOG_LEVELS, option
from lastlayer.storage import StorageOptions

_SERVICE_NAME_RE = re.compile(r"/?[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:/[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
_MODULE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Largest options file read, bytes, and the longest wait for one (e.g. given as a URL), seconds.
MAX_OPTIONS_BYTES = 1 << 20
#: Most tasks of a group: more than one machine's supervisor runs.
MAX_TASKS = 1024
OPTIONS_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True)
class KdcSpec:
    """Where the Kerberos KDC listens."""

    hostname: str = option("", "Host name of the KDC.")
    port: int = option(88, "Port of the KDC.", minimum=1, maximum=65535)


@dataclass(frozen=True, kw_only=True)
class KerberosSpec:
    """Kerberos login of the job's tasks."""

    enabled: bool = option(False, "Log in to Kerberos (needed for a Kerberized HDFS).")
    debug: bool = option(
        False, "Verbose Kerberos logging: the tasks trace Kerberos (KRB5_TRACE) to their stderr."
    )
    kdc: KdcSpec = option(doc="The KDC to use.", factory=KdcSpec)
    primary: str = option("", "Primary of the principal to log in as (e.g. tensorflow).")
    realm: str = option("", "Kerberos realm of the principal (e.g. LOCAL).")
    keytab_secret: str = option(
        "", "Name of the secret holding the principal's keytab (__dcos_base64__ prefix: stored as base64)."
    )


@dataclass(frozen=True, kw_only=True)
class SecuritySpec:
    """Security settings of the service."""

    kerberos: KerberosSpec = option(doc="Kerberos settings.", factory=KerberosSpec)


@dataclass(frozen=True, kw_only=True)
class HdfsSpec:
    """How the tasks reach HDFS."""

    config_uri: str = option(
        "", "Base URL serving core-site.xml and hdfs-site.xml (e.g. the HDFS service's endpoints)."
    )
    config_max_bytes: int = option(
        4 * 1024 * 1024,
        "Largest core-site.xml or hdfs-site.xml accepted from config_uri, bytes (lastlayer's own).",
        minimum=1,
    )
    config_timeout: float = option(
        30.0, "Seconds allowed to download each file from config_uri (lastlayer's own).", above=0
    )


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """The ``service`` section: what to run and how."""

    name: str = option(
        "tensorflow", "Name of the service (lower-case letters, digits, '-', '/' for folders)."
    )
    user: str = option(
        "",
        "User the tasks (and TensorBoard) run as; another user than the deploying one needs a service "
        "running as root (default: the user who deploys the job).",
    )
    log_level: str = option("INFO", "Log level of the job.", choices=LOG_LEVELS)
    job_url: str = option(doc="URL of the job archive (zip or tar.gz), e.g. a GitHub master.zip.")
    job_url_max_bytes: int = option(
        512 * 1024 * 1024,
        "Largest job archive, bytes: what is downloaded from job_url and what it extracts to "
        "(lastlayer's own).",
        minimum=1,
    )
    job_url_timeout: float = option(600.0, "Seconds allowed to download job_url (lastlayer's own).", above=0)
    job_path: str = option("", "Folder inside the extracted archive that holds the job's Python file.")
    job_name: str = option(doc="Name of the job's Python file without .py (e.g. poets for poets.py).")
    job_context: str = option("{}", "A JSON object, as a string, handed to the job (e.g. its args).")
    shared_filesystem: str = option("", "URL of the job's shared folder; replaces {{shared_filesystem}}.")
    use_tensorboard: bool = option(
        False,
        "Run TensorBoard on the job's log_dir (its summaries) while the job runs, on 127.0.0.1; "
        "`job plan show` and `job tasks` print its URL.",
    )
    hdfs: HdfsSpec = option(doc="HDFS client settings.", factory=HdfsSpec)
    security: SecuritySpec = option(doc="Security settings.", factory=SecuritySpec)


@dataclass(frozen=True, kw_only=True)
class TaskGroupSpec:
    """One group of identical tasks (workers, parameter servers, GPU workers)."""

    count: int = option(1, "Number of tasks in the group.", minimum=0, maximum=MAX_TASKS)
    cpus: float = option(1.0, "CPUs per task.", above=0, aliases=("cpu",))
    mem: float = option(1024.0, "Memory per task, MiB.", above=0)
    disk: float = option(
        0.0, "Disk per task, MiB: checked free in the job's state folder at deploy.", minimum=0
    )
    gpus: int = option(0, "GPUs per task.", minimum=0)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole job options file (``poets.json``). Construction validates; see :meth:`from_dict`."""

    service: ServiceSpec = option(doc="What to run and how.")
    worker: TaskGroupSpec = option(doc="The CPU workers.", factory=lambda: TaskGroupSpec(count=1))
    parameter_server: TaskGroupSpec = option(
        doc="The parameter servers.", factory=lambda: TaskGroupSpec(count=0)
    )
    gpu_worker: TaskGroupSpec = option(doc="The GPU workers.", factory=lambda: TaskGroupSpec(count=0, gpus=1))

    def __post_init__(self) -> None:
        problems = _check(self, "")
        if problems:
            raise UsageError(_summary(problems))

    @classmethod
    def from_dict(cls, data: Any) -> tuple[JobSpec, list[str]]:
        """Read parsed JSON into a validated spec; returns ``(spec, warning lines)``.

        Warnings: an alias used for an option's name, an unsupported option given another value than
        its default (saying what happens instead).

        Raises:
            UsageError: naming the option path of every problem found (unknown or missing options,
                wrong types, out-of-range values).
        """
        warnings: list[str] = []
        problems: list[str] = []
        spec = _read(cls, data, "", None, warnings, problems)
        if problems or spec is None:
            raise UsageError(_summary(problems))
        return spec, warnings + list(_unsupported(spec, ""))

    @classmethod
    def load(
        cls, path_or_url: str, storage_options: StorageOptions | None = None, *, seconds: float | None = None
    ) -> tuple[JobSpec, list[str]]:
        """Read a JSON options file (local path or fsspec URL); returns ``(spec, warning lines)``.

        The read is bounded: at most :data:`MAX_OPTIONS_BYTES`, within ``seconds`` (the deploy's
        ``--timeout`` left; default :data:`OPTIONS_TIMEOUT_S`).

        Raises:
            StorageError: the file cannot be read in time.
            UsageError: it is too large, not JSON (with line and column) or its options are wrong.
        """
        limits = Limits(MAX_OPTIONS_BYTES, seconds or OPTIONS_TIMEOUT_S, "", "--timeout")
        try:
            if not path_or_url.lower().startswith(("http://", "https://")):  # a FIFO would never end
                storage.require_regular(path_or_url, storage_options, "the options file")
        except DataError as exc:
            raise UsageError(f"{exc}: pass a JSON options file") from None
        try:
            raw = fetch(path_or_url, limits, storage_options=storage_options, what="the options file")
        except DataError:
            raise UsageError(
                f"{shown(path_or_url)}: more than {MAX_OPTIONS_BYTES:,} bytes, too large for an options file "
                "(a small JSON file): check the path"
            ) from None
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
    """Every option as ``(path, type name, default, doc)``; required options have default ``None``.

    ``lastlayer job deploy --help`` lists them.
    """
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


def _keys(
    cls: type, data: Mapping[Any, Any], path: str, warnings: list[str], problems: list[str]
) -> dict[str, str]:
    """Which key of ``data`` gives each field of ``cls`` (field name -> key); unknown keys are problems."""
    by_key: dict[str, dataclasses.Field[Any]] = {}
    for f in dataclasses.fields(cls):
        by_key[f.name] = f
        for alias in fields.info(f).aliases:
            by_key[alias] = f
    given: dict[str, str] = {}
    for key in data:
        f = by_key.get(key) if isinstance(key, str) else None
        if f is None:
            valid = [f.name for f in dataclasses.fields(cls)]
            close = fields.closest(str(key), valid)
            hint = (
                f" (did you mean {_join(path, close)}?)"
                if close
                else f": remove it (options here: {', '.join(_join(path, v) for v in valid)})"
            )
            problems.append(f"unknown option {_join(path, str(key))}{hint}")
        elif f.name in given:
            problems.append(
                f"{_join(path, given[f.name])} and {_join(path, key)} both set {_join(path, f.name)}: "
                "keep one"
            )
        else:
            given[f.name] = key
            if key != f.name:
                warnings.append(
                    f"{_join(path, key)} is read as {_join(path, f.name)}: rename the key to {f.name!r} "
                    "(the service's option name)"
                )
    return given


def _read(
    cls: type,
    data: Any,
    path: str,
    base: Any,
    warnings: list[str],
    problems: list[str],
) -> Any:
    """Build ``cls`` from ``data``; absent options come from ``base`` (an instance) or the defaults."""
    if not isinstance(data, Mapping):
        problems.append(f"{path or 'the job options'}: must be a JSON object, got {_json_type(data)}")
        return None
    hints = get_type_hints(cls)
    given = _keys(cls, data, path, warnings, problems)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        full = _join(path, f.name)
        kind = hints[f.name]
        default = getattr(base, f.name) if base is not None else fields.default(f)
        if f.name not in given:
            if default is MISSING and fields.is_section(kind):
                values[f.name] = _read(kind, {}, full, None, warnings, problems)
            elif default is MISSING:
                problems.append(f"{full} is required: {fields.info(f).doc} Add it to the options file")
            else:
                values[f.name] = default
            continue
        value = data[given[f.name]]
        if fields.is_section(kind):
            base_value = None if default is MISSING else default
            values[f.name] = _read(kind, value, full, base_value, warnings, problems)
        else:
            values[f.name] = _coerce(kind, value, _join(path, given[f.name]), problems)
    if problems:
        return None
    return cls(**values)  # a JobSpec validates itself here and raises UsageError


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


def _unsupported(spec: Any, path: str) -> Iterator[str]:
    """A warning for each unsupported option whose value is not its default, saying what happens."""
    hints = get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        full = _join(path, f.name)
        if fields.is_section(hints[f.name]):
            yield from _unsupported(value, full)
            continue
        note = fields.info(f).unsupported
        if note and value != fields.default(f):
            yield f"{full} is {json.dumps(value)}, which is ignored: {note}"


# --- validation ----------------------------------------------------------------------------------


def _check(spec: Any, path: str) -> list[str]:
    """Types and declared limits, then each section's own rules; messages name the option path."""
    problems: list[str] = []
    hints = get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        full = _join(path, f.name)
        kind = hints[f.name]
        if not _type_ok(kind, value):
            problems.append(f"{full}: must be a {kind.__name__}, got {type(value).__name__}")
        elif fields.is_section(kind):
            problems.extend(_check(value, full))
        else:
            problem = fields.problem(f, value)
            if problem is not None:
                shown = json.dumps(value) if isinstance(value, str) else repr(value)
                problems.append(f"{full}: {problem}, got {shown}")
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


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a service name (DC/OS's rules), or ``None`` when it is one."""
    if _SERVICE_NAME_RE.fullmatch(name):
        return None
    return (
        f"{name!r} is not a service name: use lower-case letters, digits and '-' (not at either end), "
        "with '/' between folder levels, e.g. tensorflow or dev/poets"
    )


def _check_service(spec: ServiceSpec, path: str) -> list[str]:
    problems: list[str] = []
    problem = name_problem(spec.name)
    if problem:
        problems.append(f"{_join(path, 'name')}: {problem}")
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
    for f in dataclasses.fields(cls):
        full = _join(path, f.name)
        default = getattr(base, f.name) if base is not None else fields.default(f)
        if fields.is_section(hints[f.name]):
            yield from _describe(hints[f.name], full, None if default is MISSING else default)
        else:
            yield full, hints[f.name].__name__, None if default is MISSING else default, fields.info(f).doc
