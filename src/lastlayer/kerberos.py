"""Kerberos: log in from a keytab into a private credential cache, and keep the ticket fresh.

hdfs-native (and every GSSAPI client) reads the cache named by ``KRB5CCNAME``. :func:`login` runs
MIT ``kinit -k -t`` into a cache in a private folder (mode 0700, file 0600) and points
``KRB5CCNAME`` at it; :meth:`Login.ensure_fresh` logs in again from the keytab when the ticket is
close to expiry, so a long job outlives its ticket. Without a keytab, an existing ticket cache is
used as it is. Keytab bytes and passwords never reach a log line: commands are logged by name only.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from lastlayer.errors import KerberosError

log = logging.getLogger(__name__)

#: Log in again when less than this fraction of the ticket's lifetime is left.
RENEW_FRACTION = 0.2
KINIT_TIMEOUT_S = 30.0


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


def _expiry(env: dict[str, str]) -> tuple[float, float] | None:
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


@dataclass
class Login:
    """A keytab login kept in a private credential cache.

    Attributes:
        principal: e.g. ``tensorflow@LOCAL``.
        keytab: path of the keytab file.
        ccache: ``FILE:`` path of the private credential cache.
        krb5_conf: krb5.conf to use, or ``None`` for the system's.
        starts, expires: the ticket's validity, Unix seconds.
    """

    principal: str
    keytab: str
    ccache: str
    krb5_conf: str | None = None
    starts: float = 0.0
    expires: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def env(self) -> dict[str, str]:
        """The environment for Kerberos tools and clients of this login."""
        env = {**os.environ, "KRB5CCNAME": self.ccache}
        if self.krb5_conf:
            env["KRB5_CONFIG"] = self.krb5_conf
        return env

    def kinit(self) -> None:
        """Obtain a fresh ticket from the keytab."""
        if not os.path.isfile(self.keytab):
            raise KerberosError(f"keytab {self.keytab} does not exist: pass the keytab of {self.principal}")
        done = _run(["kinit", "-k", "-t", self.keytab, self.principal], self.env(), KINIT_TIMEOUT_S)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            reason = lines[-1] if lines else "kinit failed"
            raise KerberosError(
                f"cannot log in as {self.principal} from {self.keytab}: {reason} "
                "(check the principal, the keytab and that the KDC is reachable)"
            )
        validity = _expiry(self.env())
        now = time.time()
        self.starts, self.expires = validity if validity else (now, now + 3600.0)
        log.info(
            "Logged in to Kerberos as %s (ticket valid until %s)",
            self.principal,
            datetime.fromtimestamp(self.expires).isoformat(timespec="seconds"),
        )

    def ensure_fresh(self) -> None:
        """Log in again from the keytab when the ticket is near its end (cheap when it is not)."""
        margin = max(5.0, (self.expires - self.starts) * RENEW_FRACTION)
        if time.time() < self.expires - margin:
            return
        with self._lock:
            if time.time() >= self.expires - margin:
                log.info("Kerberos ticket of %s ends soon: logging in again from the keytab", self.principal)
                self.kinit()


def default_realm() -> str | None:
    """``default_realm`` from ``KRB5_CONFIG`` (or /etc/krb5.conf), if set there."""
    path = os.environ.get("KRB5_CONFIG", "/etc/krb5.conf").split(":")[0]
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "default_realm":
                    return value.strip()
    except OSError:
        return None
    return None


_active: Login | None = None


def login(principal: str, keytab: str, krb5_conf: str | None = None) -> Login:
    """Log in as ``principal`` from ``keytab`` into a private cache and point ``KRB5CCNAME`` at it.

    Raises:
        KerberosError: in one line, with what to check.
    """
    global _active
    folder = tempfile.mkdtemp(prefix="lastlayer-krb5-")  # created 0700
    result = Login(principal, os.path.abspath(keytab), f"FILE:{folder}/ccache", krb5_conf)
    result.kinit()
    os.chmod(os.path.join(folder, "ccache"), 0o600)
    os.environ["KRB5CCNAME"] = result.ccache
    if krb5_conf:
        os.environ["KRB5_CONFIG"] = krb5_conf
    _active = result
    return result


def active() -> Login | None:
    """The keytab login made by :func:`login` in this process, if any."""
    return _active


def ensure_fresh() -> None:
    """Renew the active keytab login when it is near expiry; nothing without one."""
    if _active is not None:
        _active.ensure_fresh()
