#!/usr/bin/env python3
"""A real Kerberized HDFS on 127.0.0.1: an MIT Kerberos KDC plus Hadoop's secure MiniDFSCluster.

Standard library only. Command line (see harness/README.md)::

    python harness/securehdfs.py start  --dir DIR [--timeout 180] [--nn-port P] [--http-port P]
    python harness/securehdfs.py status --dir DIR
    python harness/securehdfs.py env    --dir DIR [--user tensorflow]   # shell export lines
    python harness/securehdfs.py map    --dir DIR PRINCIPAL             # Hadoop's auth_to_local
    python harness/securehdfs.py restart-nn --dir DIR
    python harness/securehdfs.py start-yarn --dir DIR                # + secure MiniYARNCluster
    python harness/securehdfs.py stop   --dir DIR

Python API (what tests use)::

    hdfs = SecureHdfs.start(dir, timeout=180)        # KDC + cluster, owned by this process
    env = hdfs.env("tensorflow")                     # KRB5_CONFIG, HADOOP_CONF_DIR, KRB5CCNAME
    hdfs.namenode_url, hdfs.webhdfs_url, hdfs.conf_dir, hdfs.krb5_conf
    hdfs.map_principal("bob@LOCAL")                  # -> "bob" (Hadoop's own answer)
    hdfs.restart_namenode(timeout=120); hdfs.kdc_stop(); hdfs.kdc_start()
    hdfs.stop()

The realm is ``LOCAL`` with principals ``hdfs/localhost``, ``HTTP/localhost`` (both in
``DIR/keytabs/server.keytab``) and the users ``tensorflow``, ``alice``, ``bob`` (one keytab each,
``DIR/keytabs/<user>.keytab``). Hadoop maps principals with the walkthrough's five auth_to_local rules.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
TARGET_DIR = HARNESS_DIR / "target"
HARNESS_JAR = TARGET_DIR / "securehdfs-harness.jar"
HARNESS_LIB = TARGET_DIR / "lib"
MAIN_CLASS = "lastlayer.harness.SecureHdfs"
YARN_CLASS = "lastlayer.harness.SecureYarn"

REALM = "LOCAL"
HOST = "localhost"
SERVICE_PRINCIPALS = (f"hdfs/{HOST}", f"HTTP/{HOST}")
#: The YARN daemons' principals; keytabs/yarn.keytab holds them and HTTP/localhost (SPNEGO).
YARN_PRINCIPALS = (f"rm/{HOST}", f"nm/{HOST}")
USERS = ("tensorflow", "alice", "bob")
ENCTYPES = ("aes256-cts-hmac-sha1-96", "aes128-cts-hmac-sha1-96")

# What `start` (re)creates inside DIR; nothing else there is touched.
OWNED = (
    "kdc",
    "keytabs",
    "conf",
    "minidfs",
    "logs",
    "ccache",
    "kdc.conf",
    "krb5.conf",
    "control.token",
    "state.json",
    "target",
    "bin",
)

JAVA_OPENS = (
    "java.base/java.lang",
    "java.base/java.lang.reflect",
    "java.base/java.io",
    "java.base/java.net",
    "java.base/java.nio",
    "java.base/java.util",
    "java.base/java.util.concurrent",
    "java.base/java.util.concurrent.atomic",
    "java.base/sun.nio.ch",
    "java.base/sun.security.util",
    "java.security.jgss/sun.security.krb5",
)


class HarnessError(RuntimeError):
    """The KDC or the cluster could not be started, reached or stopped."""


class MappingError(HarnessError):
    """Hadoop's auth_to_local refused a principal (the message is Hadoop's)."""


# --------------------------------------------------------------------------------------------- utils


def _which(name: str) -> str:
    """A tool from PATH or the sbin folders (kdb5_util, krb5kdc and kadmin.local live in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"
    found = shutil.which(name, path=path)
    if not found:
        hint = {
            "krb5kdc": "krb5-kdc",
            "kdb5_util": "krb5-kdc",
            "kadmin.local": "krb5-admin-server",
            "kinit": "krb5-user",
            "klist": "krb5-user",
            "java": "openjdk-17-jdk-headless",
            "mvn": "maven",
        }.get(name, name)
        raise HarnessError(f"{name} not found: apt-get install {hint} (or run scripts/install.sh test)")
    return found


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    return _which("java")


def _free_port(udp_too: bool = False) -> int:
    """A port free on 127.0.0.1 for TCP (and UDP when asked)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise HarnessError("no free port on 127.0.0.1")


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return "\n".join(text[-lines:])


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether pid runs (not a zombie) and, when marker is given, its command line contains it."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    return marker is None or marker in cmdline


def _wait_gone(pid: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not _pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def _terminate(pid: int | None, marker: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM, wait up to timeout, then SIGKILL; only a process whose command line has marker."""
    if not pid or not _pid_alive(pid, marker):
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout, proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10, proc)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort only
        pass


# ------------------------------------------------------------------------------------------- build


def _newest_source_mtime() -> float:
    newest = (HARNESS_DIR / "pom.xml").stat().st_mtime
    for p in (HARNESS_DIR / "src").rglob("*"):
        if p.is_file():
            newest = max(newest, p.stat().st_mtime)
    return newest


def harness_built() -> bool:
    """Whether target/ holds a jar newer than the sources and the dependency folder."""
    return (
        HARNESS_JAR.exists()
        and HARNESS_LIB.is_dir()
        and any(HARNESS_LIB.glob("hadoop-hdfs-*.jar"))
        and HARNESS_JAR.stat().st_mtime >= _newest_source_mtime()
    )


def ensure_built(timeout: float = 1200, log: Path | None = None) -> None:
    """Builds the Java harness with Maven when needed (offline first, then online)."""
    if harness_built():
        return
    TARGET_DIR.mkdir(exist_ok=True)
    with open(TARGET_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if harness_built():
            return
        mvn = _which("mvn")
        _which("java")
        base = [mvn, "-q", "-B", "-f", str(HARNESS_DIR / "pom.xml"), "-DskipTests", "package"]
        # A stale lib/ (e.g. another Hadoop version) would end up on the class path: start clean.
        shutil.rmtree(HARNESS_LIB, ignore_errors=True)
        out = ""
        deadline = time.monotonic() + timeout
        for cmd in ([*base[:1], "-o", *base[1:]], base):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                r = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=left, stdin=subprocess.DEVNULL
                )
            except subprocess.TimeoutExpired as e:
                raise HarnessError(f"building the harness timed out after {timeout:.0f} s: {cmd}") from e
            out += f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n"
            if r.returncode == 0 and HARNESS_JAR.exists() and any(HARNESS_LIB.glob("hadoop-hdfs-*.jar")):
                os.utime(HARNESS_JAR)  # Maven may leave an up-to-date jar untouched
                if log:
                    log.parent.mkdir(parents=True, exist_ok=True)
                    log.write_text(out)
                return
        raise HarnessError("building the harness failed:\n" + out[-4000:])


# ------------------------------------------------------------------------------------------ the KDC


class Kdc:
    """An MIT krb5kdc for realm LOCAL with its database, config and keytabs inside one folder."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    @property
    def krb5_conf(self) -> Path:
        return self.root / "krb5.conf"

    @property
    def kdc_conf(self) -> Path:
        return self.root / "kdc.conf"

    def keytab(self, user: str) -> Path:
        if user in ("rm", "nm", *YARN_PRINCIPALS):
            name = "yarn"
        elif user in ("hdfs", "HTTP", *SERVICE_PRINCIPALS):
            name = "server"
        else:
            name = user
        return self.root / "keytabs" / f"{name}.keytab"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KRB5_CONFIG"] = str(self.krb5_conf)
        env["KRB5_KDC_PROFILE"] = str(self.kdc_conf)
        env.pop("KRB5CCNAME", None)
        return env

    def write_config(self) -> None:
        r = self.root
        enc = " ".join(ENCTYPES)
        kdc_conf = f"""# Written by harness/securehdfs.py: KDC for realm {REALM} on 127.0.0.1 only.
[kdcdefaults]
    kdc_listen = 127.0.0.1:{self.port}
    kdc_tcp_listen = 127.0.0.1:{self.port}

[realms]
    {REALM} = {{
        database_name = {r}/kdc/principal
        key_stash_file = {r}/kdc/stash
        acl_file = {r}/kdc/kadm5.acl
        kdc_listen = 127.0.0.1:{self.port}
        kdc_tcp_listen = 127.0.0.1:{self.port}
        kadmind_listen = 127.0.0.1:0
        kpasswd_listen = 127.0.0.1:0
        max_life = 24h 0m 0s
        max_renewable_life = 7d 0h 0m 0s
        master_key_type = aes256-cts-hmac-sha1-96
        supported_enctypes = {" ".join(e + ":normal" for e in ENCTYPES)}
    }}

[logging]
    kdc = FILE:{r}/logs/kdc.log
    admin_server = FILE:{r}/logs/kadmin.log
    default = FILE:{r}/logs/krb5.log
"""
        krb5_conf = f"""# Written by harness/securehdfs.py: client config, realm {REALM}, KDC on 127.0.0.1.
[libdefaults]
    default_realm = {REALM}
    dns_lookup_realm = false
    dns_lookup_kdc = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    forwardable = true
    ticket_lifetime = 24h
    default_tkt_enctypes = {enc}
    default_tgs_enctypes = {enc}
    permitted_enctypes = {enc}
    kdc_timeout = 3000
    max_retries = 2

[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{self.port}
    }}

[domain_realm]
    {HOST} = {REALM}
    .{HOST} = {REALM}
    127.0.0.1 = {REALM}
"""
        (r / "kdc").mkdir(parents=True, exist_ok=True)
        (r / "logs").mkdir(parents=True, exist_ok=True)
        _write_private(self.kdc_conf, kdc_conf)
        self.krb5_conf.write_text(krb5_conf)
        os.chmod(self.krb5_conf, 0o644)
        _write_private(r / "kdc" / "kadm5.acl", f"*/admin@{REALM} *\n")

    def _run(self, cmd: Sequence[str], timeout: float = 60) -> str:
        try:
            r = subprocess.run(
                list(cmd),
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"timed out after {timeout} s: {' '.join(cmd)}") from e
        if r.returncode != 0:
            raise HarnessError(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        return r.stdout + r.stderr

    def create_realm(self) -> None:
        """kdb5_util create + the principals and keytabs (keytabs 0600)."""
        kdb5_util = _which("kdb5_util")
        kadmin = _which("kadmin.local")
        self._run([kdb5_util, "create", "-s", "-r", REALM, "-P", secrets.token_urlsafe(24)])
        principals = [f"{p}@{REALM}" for p in (*SERVICE_PRINCIPALS, *YARN_PRINCIPALS, *USERS)]
        for p in principals:
            out = self._run([kadmin, "-r", REALM, "-q", f"addprinc -randkey {p}"])
            if "created" not in out:
                raise HarnessError(f"kadmin.local addprinc {p}: {out}")
        (self.root / "keytabs").mkdir(exist_ok=True)
        os.chmod(self.root / "keytabs", 0o700)
        groups = [(self.keytab("hdfs"), [f"{p}@{REALM}" for p in SERVICE_PRINCIPALS])]
        groups.append((self.keytab("rm"), [f"{p}@{REALM}" for p in (*YARN_PRINCIPALS, f"HTTP/{HOST}")]))
        groups += [(self.keytab(u), [f"{u}@{REALM}"]) for u in USERS]
        for path, names in groups:
            out = self._run([kadmin, "-r", REALM, "-q", f"ktadd -norandkey -k {path} {' '.join(names)}"])
            if not path.exists():
                raise HarnessError(f"kadmin.local ktadd wrote no {path}: {out}")
            os.chmod(path, 0o600)

    def start(self, timeout: float = 30, detach: bool = False) -> None:
        """Starts krb5kdc -n (foreground, a child of this process) and waits for its TCP port."""
        if self.running():
            return
        krb5kdc = _which("krb5kdc")
        logf = open(self.root / "logs" / "krb5kdc.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                [krb5kdc, "-n", "-r", REALM],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=detach,
                preexec_fn=None if detach else _die_with_parent,
            )
        finally:
            logf.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"krb5kdc exited with {self.proc.returncode}:\n"
                    + _tail(self.root / "logs" / "krb5kdc.out")
                    + "\n"
                    + _tail(self.root / "logs" / "kdc.log")
                )
            if _port_open(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise HarnessError(f"krb5kdc did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_alive(self.pid, "krb5kdc")

    def stop(self, timeout: float = 10) -> None:
        _terminate(self.pid, "krb5kdc", timeout, self.proc)
        self.proc = None
        self.pid = None

    def kinit(self, principal: str, keytab: Path, ccache: str, timeout: float = 30) -> None:
        env = self.env()
        env["KRB5CCNAME"] = ccache
        try:
            r = subprocess.run(
                [_which("kinit"), "-kt", str(keytab), principal],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"kinit {principal} timed out after {timeout} s") from e
        if r.returncode != 0:
            raise HarnessError(f"kinit -kt {keytab} {principal} failed: {r.stderr.strip()}")


def _launch_java(
    root: Path, main_class: str, args: Sequence[str], name: str, detach: bool, extra_env: dict[str, str]
) -> subprocess.Popen:
    """``java ... main_class --dir root ARGS`` with the harness's class path, logging the protocol to
    ``logs/NAME.out`` and Hadoop's log to ``logs/NAME.log``. Attached (detach=False): it reads a stdin
    pipe this process holds, whose EOF (our death) stops it, and gets SIGTERM when we die."""
    krb5 = root / "krb5.conf"
    cmd = [
        _java(),
        "-Xmx1g",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Djava.net.preferIPv4Stack=true",
        f"-Djava.security.krb5.conf={krb5}",
        "-Dsun.security.krb5.disableReferrals=true",
        f"-Dsecurehdfs.dir={root}",
    ]
    if os.environ.get("SECUREHDFS_KRB5_DEBUG"):
        cmd.append("-Dsun.security.krb5.debug=true")
    for mod in JAVA_OPENS:
        cmd.append(f"--add-opens={mod}=ALL-UNNAMED")
    cmd.append("--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED")
    # The YARN JVM also has the HDFS client configuration on its class path: the NodeManagers'
    # in-process ContainerLocalizer builds a plain `new Configuration()` to read HDFS.
    conf = f"{root / 'conf'}:" if main_class == YARN_CLASS else ""
    cmd += ["-cp", f"{conf}{HARNESS_JAR}:{HARNESS_LIB}/*", main_class]
    cmd += ["--dir", str(root), "--realm", REALM, *args]
    if detach:
        cmd.append("--no-stdin")
    env = {**os.environ, **extra_env}
    # YARN containers start `$JAVA_HOME/bin/java` (the NodeManagers pass JAVA_HOME on to them).
    env.setdefault("JAVA_HOME", str(Path(os.path.realpath(_java())).parents[1]))
    env["KRB5_CONFIG"] = str(krb5)
    env.pop("KRB5CCNAME", None)
    env.pop("HADOOP_CONF_DIR", None)
    env.pop("JAVA_TOOL_OPTIONS", None)
    logs = root / "logs"
    out = open(logs / f"{name}.out", "wb")  # noqa: SIM115 - owned by the child
    err = open(logs / f"{name}.log", "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL if detach else subprocess.PIPE,
            start_new_session=detach,
            preexec_fn=None if detach else _die_with_parent,
        )
    finally:
        out.close()
        err.close()


#: ``yarn logs -applicationId A -containerId C -log_files F`` of the stand-in: the file from the
#: NodeManagers' log folders, framed as Hadoop's ``yarn logs`` frames an aggregated log.
_YARN_LOGS = """\
  logs) shift; app= c= f=
    while [ $# -gt 0 ]; do
      case "$1" in
        -applicationId) app=$2; shift ;;
        -containerId) c=$2; shift ;;
        -log_files) f=$2; shift ;;
      esac
      shift
    done
    found=$(find "$ROOT/target" -path "*/yarn-logDir-nm-*/$app/$c/$f" -type f 2>/dev/null | head -n 1)
    if [ -z "$found" ]; then
      echo "Can not find the logs for the application: $app container: $c file: $f" >&2; exit 1
    fi
    echo "Container: $c"
    echo "LogAggregationType: LOCAL (the harness's stand-in: the NodeManagers' log folder)"
    echo "LogType:$f"
    echo "LogLength:$(wc -c < "$found")"
    echo "LogContents:"
    cat "$found"
    echo "End of LogType:$f"
    exit 0 ;;
"""


def _write_yarn_command(root: Path) -> Path:
    """``DIR/bin/yarn``: a stand-in for Hadoop's ``yarn`` command, answering what YARN clients here
    run: ``yarn classpath [--glob]`` (skein's driver: ``DIR/conf`` and the harness's jars) and ``yarn
    logs -applicationId A -containerId C -log_files F``. Hadoop's own ``yarn logs`` reads the logs
    the NodeManagers aggregate, which they cannot do here (a secure NodeManager reads container logs
    through SecureIOUtils, which needs the native libhadoop), so the stand-in prints the file from the
    NodeManagers' log folders of this machine. On a real cluster the real ``yarn`` is used."""
    jars = [str(HARNESS_JAR), *sorted(str(p) for p in HARNESS_LIB.glob("*.jar"))]
    classpath = ":".join([str(root / "conf"), *jars])
    script = (
        "#!/bin/sh\n"
        "# Written by harness/securehdfs.py: `yarn classpath` and `yarn logs` for its cluster.\n"
        f"CP='{classpath}'\n"
        f"ROOT='{root}'\n"
        'case "$1" in\n'
        '  classpath) echo "$CP"; exit 0 ;;\n'
        f"{_YARN_LOGS}"
        "esac\n"
        "echo 'this yarn stand-in only answers: yarn classpath, yarn logs' >&2\n"
        "exit 64\n"
    )
    path = root / "bin" / "yarn"
    path.parent.mkdir(exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return path


def _wait_ready(root: Path, proc: subprocess.Popen, name: str, deadline: float, timeout: float) -> dict:
    """The JSON line after ``Ready!`` in ``logs/NAME.out``; HarnessError with the log's tail when the
    process fails, exits or is not ready by deadline."""
    out = root / "logs" / f"{name}.out"
    log = root / "logs" / f"{name}.log"
    while True:
        lines = out.read_text(errors="replace").splitlines() if out.exists() else []
        if "Ready!" in lines:
            i = lines.index("Ready!")
            if len(lines) > i + 1 and lines[i + 1].startswith("{"):
                return json.loads(lines[i + 1])
        for line in lines:
            if line.startswith("error"):
                raise HarnessError(f"{name} failed to start: {line}\n--- {name}.log (tail) ---\n{_tail(log)}")
        if proc.poll() is not None:
            raise HarnessError(
                f"{name} exited with {proc.returncode} before Ready!\n"
                f"--- {name}.out ---\n{_tail(out, 20)}\n--- {name}.log (tail) ---\n" + _tail(log)
            )
        if time.monotonic() > deadline:
            tail = _tail(log)
            raise HarnessError(f"{name} not ready within {timeout:.0f} s\n--- {name}.log (tail) ---\n{tail}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------ the cluster


class SecureHdfs:
    """A running KDC + secure MiniDFSCluster in one state folder (see the module docstring)."""

    realm = REALM

    def __init__(
        self, root: Path, state: dict, kdc: Kdc, harness_proc: subprocess.Popen | None = None
    ) -> None:
        self.root = root
        self.state = state
        self.kdc = kdc
        self._proc = harness_proc
        self._yarn_proc: subprocess.Popen | None = None
        self._token = (root / "control.token").read_text().strip()

    # ---- paths and names
    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def krb5_conf(self) -> Path:
        return self.kdc.krb5_conf

    @property
    def namenode_port(self) -> int:
        return int(self.state["ports"]["namenode_rpc_port"])

    @property
    def http_port(self) -> int:
        return int(self.state["ports"]["namenode_http_port"])

    @property
    def kdc_port(self) -> int:
        return int(self.state["kdc_port"])

    @property
    def namenode_url(self) -> str:
        return f"hdfs://127.0.0.1:{self.namenode_port}"

    @property
    def webhdfs_url(self) -> str:
        # Host `localhost`: the SPNEGO service principal is HTTP/localhost.
        return f"webhdfs://{HOST}:{self.http_port}"

    @property
    def pid(self) -> int:
        return int(self.state["harness_pid"])

    def principal(self, user: str) -> str:
        """Full principal: 'hdfs' -> hdfs/localhost@LOCAL ('HTTP', 'rm', 'nm' alike), else user@LOCAL."""
        if "@" in user:
            return user
        if user in ("hdfs", "HTTP", "rm", "nm"):
            return f"{user}/{HOST}@{REALM}"
        return f"{user}@{REALM}"

    def keytab(self, user: str) -> Path:
        """The keytab holding user's key ('hdfs'/'HTTP': the server keytab)."""
        return self.kdc.keytab(user.split("@", 1)[0])

    def env(self, user: str | None) -> dict[str, str]:
        """Environment for a client acting as user: KRB5_CONFIG, HADOOP_CONF_DIR and a fresh private
        KRB5CCNAME filled by `kinit -kt` (user None: a cache that holds no ticket)."""
        ccdir = self.root / "ccache"
        ccdir.mkdir(mode=0o700, exist_ok=True)
        name = (user or "none").replace("/", "_")
        ccache = f"FILE:{ccdir}/{name}-{secrets.token_hex(6)}"
        if user is not None:
            self.kdc.kinit(self.principal(user), self.keytab(user), ccache)
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5CCNAME": ccache,
            "HADOOP_CONF_DIR": str(self.conf_dir),
            "HADOOP_OPTS": f"-Djava.security.krb5.conf={self.krb5_conf}",
        }

    # ---- the control socket
    def _command(self, line: str, timeout: float = 30) -> str:
        port = int(self.state["ports"]["control_port"])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=min(timeout, 10)) as s:
                s.settimeout(timeout)
                f = s.makefile("rw", encoding="utf-8", newline="\n")
                f.write(f"auth {self._token}\n")
                f.flush()
                if f.readline().strip() != "ok auth":
                    raise HarnessError("the harness refused the control token")
                f.write(line + "\n")
                f.flush()
                answer = f.readline()
        except (OSError, TimeoutError) as e:
            raise HarnessError(f"harness control {line!r} on 127.0.0.1:{port} failed: {e}") from e
        if not answer:
            raise HarnessError(f"harness closed the control connection on {line!r}")
        return answer.rstrip("\n")

    def ping(self, timeout: float = 10) -> bool:
        try:
            return self._command("ping", timeout) == "pong"
        except HarnessError:
            return False

    def map_principal(self, principal: str, timeout: float = 30) -> str:
        """Hadoop's own auth_to_local short name for principal (raises MappingError on Hadoop's error)."""
        if "\n" in principal:
            raise ValueError("principal contains a newline")
        answer = self._command(f"map {principal}", timeout)
        if answer.startswith("error "):
            raise MappingError(answer[len("error ") :])
        return answer

    def restart_namenode(self, timeout: float = 120) -> None:
        """Restarts the NameNode on the same ports and waits until the DataNode is back."""
        answer = self._command("restart-nn", timeout)
        if answer != "ok restart-nn":
            raise HarnessError(f"restart-nn: {answer}\n{_tail(self.root / 'logs' / 'harness.log')}")

    # ---- the KDC
    def kdc_stop(self, timeout: float = 10) -> None:
        self.kdc.stop(timeout)
        self._save()

    def kdc_start(self, timeout: float = 30) -> None:
        self.kdc.start(timeout, detach=bool(self.state.get("detached")))
        self._save()

    def _save(self) -> None:
        self.state["kdc_pid"] = self.kdc.pid
        _write_private(self.root / "state.json", json.dumps(self.state, indent=2) + "\n")

    # ---- life cycle
    @classmethod
    def start(
        cls,
        directory: str | os.PathLike,
        timeout: float = 180,
        detach: bool = False,
        nn_port: int = 0,
        http_port: int = 0,
        build_timeout: float = 1200,
        token_renew_ms: int = 0,
    ) -> SecureHdfs:
        """Creates realm LOCAL in directory, starts krb5kdc and the harness, waits for `Ready!`.

        With detach=False both processes are children of this one (and die with it); with
        detach=True they run in their own sessions and outlive it (stop them with `stop`).
        `timeout` bounds the KDC + cluster start (the first Maven build has build_timeout).
        `token_renew_ms` > 0 sets the NameNode's ``dfs.namenode.delegation.token.renew-interval``
        (Hadoop's default: 1 day): a delegation token not renewed within it expires.
        """
        root = Path(directory).resolve()
        root.mkdir(parents=True, exist_ok=True)
        old = root / "state.json"
        if old.exists():
            with contextlib.suppress(Exception):
                prev = cls.attach(root)
                if prev.running():
                    raise HarnessError(f"already running in {root} (harness pid {prev.pid}); stop it first")
        for name in OWNED:
            p = root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        (root / "logs").mkdir()
        ensure_built(build_timeout, root / "logs" / "build.log")

        t0 = time.monotonic()
        deadline = t0 + timeout
        kdc = None
        for attempt in range(3):
            kdc = Kdc(root, _free_port(udp_too=True))
            kdc.write_config()
            if attempt == 0:
                kdc.create_realm()
            try:
                kdc.start(timeout=max(1.0, min(30.0, deadline - time.monotonic())), detach=detach)
                break
            except HarnessError:
                if attempt == 2 or time.monotonic() > deadline:
                    raise
        assert kdc is not None
        token = secrets.token_hex(16)
        _write_private(root / "control.token", token + "\n")
        state = {
            "dir": str(root),
            "realm": REALM,
            "kdc_port": kdc.port,
            "kdc_pid": kdc.pid,
            "detached": detach,
            "started_at": time.time(),
        }
        _write_private(root / "state.json", json.dumps(state, indent=2) + "\n")

        proc = None
        try:
            proc = cls._launch(root, token, detach, nn_port, http_port, token_renew_ms)
            state["harness_pid"] = proc.pid
            _write_private(root / "state.json", json.dumps(state, indent=2) + "\n")
            info = _wait_ready(root, proc, "harness", deadline, timeout)
        except BaseException:
            if proc is not None:
                _terminate(proc.pid, MAIN_CLASS, 20, proc)
            kdc.stop()
            raise
        state["ports"] = info
        state["startup_seconds"] = round(time.monotonic() - t0, 2)
        _write_private(root / "state.json", json.dumps(state, indent=2) + "\n")
        return cls(root, state, kdc, proc)

    @staticmethod
    def _launch(
        root: Path, token: str, detach: bool, nn_port: int, http_port: int, token_renew_ms: int
    ) -> subprocess.Popen:
        args = ["--nn-port", str(nn_port), "--http-port", str(http_port), "--control-port", "0"]
        args += ["--token-renew-ms", str(token_renew_ms)]
        env = {"SECUREHDFS_CONTROL_TOKEN": token}
        return _launch_java(root, MAIN_CLASS, args, "harness", detach, env)

    # ---- YARN
    def start_yarn(self, timeout: float = 180) -> None:
        """Starts the secure MiniYARNCluster (a ResourceManager, two NodeManagers) in a JVM of its own
        (logged in as rm/localhost) and waits until it has written ``conf/yarn-site.xml``; nothing
        when it runs already."""
        if self.yarn_running:
            return
        detach = bool(self.state.get("detached"))
        proc = _launch_java(self.root, YARN_CLASS, [], "yarn", detach, {})
        self._yarn_proc = proc
        try:
            info = _wait_ready(self.root, proc, "yarn", time.monotonic() + timeout, timeout)
        except BaseException:
            _terminate(proc.pid, YARN_CLASS, 20, proc)
            raise
        self.state["yarn"] = info
        _write_yarn_command(self.root)
        _write_private(self.root / "state.json", json.dumps(self.state, indent=2) + "\n")

    @property
    def bin_dir(self) -> Path:
        """``DIR/bin``, holding the ``yarn`` stand-in of :func:`_write_yarn_command` (put it on PATH)."""
        return self.root / "bin"

    @property
    def yarn_running(self) -> bool:
        """Whether the MiniYARNCluster of :meth:`start_yarn` runs."""
        if self._yarn_proc is not None:
            return self._yarn_proc.poll() is None
        return "yarn" in self.state and _pid_alive(self.state["yarn"].get("pid"), YARN_CLASS)

    @property
    def rm_address(self) -> str:
        """The ResourceManager's client RPC address, ``localhost:<port>``."""
        return f"{HOST}:{int(self.state['yarn']['rm_port'])}"

    @property
    def rm_web_url(self) -> str:
        """The ResourceManager's web endpoint (SPNEGO as HTTP/localhost), ``http://localhost:<port>``."""
        return f"http://{HOST}:{int(self.state['yarn']['rm_web_port'])}"

    @property
    def yarn_local_dirs(self) -> Path:
        """Where the NodeManagers keep their local and log folders (containers' files): a folder per
        NodeManager under this one."""
        return Path(self.state["yarn"]["nm_local_dirs"]).parent

    def stop_yarn(self, timeout: float = 60) -> None:
        """Stops the MiniYARNCluster (SIGTERM: its shutdown hook stops the daemons; SIGKILL after
        timeout)."""
        if "yarn" in self.state:
            _terminate(int(self.state["yarn"]["pid"]), YARN_CLASS, timeout, self._yarn_proc)
            self._yarn_proc = None
            del self.state["yarn"]

    @classmethod
    def attach(cls, directory: str | os.PathLike) -> SecureHdfs:
        """A handle on an instance that `start` (e.g. the detached command) left in directory."""
        root = Path(directory).resolve()
        try:
            state = json.loads((root / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise HarnessError(f"no secure HDFS state in {root}: {e}") from e
        kdc = Kdc(root, int(state["kdc_port"]))
        kdc.pid = state.get("kdc_pid")
        if "ports" not in state or "harness_pid" not in state:
            state.setdefault("ports", {"namenode_rpc_port": 0, "namenode_http_port": 0, "control_port": 0})
            state.setdefault("harness_pid", 0)
        return cls(root, state, kdc)

    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.pid, MAIN_CLASS)

    def status(self) -> dict:
        return {
            "dir": str(self.root),
            "harness_running": self.running(),
            "kdc_running": self.kdc.running(),
            "responding": self.running() and self.ping(),
            "namenode_url": self.namenode_url,
            "webhdfs_url": self.webhdfs_url,
            "conf_dir": str(self.conf_dir),
            "krb5_conf": str(self.krb5_conf),
            "kdc": f"127.0.0.1:{self.kdc_port}",
            "ports": self.state.get("ports"),
            "pids": {"harness": self.state.get("harness_pid"), "kdc": self.kdc.pid},
            "yarn": self.state.get("yarn") if self.yarn_running else None,
        }

    def stop(self, timeout: float = 60) -> None:
        """Clean shutdown (YARN first; the `stop` command), then SIGTERM/SIGKILL after timeout; then the
        KDC."""
        try:
            self.stop_yarn(timeout)
            if self.running():
                with contextlib.suppress(HarnessError):
                    self._command("stop", timeout)
                if not _wait_gone(self.pid, timeout, self._proc):
                    _terminate(self.pid, MAIN_CLASS, 15, self._proc)
            if self._proc is not None:
                if self._proc.stdin:
                    with contextlib.suppress(OSError):
                        self._proc.stdin.close()
                with contextlib.suppress(Exception):
                    self._proc.wait(timeout=5)
        finally:
            self.kdc.stop()
            with contextlib.suppress(OSError):
                self.state["stopped_at"] = time.time()
                _write_private(self.root / "state.json", json.dumps(self.state, indent=2) + "\n")

    def __enter__(self) -> SecureHdfs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(directory: str | os.PathLike, **kw: object) -> Iterator[SecureHdfs]:
    """``with running(dir) as hdfs: ...`` — start, then always stop."""
    h = SecureHdfs.start(directory, **kw)  # type: ignore[arg-type]
    try:
        yield h
    finally:
        h.stop()


# ---------------------------------------------------------------------------------------------- CLI


def _shell_exports(env: dict[str, str]) -> str:
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="securehdfs.py", description="MIT KDC + secure MiniDFSCluster on 127.0.0.1"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("start", "create realm LOCAL and start KDC + cluster (detached)"),
        ("stop", "stop cluster and KDC"),
        ("status", "show state (exit 1 when not up)"),
        ("env", "print shell export lines for a user's client"),
        ("map", "Hadoop's auth_to_local short name of a principal"),
        ("restart-nn", "restart the NameNode, keeping its ports"),
        ("start-yarn", "start the secure MiniYARNCluster beside a running HDFS"),
        ("build", "build the Java harness (Maven) if needed"),
    ):
        p = sub.add_parser(name, help=help_)
        if name != "build":
            p.add_argument("--dir", required=True, help="state folder")
        if name == "start":
            p.add_argument("--timeout", type=float, default=180, help="seconds to wait for Ready! (180)")
            p.add_argument("--nn-port", type=int, default=0, help="NameNode RPC port (0: a free one)")
            p.add_argument("--http-port", type=int, default=0, help="NameNode HTTP/WebHDFS port (0: free)")
            p.add_argument("--yarn", action="store_true", help="also a secure MiniYARNCluster (RM + 2 NMs)")
        if name == "stop":
            p.add_argument("--timeout", type=float, default=60, help="seconds before killing (60)")
        if name == "env":
            p.add_argument("--user", default="tensorflow", help="hdfs, tensorflow, alice, bob, or none")
        if name == "map":
            p.add_argument("principal")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "build":
            ensure_built()
            print(f"built: {HARNESS_JAR}")
            return 0
        if args.cmd == "start":
            t0 = time.monotonic()
            h = SecureHdfs.start(
                args.dir, timeout=args.timeout, detach=True, nn_port=args.nn_port, http_port=args.http_port
            )
            if args.yarn:
                h.start_yarn(timeout=args.timeout)
            print(json.dumps(h.status(), indent=2))
            print(
                f"Secure HDFS up in {time.monotonic() - t0:.1f} s ({h.state['startup_seconds']} s after "
                f"the build check). Client environment: python {sys.argv[0]} env --dir {args.dir} "
                "--user tensorflow",
                file=sys.stderr,
            )
            return 0
        h = SecureHdfs.attach(args.dir)
        if args.cmd == "status":
            st = h.status()
            print(json.dumps(st, indent=2))
            return 0 if st["responding"] and st["kdc_running"] else 1
        if args.cmd == "stop":
            h.stop(timeout=args.timeout)
            print(f"stopped ({args.dir})")
            return 0
        if args.cmd == "env":
            print(_shell_exports(h.env(None if args.user == "none" else args.user)))
            return 0
        if args.cmd == "map":
            print(h.map_principal(args.principal))
            return 0
        if args.cmd == "start-yarn":
            h.start_yarn()
            print(json.dumps(h.status(), indent=2))
            return 0
        if args.cmd == "restart-nn":
            h.restart_namenode()
            print("ok restart-nn")
            return 0
    except HarnessError as e:
        print(f"securehdfs: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
