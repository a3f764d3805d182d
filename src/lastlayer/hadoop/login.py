"""An explicit Hadoop login: Kerberos from a keytab, the Hadoop client configuration, kept fresh.

:class:`HadoopLogin` is a context manager built from a :class:`ClusterConfig` (the cluster flags). On
enter it reads the Hadoop configuration folder, or downloads ``core-site.xml`` and ``hdfs-site.xml``
into a private folder, and with a principal runs MIT ``kinit -k -t`` into a private credential cache
(folder 0700, file 0600); a background thread logs in again from the keytab before the ticket ends.
On exit it stops that thread and removes its private files. Without a principal the existing ticket
cache (``KRB5CCNAME``, ``kinit``) is used as it is. Keytab bytes never reach a log line.

What the login yields is explicit, and nothing is written to ``os.environ``: two logins live side by
side in one process. :meth:`HadoopLogin.storage_options` are for :mod:`lastlayer.storage`
(``hdfs://`` through :mod:`lastlayer.hadoop.fs` with this login's principal, credential cache and
configuration folder; ``webhdfs://`` with SPNEGO from this login's cache),
:meth:`HadoopLogin.spark_conf` for a Spark session, :meth:`HadoopLogin.env` for child processes.

One thing is process-wide: MIT Kerberos reads its configuration file from ``KRB5_CONFIG`` (default
``/etc/krb5.conf``) and has no per-client setting, so in-process clients (hdfs-native, SPNEGO) use the
process's krb5.conf whatever the login says. The rule: a login whose ``krb5_conf`` is not among the
files of ``KRB5_CONFIG`` gives no storage options (a :class:`KerberosError` says to set
``KRB5_CONFIG``); the command line exports it, a library user sets it before starting Python.
``kinit``, Spark and child processes get the login's own file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from lastlayer.errors import KerberosError, UsageError
from lastlayer.fetch import Limits
from lastlayer.hadoop import config as hadoop_config
from lastlayer.hadoop import fs as hadoop_fs
from lastlayer.settings.fields import option, problems

log = logging.getLogger(__name__)

#: Log in again when less than this fraction of the ticket's lifetime is left ...
RENEW_FRACTION = 0.2
#: ... and never later than this many seconds before its end.
MIN_MARGIN_S = 5.0
#: Longest sleep of the renewal thread between looks at the clock (wall time may jump).
CHECK_S = 60.0
#: After a failed renewal, the thread tries again this many seconds later.
RETRY_S = 30.0
KINIT_TIMEOUT_S = 30.0
DEFAULT_KRB5_CONF = "/etc/krb5.conf"


@dataclass
class ClusterConfig:
    """How to reach a Kerberized Hadoop cluster (any command that reads or writes ``hdfs://``)."""

    principal: str = option(
        "",
        "Kerberos principal to log in as from --keytab (e.g. tensorflow@LOCAL); "
        "default: the existing ticket cache (KRB5CCNAME).",
    )
    keytab: str = option("", "Keytab of --principal; the ticket goes to a private cache and is renewed.")
    krb5_conf: str = option("", "krb5.conf to use (default: KRB5_CONFIG or /etc/krb5.conf).")
    hadoop_conf_dir: str = option(
        "", "Folder with core-site.xml and hdfs-site.xml (default: HADOOP_CONF_DIR)."
    )
    hdfs_config_uri: str = option(
        "", "Base URL to download core-site.xml and hdfs-site.xml from (the walkthrough's hdfs.config_uri)."
    )
    hdfs_config_max_bytes: int = option(
        4 * 1024 * 1024, "Largest core-site.xml or hdfs-site.xml accepted from --hdfs_config_uri.", minimum=1
    )
    hdfs_config_timeout: float = option(
        30.0, "Seconds allowed to download each file from --hdfs_config_uri.", above=0
    )

    def validate(self) -> None:
        """--principal and --keytab go together; the download limits are positive.

        Raises:
            UsageError: naming the flag.
        """
        if bool(self.principal) != bool(self.keytab):
            given, missing = ("principal", "keytab") if self.principal else ("keytab", "principal")
            raise UsageError(f"--{given} needs --{missing}: pass both, or neither to use the ticket cache")
        for name, value, why in problems(self):
            raise UsageError(f"--{name}={value!r}: {why}")

    @property
    def download_limits(self) -> Limits:
        """The bounds of each download from ``hdfs_config_uri``."""
        return Limits(
            self.hdfs_config_max_bytes,
            self.hdfs_config_timeout,
            "--hdfs_config_max_bytes",
            "--hdfs_config_timeout",
        )


def renewal_delay(starts: float, expires: float, now: float) -> float:
    """Seconds from ``now`` until a ticket valid from ``starts`` to ``expires`` (Unix seconds) is to be
    renewed: when less than :data:`RENEW_FRACTION` of its lifetime, or :data:`MIN_MARGIN_S`, is left.
    0 when that time has come."""
    margin = max(MIN_MARGIN_S, (expires - starts) * RENEW_FRACTION)
    return max(0.0, expires - margin - now)


class HadoopLogin:
    """A Kerberos login and a Hadoop client configuration, for one ``with`` block.

    Attributes (the first three from the config, the others set on enter):
        principal: e.g. ``tensorflow@LOCAL``; ``""`` to use the existing ticket cache.
        keytab: absolute path of the keytab (``""`` without a principal).
        krb5_conf: absolute path of the krb5.conf to use, ``""`` for the process's.
        ccache: ``FILE:`` path of the private credential cache; without a principal the value of
            ``KRB5CCNAME`` (``""`` when unset).
        conf_dir: the folder holding core-site.xml and hdfs-site.xml, ``""`` for HADOOP_CONF_DIR.
        properties: the Hadoop properties of ``conf_dir`` (hdfs-site.xml over core-site.xml).
        starts, expires: the ticket's validity, Unix seconds (0 without a principal).
    """

    def __init__(self, config: ClusterConfig, *, folder: str = "", lifetime: float | None = None) -> None:
        """Check ``config``; nothing happens before ``with``.

        Args:
            folder: where the private files go (credential cache, downloaded configuration); made
                0700 if absent, and those files are removed on exit. Default: a new temporary
                folder, removed on exit.
            lifetime: ticket lifetime in seconds to ask the KDC for (default: the KDC's).

        Raises:
            UsageError: a flag is wrong (e.g. a principal without a keytab).
        """
        config.validate()
        self.config = config
        self.principal = config.principal
        self.keytab = os.path.abspath(config.keytab) if config.keytab else ""
        self.krb5_conf = os.path.abspath(config.krb5_conf) if config.krb5_conf else ""
        self.lifetime = lifetime
        self.ccache = ""
        self.conf_dir = ""
        self.properties: dict[str, str] = {}
        self.starts = self.expires = 0.0
        self._given_folder = folder
        self._folder = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> HadoopLogin:
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    # -- what the login yields ------------------------------------------------------------------
    def storage_options(self) -> dict[str, dict[str, Any]]:
        """Options for :mod:`lastlayer.storage`, grouped by protocol (each URL gets its own group).

        ``hdfs``/``viewfs``: this login's principal and credential cache and the configuration folder
        (read by :mod:`lastlayer.hadoop.fs`, registered with fsspec now); ``webhdfs``: SPNEGO from
        this login's cache (needs requests-kerberos). Empty groups are left out.

        Raises:
            KerberosError: ``krb5_conf`` is not this process's Kerberos configuration (module doc).
        """
        self._check_process_krb5_conf()
        hadoop_fs.register()
        native: dict[str, Any] = {}
        if self.conf_dir:
            native["hadoop_conf_dir"] = self.conf_dir
        if self.principal:
            native.update(kerberos_principal=self.principal, kerberos_cache=self.ccache)
        groups: dict[str, dict[str, Any]] = {"hdfs": native, "viewfs": dict(native)}
        if self.ccache:
            groups["webhdfs"] = {"kerberos": True, **self._spnego_credential()}
        return {protocol: group for protocol, group in groups.items() if group}

    def spark_conf(self) -> dict[str, str]:
        """Spark settings: Spark logs in from the same keytab (``spark.kerberos.*``), its JVMs use the
        same krb5.conf, and the Hadoop configuration goes in as ``spark.hadoop.*`` (for executors)
        and on the driver's class path (Spark's keytab login reads it there, before ``spark.hadoop.*``
        apply), so no ``HADOOP_CONF_DIR`` is needed."""
        conf = {f"spark.hadoop.{name}": value for name, value in self.properties.items()}
        if self.conf_dir:
            conf["spark.driver.extraClassPath"] = self.conf_dir
        if self.principal:
            conf["spark.kerberos.principal"] = self.principal
            conf["spark.kerberos.keytab"] = self.keytab
        if self.krb5_conf:
            java = f"-Djava.security.krb5.conf={self.krb5_conf}"
            conf["spark.driver.extraJavaOptions"] = java
            conf["spark.executor.extraJavaOptions"] = java
        return conf

    def env(self) -> dict[str, str]:
        """``KRB5CCNAME``, ``KRB5_CONFIG`` and ``HADOOP_CONF_DIR`` as this login sets them (only those),
        for a child process's environment or for the command line to export."""
        env: dict[str, str] = {}
        if self.principal:
            env["KRB5CCNAME"] = self.ccache
        if self.krb5_conf:
            env["KRB5_CONFIG"] = self.krb5_conf
        if self.conf_dir:
            env["HADOOP_CONF_DIR"] = self.conf_dir
        return env

    # -- enter and exit -------------------------------------------------------------------------
    def _open(self) -> None:
        self._stop = threading.Event()
        if self._given_folder:
            os.makedirs(self._given_folder, mode=0o700, exist_ok=True)
        self._folder = self._given_folder or tempfile.mkdtemp(prefix="lastlayer-hadoop-")  # 0700
        if self.config.hdfs_config_uri:
            self.conf_dir = os.path.join(self._folder, "hadoop-conf")
            os.makedirs(self.conf_dir, mode=0o700, exist_ok=True)
            self.properties = hadoop_config.download(
                self.config.hdfs_config_uri, self.conf_dir, self.config.download_limits
            )
        elif self.config.hadoop_conf_dir:
            self.conf_dir = os.path.abspath(self.config.hadoop_conf_dir)
            self.properties = hadoop_config.read_folder(self.conf_dir)
        if not self.principal:
            self.ccache = os.environ.get("KRB5CCNAME", "")
            return
        self.ccache = f"FILE:{os.path.join(self._folder, 'ccache')}"
        self._kinit()
        self._renewer = threading.Thread(target=self._keep_fresh, name="lastlayer-krb5-renewal", daemon=True)
        self._renewer.start()

    def _close(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(KINIT_TIMEOUT_S + 5.0)
            self._renewer = None
        if not self._folder:
            return
        if self._given_folder:
            shutil.rmtree(os.path.join(self._folder, "hadoop-conf"), ignore_errors=True)
            for name in ("ccache", ".ccache.new"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._folder, name))
        else:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = ""

    # -- Kerberos ---------------------------------------------------------------------------------
    def _keep_fresh(self) -> None:
        """The renewal thread: log in again from the keytab before the ticket ends, until exit."""
        while not self._stop.wait(min(CHECK_S, renewal_delay(self.starts, self.expires, time.time()))):
            if renewal_delay(self.starts, self.expires, time.time()) > 0:
                continue
            log.info("Kerberos ticket of %s ends soon: logging in again from the keytab", self.principal)
            try:
                self._kinit()
            except KerberosError as exc:
                log.warning("%s; trying again in %.0f s", exc, RETRY_S)
                self._stop.wait(RETRY_S)

    def _kinit(self) -> None:
        """Obtain a fresh ticket from the keytab into a new cache, then rename it onto :attr:`ccache`
        (a client reading the cache meanwhile finds the old ticket or the new one, never half a file)."""
        if not os.path.isfile(self.keytab):
            raise KerberosError(f"keytab {self.keytab} does not exist: pass the keytab of {self.principal}")
        path = self.ccache.removeprefix("FILE:")
        fresh = os.path.join(os.path.dirname(path), ".ccache.new")
        argv = ["kinit", "-c", f"FILE:{fresh}", "-k", "-t", self.keytab]
        if self.lifetime is not None:
            argv += ["-l", f"{max(1, round(self.lifetime))}s"]
        try:
            done = _run([*argv, self.principal], self._tool_env(), KINIT_TIMEOUT_S)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                reason = lines[-1] if lines else "kinit failed"
                raise KerberosError(
                    f"cannot log in as {self.principal} from {self.keytab}: {reason} "
                    "(check the principal, the keytab and that the KDC is reachable)"
                )
            os.chmod(fresh, 0o600)
            os.replace(fresh, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fresh)
        validity = _validity(self._tool_env())
        now = time.time()
        self.starts, self.expires = validity if validity else (now, now + 3600.0)
        log.info(
            "Logged in to Kerberos as %s (ticket valid until %s)",
            self.principal,
            datetime.fromtimestamp(self.expires).isoformat(timespec="seconds"),
        )

    def _tool_env(self) -> dict[str, str]:
        """The environment of ``kinit``/``klist`` for this login: the process's, with its cache and
        krb5.conf."""
        env = {**os.environ, "KRB5CCNAME": self.ccache}
        if self.krb5_conf:
            env["KRB5_CONFIG"] = self.krb5_conf
        return env

    def _spnego_credential(self) -> dict[str, Any]:
        """``kerb_kwargs`` naming this login's cache for requests-kerberos; nothing without a
        principal (the default cache is used) or without pyspnego (the webhdfs extra)."""
        if not self.principal:
            return {}
        try:
            from spnego import KerberosCCache
        except ImportError:
            return {}
        return {"kerb_kwargs": {"principal": KerberosCCache(ccache=self.ccache, principal=self.principal)}}

    def _check_process_krb5_conf(self) -> None:
        if not self.krb5_conf:
            return
        in_effect = os.environ.get("KRB5_CONFIG") or DEFAULT_KRB5_CONF
        if any(os.path.realpath(p) == os.path.realpath(self.krb5_conf) for p in in_effect.split(":") if p):
            return
        raise KerberosError(
            f"krb5.conf {self.krb5_conf} is not this process's Kerberos configuration ({in_effect}): "
            "in-process Kerberos clients read it from the environment only; set "
            f"KRB5_CONFIG={self.krb5_conf} before starting Python (the lastlayer command sets it)"
        )


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0])
    if tool is None:
        raise KerberosError(f"{argv[0]} not found: install the MIT Kerberos clients (Debian: krb5-user)")
    try:
        return subprocess.run(
            [tool, *argv[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise KerberosError(
            f"{argv[0]} gave no answer within {timeout:.0f} s: the KDC is unreachable; "
            "check that it runs and the kdc address in krb5.conf"
        ) from exc


def _klist_time(parts: list[str]) -> float | None:
    for fmt in ("%m/%d/%Y %H:%M:%S", "%m/%d/%y %H:%M:%S"):
        try:
            return datetime.strptime(" ".join(parts), fmt).timestamp()
        except ValueError:
            continue
    return None


def _validity(env: dict[str, str]) -> tuple[float, float] | None:
    """``(start, end)`` of the TGT in the cache as Unix times, from ``klist``."""
    done = _run(["klist"], {**env, "LC_ALL": "C"}, KINIT_TIMEOUT_S)
    if done.returncode != 0:
        return None
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1].startswith("krbtgt/"):
            start, end = _klist_time(parts[0:2]), _klist_time(parts[2:4])
            if start is not None and end is not None:
                return start, end
    return None


def default_realm() -> str | None:
    """``default_realm`` from ``KRB5_CONFIG`` (or /etc/krb5.conf), if set there."""
    path = os.environ.get("KRB5_CONFIG", DEFAULT_KRB5_CONF).split(":")[0]
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "default_realm":
                    return value.strip()
    except OSError:
        return None
    return None
