"""Hostile and careless input to the job service (issue 9): bounded downloads, service.user, private
state, failures explained, job names, no tracebacks, one deploy at a time, TensorBoard, and a model
whose scores are not numbers. docs/reliability.md lists what each test promises.

Deploys that could hang run in a child process with a timeout, so that a regression fails here
instead of hanging the suite.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import lastlayer
from helpers import make_dataset, serve_folder, serve_http
from lastlayer.cli import main
from lastlayer.errors import ModelError, UsageError
from lastlayer.jobs import secret_store
from lastlayer.jobs.plan import COMPLETE, Plan
from lastlayer.jobs.state import alive

SRC = Path(lastlayer.__file__).resolve().parents[1]  # the sources under test, for child processes
GIB = 1 << 30


# --- a hostile HTTP server -----------------------------------------------------------------------


class Hostile(http.server.BaseHTTPRequestHandler):
    """``/trickle/*``: one byte every 0.5 s; ``/gib/*``: 1 GiB (Content-Length declared);
    ``/gib-undeclared/*``: 1 GiB without a length; ``/html/*``: a login page."""

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        kind = self.path.split("/")[1]
        self.send_response(200)
        if kind == "gib":
            self.send_header("Content-Length", str(GIB))
        if kind == "html":
            body = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.end_headers()
        with contextlib.suppress(OSError):
            if kind == "trickle":
                for _ in range(1200):
                    self.wfile.write(b"P")
                    self.wfile.flush()
                    time.sleep(0.5)
            else:
                zeros = b"\0" * (1 << 20)
                for _ in range(GIB // len(zeros)):
                    self.wfile.write(zeros)


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    with serve_http(Hostile) as url:
        yield url


# --- tiny jobs -----------------------------------------------------------------------------------

HELLO = "def main(server, log_dir, context):\n    print('hello from', server.task_name)\n"


def job_zip(tmp: Path, source: str, name: str = "tiny.zip") -> Path:
    """A job archive whose module ``tiny`` is ``source``."""
    path = tmp / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("jobs/tiny.py", source)
    return path


def job_options(tmp: Path, job_url: str, name: str = "tiny", workers: int = 1, **service: object) -> Path:
    """An options file running the module ``tiny`` of ``job_url``."""
    spec = {
        "service": {"name": name, "job_url": job_url, "job_path": "jobs", "job_name": "tiny", **service},
        "worker": {"count": workers, "cpus": 1, "mem": 1024},
    }
    path = tmp / f"{name.replace('/', '.')}.json"
    path.write_text(json.dumps(spec))
    return path


#: Address space of the child processes, KiB: a regression reading without end fails instead of
#: taking the machine's memory.
CHILD_MEMORY_KIB = 6 << 20


def bounded(*argv: str) -> list[str]:
    """``argv`` run with :data:`CHILD_MEMORY_KIB` of address space (by the shell's ``ulimit``: a
    ``preexec_fn`` could deadlock in a child forked from this threaded process)."""
    return ["sh", "-c", f'ulimit -v {CHILD_MEMORY_KIB} && exec "$@"', "sh", *argv]


def lastlayer(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``lastlayer ARGV`` in a child process; a hang fails the test instead of the suite."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run(
            bounded(sys.executable, "-m", "lastlayer", *argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"lastlayer {' '.join(argv)} did not end within {timeout} s")


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error a failed command printed, checked to be one line without a traceback."""
    assert done.returncode in (1, 2), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("lastlayer: error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def files_under(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


# --- findings 1 and 2: every download bounded in bytes and time, and checked ---------------------


def test_a_trickling_job_url_is_cut_off_by_the_deploys_timeout_which_counts_the_download(tmp_path, hostile):
    """Finding 1: --timeout counts from the start, the download included."""
    opts = job_options(tmp_path, f"{hostile}/trickle/master.zip")
    started = time.monotonic()
    done = lastlayer("job", "deploy", str(opts), f"--state_dir={tmp_path / 's'}", "--timeout=3", timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    reason = f"worker-0: cannot download {hostile}/trickle/master.zip: no answer within "
    line = next(line for line in done.stdout.splitlines() if line.startswith(reason))
    assert line.endswith(
        "(check that the server is up and reachable from this machine, or allow a longer --timeout)"
    )


def test_a_trickling_job_url_is_cut_off_by_its_own_setting(tmp_path, hostile):
    opts = job_options(tmp_path, f"{hostile}/trickle/master.zip", job_url_timeout=2)
    started = time.monotonic()
    done = lastlayer("job", "deploy", str(opts), f"--state_dir={tmp_path / 's'}", timeout=60)
    assert time.monotonic() - started < 30 and done.returncode == 1
    assert (
        f"worker-0: cannot download {hostile}/trickle/master.zip: no answer within 2 s (check that the "
        "server is up and reachable from this machine, or allow a longer service.job_url_timeout)"
    ) in done.stdout


# The peak resident memory of this process itself: VmHWM, not ru_maxrss, which keeps the high-water
# mark of the process it was forked from across exec.
MAXRSS = (
    "import sys\n"
    "from lastlayer.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "status = open('/proc/self/status').read().splitlines()\n"
    "print(next(ln for ln in status if ln.startswith('VmHWM:')), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def deploy_measured(opts: Path, state: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Deploy in a child process (the supervisor, so the downloads, run in it); its peak RSS, MiB."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        bounded(sys.executable, "-c", MAXRSS, "job", "deploy", str(opts), f"--state_dir={state}"),
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    peak = next(line for line in done.stderr.splitlines() if line.startswith("VmHWM:"))
    return done, int(peak.split()[1]) / 1024


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gib", "gib-undeclared"])
def test_a_job_url_answering_a_gib_is_refused_in_little_memory(tmp_path, hostile, kind):
    """Finding 2 for the archive: refused at service.job_url_max_bytes (default 512 MiB), the download
    spooled to disk, never held in memory, and nothing left behind."""
    opts = job_options(tmp_path, f"{hostile}/{kind}/master.zip")
    done, peak_mib = deploy_measured(opts, tmp_path / "s")
    assert done.returncode == 1, done.stderr
    assert peak_mib < 400, peak_mib
    assert f"worker-0: {hostile}/{kind}/master.zip: the archive is over " in done.stdout
    assert "raise service.job_url_max_bytes if you trust it" in done.stdout
    left = sum(p.stat().st_size for p in files_under(tmp_path / "s"))
    assert left < 1 << 20


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        (
            "gib",
            "core-site.xml is over 1,073,741,824 bytes, more than the 4,194,304 allowed; raise "
            "service.hdfs.config_max_bytes if you trust it",
        ),
        ("gib-undeclared", "more than the 4,194,304 allowed; raise service.hdfs.config_max_bytes"),
        ("html", "core-site.xml is not a Hadoop configuration"),
    ],
)
def test_a_hadoop_configuration_answering_a_gib_or_a_page_is_refused(tmp_path, hostile, kind, needle):
    """Finding 2 for hdfs.config_uri: bounded (service.hdfs.config_max_bytes) and checked to be XML."""
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), hdfs={"config_uri": f"{hostile}/{kind}/v1"})
    done, peak_mib = deploy_measured(opts, tmp_path / "s")
    assert done.returncode == 1, done.stderr
    assert needle in done.stdout
    assert peak_mib < 400, peak_mib
    assert not (tmp_path / "s" / "tiny" / "private" / "hadoop-config" / "core-site.xml").exists()


def test_a_trickling_hadoop_configuration_is_cut_off_naming_its_setting(tmp_path, hostile):
    hdfs = {"config_uri": f"{hostile}/trickle/v1", "config_timeout": 1.5}
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), hdfs=hdfs)
    done = lastlayer("job", "deploy", str(opts), f"--state_dir={tmp_path / 's'}", timeout=60)
    assert done.returncode == 1
    assert (
        "no answer within 1.5 s" in done.stdout
        and "allow a longer service.hdfs.config_timeout" in done.stdout
    )


def test_an_options_file_that_never_ends_is_refused(tmp_path, hostile):
    done = lastlayer("job", "deploy", "/dev/zero", f"--state_dir={tmp_path / 's'}", timeout=60)
    assert "/dev/zero: the options file is a device, not a regular file" in one_line_error(done)
    (tmp_path / "big.json").write_bytes(b" " * (2 << 20))
    done = lastlayer("job", "deploy", str(tmp_path / "big.json"), f"--state_dir={tmp_path / 's'}", timeout=60)
    assert "too large for an options file" in one_line_error(done)
    started = time.monotonic()
    done = lastlayer("job", "deploy", f"{hostile}/trickle/o.json", "--timeout=2", timeout=60)
    assert time.monotonic() - started < 30
    assert "no answer within 2 s" in one_line_error(done)


# --- finding 3: service.user ---------------------------------------------------------------------

TASK_USER = "lastlayer-task"
EXTRA_GROUP = "lastlayer-extra"


@pytest.fixture(scope="module")
def task_user() -> pwd.struct_passwd:
    """An unprivileged user with a supplementary group, created when absent (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("creating the unprivileged task user needs root")
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(TASK_USER)
    subprocess.run(["groupadd", "--force", EXTRA_GROUP], check=True, capture_output=True)
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--groups",
            EXTRA_GROUP,
            "--home-dir",
            "/nonexistent",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            TASK_USER,
        ],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(TASK_USER)


# Only modules the task process has imported already: the interpreter's files may be out of the
# task user's reach (e.g. under /root), as the job's own imports are the job's business.
WHO_AM_I = """\
import json, os

def executors(context):
    if os.getuid() == 0:
        raise RuntimeError("executors(context) ran as root")
    return None

def main(server, log_dir, context):
    facts = {
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
        "groups": sorted(os.getgroups()),
        "home": os.environ["HOME"],
        "user": os.environ["USER"],
        "module": open(__file__).read().startswith("import json"),
        "cores": sorted(os.sched_getaffinity(0)),
    }
    with open("in-the-sandbox.txt", "w") as f:
        f.write("written")
    for name in ("private", "options.json", "plan.json"):
        try:
            os.listdir(os.path.join(context["job"], name)) if name == "private" else open(
                os.path.join(context["job"], name)).read()
            facts[name] = "read"
        except PermissionError:
            facts[name] = "refused"
    with open(os.path.join(log_dir, "who.json"), "w") as f:
        json.dump(facts, f)
"""


def reachable_tmp() -> Path:
    """A fresh folder under /tmp that every user may enter (pytest's own is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="lastlayer-reliability-"))
    folder.chmod(0o755)
    return folder


def test_tasks_run_as_service_user_and_still_read_what_they_must(tmp_path, task_user, capsys):
    """Finding 3: the task (and executors(context)) run as that user's uid, gid, groups and HOME; it
    reads its module, writes its sandbox and log_dir, and cannot read the service's files."""
    base = reachable_tmp()
    try:
        state = base / "state"
        context = json.dumps({"job": str(state / "tiny")})
        opts = job_options(tmp_path, str(job_zip(tmp_path, WHO_AM_I)), user=TASK_USER, job_context=context)
        assert main(["job", "deploy", str(opts), f"--state_dir={state}", "--timeout=120"]) == 0
        from lastlayer.jobs.user import python_unreachable, run_as

        warned = "on the way to Python's standard library" in capsys.readouterr().err
        assert warned == (python_unreachable(run_as(TASK_USER)) is not None)  # type: ignore[arg-type]
        facts = json.loads((state / "tiny" / "persist" / "who.json").read_text())
        gid = task_user.pw_gid
        assert facts["ids"] == [task_user.pw_uid, task_user.pw_uid, gid, gid]
        assert set(facts["groups"]) == set(os.getgrouplist(TASK_USER, gid)) and len(facts["groups"]) >= 2
        assert (facts["home"], facts["user"], facts["module"]) == (task_user.pw_dir, TASK_USER, True)
        assert (facts["private"], facts["options.json"], facts["plan.json"]) == ("refused",) * 3
        assert facts["cores"] == sorted(os.sched_getaffinity(0))[:1]  # worker.cpus 1
        sandbox = state / "tiny" / "tasks" / "worker-0" / "sandbox"
        assert (sandbox / "in-the-sandbox.txt").stat().st_uid == task_user.pw_uid
        assert (state / "tiny" / "plan.json").stat().st_uid == 0
    finally:
        shutil.rmtree(base)


def test_an_unknown_user_is_refused_before_anything_starts(tmp_path, capsys):
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), user="no-such-user-here")
    assert main(["job", "deploy", str(opts), f"--state_dir={tmp_path / 's'}"]) == 2
    assert capsys.readouterr().err == (
        "lastlayer: error: service.user: there is no user 'no-such-user-here' on this machine; create it "
        "(useradd no-such-user-here) or name an existing user (leave service.user out to run the tasks "
        "as yourself)\n"
    )
    assert not (tmp_path / "s" / "tiny").exists()


def test_a_service_not_running_as_root_cannot_run_tasks_as_another_user(monkeypatch):
    from lastlayer.jobs import user

    monkeypatch.setattr(user.os, "geteuid", lambda: 4242)
    with pytest.raises(UsageError) as info:
        user.run_as("root")
    assert str(info.value) == (
        "service.user is 'root' but the service runs as 'uid 4242', not as root: only root can run the "
        "tasks as another user; set service.user to 'uid 4242' (or leave it out), or deploy as root"
    )


def test_a_state_folder_the_task_user_cannot_reach_is_refused(tmp_path, task_user, capsys):
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), user=TASK_USER)
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    assert main(["job", "deploy", str(opts), f"--state_dir={hidden / 's'}"]) == 2
    err = capsys.readouterr().err
    assert f"service.user '{TASK_USER}' cannot enter " in err and "deploy with a --state_dir that user" in err


def test_the_task_users_copies_of_the_login_follow_a_renewed_ticket(tmp_path, task_user):
    """What tasks of another user read of private/ (credential cache, configuration folders) are
    copies of theirs, copied again when the service renews the ticket."""
    from lastlayer.jobs.user import Mirror, run_as

    private = tmp_path / "private"
    (private / "hadoop-conf").mkdir(parents=True, mode=0o700)
    (private / "ccache").write_bytes(b"ticket-1")
    (private / "hadoop-conf" / "core-site.xml").write_text("<configuration/>")
    account = run_as(TASK_USER)
    assert account is not None
    mirror = Mirror(private, tmp_path / "task-private", account)
    env = mirror.env(
        {
            "KRB5CCNAME": f"FILE:{private / 'ccache'}",
            "HADOOP_CONF_DIR": str(private / "hadoop-conf"),
            "X": "1",
        }
    )
    copy = tmp_path / "task-private" / "ccache"
    assert env == {
        "KRB5CCNAME": f"FILE:{copy}",
        "HADOOP_CONF_DIR": str(tmp_path / "task-private" / "hadoop-conf"),
        "X": "1",
    }
    assert copy.read_bytes() == b"ticket-1" and copy.stat().st_uid == task_user.pw_uid
    assert (copy.stat().st_mode & 0o777, copy.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    renewed = private / ".ccache.new"
    renewed.write_bytes(b"ticket-2, longer")
    renewed.replace(private / "ccache")  # as the login renews: a new file renamed into place
    mirror.refresh()
    assert copy.read_bytes() == b"ticket-2, longer" and copy.stat().st_uid == task_user.pw_uid


# --- finding 4: private state, no secret in it ---------------------------------------------------


def assert_private(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"


def test_the_state_folder_and_every_file_in_it_are_private(tmp_path):
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), workers=2)
    assert main(["job", "deploy", str(opts), f"--state_dir={tmp_path / 's'}", "--timeout=120"]) == 0
    assert_private(tmp_path / "s" / "tiny")
    assert {p.name for p in (tmp_path / "s" / "tiny").iterdir()} >= {
        "options.json",
        "plan.json",
        "job",
        "tasks",
    }


def test_no_secret_byte_reaches_the_state_folder_or_a_message(tmp_path, capsys):
    """Finding 4: a job_url pointing at a secret, a keytab whose login fails, a password in a URL."""
    store = tmp_path / "store"
    secret_store.write_secret("plain", b"hunter2-the-plain-secret", store)
    keytab = b"\x05\x02KEYTAB-SECRET-BYTES" * 4
    secret_store.write_secret("__dcos_base64__kt", keytab, store, base64_encode=True)
    secrets = [b"hunter2", b"KEYTAB-SECRET-BYTES", base64.b64encode(keytab)[:24], b"s3cret-pass"]
    state = tmp_path / "s"
    # 1. job_url is a file of the secret store: refused without quoting it.
    opts = job_options(tmp_path, str(secret_store.secret_path("plain", store)), name="one")
    assert main(["job", "deploy", str(opts), f"--state_dir={state}", f"--secrets_dir={store}"]) == 1
    assert "not a zip or tar archive: found text;" in Plan.load(state / "one" / "plan.json").steps[0].message
    # 2. Kerberos from the keytab secret, the login failing: the job's copy does not stay.
    kerberos = {
        "enabled": True,
        "kdc": {"hostname": "127.0.0.1", "port": 9},
        "primary": "tf",
        "realm": "LOCAL",
        "keytab_secret": "__dcos_base64__kt",
    }
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), name="two", security={"kerberos": kerberos})
    assert main(["job", "deploy", str(opts), f"--state_dir={state}", f"--secrets_dir={store}"]) == 1
    assert "cannot log in as tf@LOCAL" in Plan.load(state / "two" / "plan.json").steps[0].message
    # 3. A password in job_url: used, masked in options.json, kept in no file.
    served = tmp_path / "www"
    served.mkdir()
    job_zip(served, HELLO, "job.zip")
    with serve_folder(served) as base:
        url = base.replace("http://", "http://alice:s3cret-pass@") + "/job.zip"
        opts = job_options(tmp_path, url, name="three")
        assert main(["job", "deploy", str(opts), f"--state_dir={state}", f"--secrets_dir={store}"]) == 0
    options = json.loads((state / "three" / "options.json").read_text())
    assert options["service"]["job_url"] == base.replace("http://", "http://***@") + "/job.zip"
    for path in files_under(state):
        data = path.read_bytes()
        assert not [s for s in secrets if s in data], path
    captured = capsys.readouterr()
    assert not [s for s in secrets if s.decode() in captured.out + captured.err]
    # The masked URL is not fetched again on restart: what the deploy fetched is used.
    assert main(["job", "plan", "restart", "--name=three", f"--state_dir={state}", "worker-0"]) == 0


# --- finding 5: a failed deploy says why ---------------------------------------------------------


def test_a_failed_deploy_prints_each_failed_steps_reason_and_job_log_says_why(tmp_path, capsys):
    opts = job_options(tmp_path, str(tmp_path / "missing.zip"), workers=2)
    state = tmp_path / "s"
    assert main(["job", "deploy", str(opts), f"--state_dir={state}"]) == 1
    out = capsys.readouterr().out.splitlines()
    reason = f"cannot read {tmp_path / 'missing.zip'}: "
    assert out[0] == "deploy (parallel strategy) (ERROR)"
    assert [line.split(": ", 1)[0] for line in out if reason in line] == ["worker-0 and 1 more steps"]
    # the two steps failed alike: one line
    assert main(["job", "plan", "show", "--name=tiny", f"--state_dir={state}"]) == 0
    assert sum(reason in line for line in capsys.readouterr().out.splitlines()) == 1
    assert main(["job", "log", "worker-1", "--name=tiny", f"--state_dir={state}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lastlayer: error: task worker-1 failed before it started, so it has no log: ")
    assert reason in err
    # A task that did start and fail: its own log, and its last line as the reason.
    failing = (
        "import sys\ndef main(server, log_dir, context):\n"
        "    print('about to fail', file=sys.stderr)\n    sys.exit(7)\n"
    )
    opts = job_options(tmp_path, str(job_zip(tmp_path, failing)))
    assert main(["job", "deploy", str(opts), f"--state_dir={state}"]) == 1
    assert "worker-0: about to fail" in capsys.readouterr().out.splitlines()
    assert (
        main(["job", "log", "worker-0", "stderr", "--completed", "--name=tiny", f"--state_dir={state}"]) == 0
    )
    assert "about to fail" in capsys.readouterr().out


def test_job_log_returns_the_end_of_a_long_log(tmp_path, capsys, monkeypatch):
    from lastlayer.jobs import api

    monkeypatch.setattr(api, "MAX_LOG_BYTES", 12)
    printer = "def main(server, log_dir, context):\n    print('0123456789' * 3)\n"
    opts = job_options(tmp_path, str(job_zip(tmp_path, printer)))
    state = tmp_path / "s"
    assert main(["job", "deploy", str(opts), f"--state_dir={state}"]) == 0
    capsys.readouterr()
    assert main(["job", "log", "worker-0", "--completed", "--name=tiny", f"--state_dir={state}"]) == 0
    stdout = state / "tiny" / "tasks" / "worker-0" / "stdout"
    assert capsys.readouterr().out == f"[the first 19 bytes of {stdout} are left out]\n90123456789\n"


# --- finding 6: job names, and nothing outside the state folder removed --------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["uninstall"],
        ["stop"],
        ["tasks"],
        ["plan", "show"],
        ["plan", "restart"],
        ["log", "worker-0"],
    ],
)
@pytest.mark.parametrize("name", ["../decoy", "..", "a/../../decoy", "Decoy", "decoy/"])
def test_every_action_checks_the_job_name(tmp_path, argv, name, capsys):
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "plan.json").write_text(Plan([]).to_json())
    state = tmp_path / "state"
    state.mkdir()
    assert main(["job", *argv, f"--name={name}", f"--state_dir={state}"]) == 2
    assert capsys.readouterr().err.startswith(f"lastlayer: error: --name: {name!r} is not a service name")
    assert (decoy / "plan.json").exists()


def test_folder_levels_and_links_never_lead_outside_the_state_folder(tmp_path, capsys):
    outside = tmp_path / "outside"
    (outside / "poets").mkdir(parents=True)
    (outside / "poets" / "plan.json").write_text(Plan([]).to_json())
    state = tmp_path / "state"
    state.mkdir()
    (state / "dev").symlink_to(outside)  # a link where a folder level could be
    assert main(["job", "uninstall", "--name=dev/poets", f"--state_dir={state}"]) == 2
    assert "no job 'dev/poets'" in capsys.readouterr().err
    (state / "evil").symlink_to(outside / "poets")  # a link as a job's folder
    assert main(["job", "uninstall", "--name=evil", f"--state_dir={state}"]) == 2
    assert "is not a folder of lastlayer's (a link or a file)" in capsys.readouterr().err
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), name="evil")
    assert main(["job", "deploy", str(opts), f"--state_dir={state}"]) == 2
    assert (outside / "poets" / "plan.json").exists()
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), name="dev/poets")
    assert main(["job", "deploy", str(opts), f"--state_dir={state}"]) == 0
    assert (state / "dev.poets" / "plan.json").exists() and (outside / "poets" / "plan.json").exists()
    assert main(["job", "plan", "show", "--name=/dev/poets", f"--state_dir={state}"]) == 0
    assert main(["job", "uninstall", "--name=dev/poets", f"--state_dir={state}"]) == 0
    assert not (state / "dev.poets").exists() and (outside / "poets" / "plan.json").exists()


# --- finding 8: one line, never a traceback ------------------------------------------------------


def test_careless_commands_end_in_one_line(tmp_path):
    state = tmp_path / "state"
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)))
    corrupt = state / "broken"
    corrupt.mkdir(parents=True)
    (corrupt / "plan.json").write_text('{"phases": [')
    cases = {
        ("job", "secret", "name", str(tmp_path / "missing-file")): "cannot read ",
        ("job", "secret", "name", str(tmp_path / "a-folder")): "is not a regular file",
        ("job", "secret", "name", "/dev/zero"): "is not a regular file",
        ("job", "deploy", str(opts), f"--state_dir={tmp_path / 'a-file'}"): "--state_dir",
        ("job", "deploy", str(opts), f"--state_dir={tmp_path / 'a-file' / 'below'}"): "Not a directory",
        ("job", "deploy", str(tmp_path / "a-folder")): "a-folder",
        ("job", "deploy", str(tmp_path / "missing.json")): "missing.json",
        ("job", "plan", "show", "--name=broken", f"--state_dir={state}"): "is unreadable",
        ("job", "tasks", "--name=broken", f"--state_dir={state}"): "is unreadable",
        ("job", "package", str(tmp_path / "missing"), str(tmp_path / "p.zip")): "missing",
        ("job", "package", str(tmp_path / "a-folder"), str(tmp_path / "a-file" / "p.zip")): "p.zip",
        ("job", "tasks", f"--state_dir={tmp_path / 'a-file'}"): "--state_dir",
    }
    for argv, needle in cases.items():
        line = one_line_error(
            lastlayer(*argv, "--secrets_dir=" + str(tmp_path / "store"))
            if argv[1] == "secret"
            else lastlayer(*argv)
        )
        assert needle in line, (argv, line)


# --- two deploys of one job at once --------------------------------------------------------------

WAIT = """\
import os, time
def main(server, log_dir, context):
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(log_dir, "go")) and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def test_two_deploys_of_one_job_at_once_one_is_refused(tmp_path):
    opts = job_options(tmp_path, str(job_zip(tmp_path, WAIT)), shared_filesystem=str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = [
        sys.executable,
        "-m",
        "lastlayer",
        "job",
        "deploy",
        str(opts),
        f"--state_dir={tmp_path / 's'}",
        "--timeout=90",
    ]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)  # the refused one ends at once; the other waits for "go"
        (tmp_path / "shared" / "go").write_text("")
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    refused = next(err for p, (_, err) in zip(procs, results, strict=True) if p.returncode == 2)
    assert "lastlayer: error: job 'tiny' is being deployed or is running (process " in refused
    assert "wait for it, stop it with `lastlayer job stop --name tiny`" in refused
    assert Plan.load(tmp_path / "s" / "tiny" / "plan.json").status == COMPLETE


def test_the_lock_of_a_killed_deploy_does_not_stay(tmp_path, capsys):
    opts = job_options(tmp_path, str(job_zip(tmp_path, WAIT)), shared_filesystem=str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    state = tmp_path / "s"
    assert main(["job", "deploy", str(opts), f"--state_dir={state}", "--detach"]) == 0
    assert main(["job", "deploy", str(opts), f"--state_dir={state}"]) == 2
    assert "is being deployed or is running" in capsys.readouterr().err
    supervisor = int((state / "tiny" / "supervisor.pid").read_text())
    os.kill(supervisor, signal.SIGKILL)  # no clean-up at all: the kernel ends the lock
    deadline = time.monotonic() + 10
    while alive(supervisor) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "shared" / "go").write_text("")
    assert main(["job", "deploy", str(opts), f"--state_dir={state}", "--timeout=60"]) == 0


# --- issue 12 item 4: TensorBoard while the job runs ---------------------------------------------


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read()


@pytest.mark.slow
@pytest.mark.parametrize("as_task_user", [False, True], ids=["as-the-service", "as-service-user"])
def test_use_tensorboard_serves_the_jobs_summaries_while_it_runs(as_task_user, request, capsys):
    from lastlayer.jobs import tensorboard
    from lastlayer.training.tensorboard import SummaryWriter

    if not tensorboard.installed():
        pytest.fail("TensorBoard is in the test extra: install it (pip install tensorboard)")
    account = request.getfixturevalue("task_user") if as_task_user else None
    if account is not None:
        from lastlayer.jobs.user import python_unreachable, run_as

        blocked = python_unreachable(run_as(TASK_USER))  # type: ignore[arg-type]
        if blocked is not None:  # TensorBoard imports more of it once it runs as that user
            pytest.skip(f"Python's standard library is out of {TASK_USER}'s reach here ({blocked})")
    base = reachable_tmp()
    try:
        shared = base / "shared"
        with SummaryWriter(str(shared / "train")) as writer:  # what the job's training wrote
            for step in range(3):
                writer.scalar("accuracy", 0.5 + step / 10, step)
        shared.chmod(0o777)
        service = {"user": TASK_USER} if account else {}
        opts = job_options(
            base, str(job_zip(base, WAIT)), use_tensorboard=True, shared_filesystem=str(shared), **service
        )
        state = base / "s"
        assert main(["job", "deploy", str(opts), f"--state_dir={state}", "--detach", "--timeout=240"]) == 0
        url, pid = tensorboard_of_a_running_job(state, capsys)
        owner = next(
            ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:")
        )
        assert owner.split()[1:] == [str(account.pw_uid if account else os.getuid())] * 4
    finally:
        main(["job", "stop", "--name=tiny", f"--state_dir={state}"])
        shutil.rmtree(base)
    assert not alive(pid)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1].rstrip("/")))) != 0  # closed
    assert "tensorboard:" not in capsys.readouterr().out


def tensorboard_of_a_running_job(state: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, int]:
    """The URL ``plan show`` prints once TensorBoard listens, checked to serve the job's run, and its
    process id as ``job tasks`` prints it."""
    deadline = time.monotonic() + 120
    url = ""
    while not url and time.monotonic() < deadline:
        main(["job", "plan", "show", "--name=tiny", f"--state_dir={state}"])
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tensorboard: ")]
        url = lines[0].removeprefix("tensorboard: ") if lines else ""
        time.sleep(0.5)
    assert url.startswith("http://127.0.0.1:"), (state / "tiny" / "tensorboard" / "stderr").read_text()
    assert b"TensorBoard" in http_get(url)
    runs: list[str] = []
    while "train" not in runs and time.monotonic() < deadline:
        runs = json.loads(http_get(url + "data/runs"))
        time.sleep(0.5)
    assert runs == ["train"]
    assert main(["job", "tasks", "--name=tiny", f"--state_dir={state}"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("tensorboard  RUNNING   pid=") and row.endswith(url)
    return url, int(row.split("pid=")[1].split()[0])


def test_use_tensorboard_without_tensorboard_says_so(tmp_path, capsys, monkeypatch):
    from lastlayer.jobs import tensorboard

    monkeypatch.setattr(tensorboard, "installed", lambda: False)
    opts = job_options(tmp_path, str(job_zip(tmp_path, HELLO)), use_tensorboard=True)
    assert main(["job", "deploy", str(opts), f"--state_dir={tmp_path / 's'}", "--timeout=60"]) == 0
    assert (
        "service.use_tensorboard is true but TensorBoard is not installed here: no TensorBoard runs "
        "(install it with `pip install tensorboard`, or set use_tensorboard to false)"
    ) in capsys.readouterr().err


# --- finding 10, the labelling side: a model scoring NaN is refused ------------------------------


def test_label_refuses_a_model_whose_scores_are_not_numbers(tmp_path, model_dir, capsys):
    from lastlayer.model.export import build_classifier
    from lastlayer.model.inference import label
    from lastlayer.training.train import Classifier
    from lastlayer.zoo import DEFAULT_ARCHITECTURE, Backbones, load_feature_model

    features = load_feature_model(DEFAULT_ARCHITECTURE, str(model_dir))
    diverged = Classifier(np.full((features.feature_size, 3), np.nan, np.float32), np.zeros(3, np.float32))
    graph = tmp_path / "nan.onnx"
    graph.write_bytes(build_classifier(Backbones((features,)), diverged, ("a", "b", "c"), "final_result", {}))
    photos = make_dataset(tmp_path / "photos", per_class=1)
    image = str(next(photos.rglob("*.jpg")))
    with pytest.raises(ModelError, match="gives scores that are not numbers"):
        label(str(graph), [image])
    assert main(["label", f"--graph={graph}", image]) == 1
    assert "its training diverged; retrain it with a smaller --learning_rate" in capsys.readouterr().err
