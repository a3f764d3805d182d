"""Acceptance: the walkthrough's poets.json deployed with ``--scheduler=yarn`` on the secure
MiniYARNCluster, each task in a YARN container of its own (skein), as the README's YARN section says.

The options file is the walkthrough's (examples/poets/poets.json), changed where a cluster differs
(job_url, the KDC and HDFS endpoints) and with ``worker.count`` 2. The same file is then deployed with
the local scheduler: it finds every bottleneck in the cache the YARN tasks filled and prints the same
test accuracy. One YARN deploy per module (fixture ``yarn_job``); the tests read what it left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import ENV_KEYS, as_superuser, make_dataset, upload_for_tensorflow
from lastlayer.cli import main
from lastlayer.jobs import secret_store
from lastlayer.jobs.plan import RUNNING, STARTING, Plan, Step, new_plan

pytestmark = [pytest.mark.yarn, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENV_URL = "hdfs:///apps/lastlayer/lastlayer-job-env.tar.gz"
ARCHIVES_TIMEOUT_S = 600.0
DEPLOY_TIMEOUT_S = 600.0
PHOTOS = "/tensorflow_input_data/flower_photos"
IMAGES = 30


@pytest.fixture(scope="module")
def job_env(secure_yarn, tmp_path_factory) -> str:
    """The tasks' packed Python (scripts/yarn_archives.py --job) on HDFS, world-readable; tensorflow's
    home (skein's staging folder)."""
    out = tmp_path_factory.mktemp("job_env")
    built = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "yarn_archives.py"), str(out), "--job"],
        capture_output=True, text=True, timeout=ARCHIVES_TIMEOUT_S,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    as_superuser(
        secure_yarn,
        "for d in ('/apps/lastlayer', '/user/tensorflow', '/tensorflow'):\n"
        "    fs.makedirs(d, exist_ok=True)\n"
        "for d in ('/user/tensorflow', '/tensorflow'):\n"
        "    fs.client.set_owner(d, 'tensorflow', 'tensorflow')\n"
        f"fs.put('{out}/lastlayer-job-env.tar.gz', '{ENV_URL.removeprefix('hdfs://')}')\n"
        f"fs.client.set_permission('{ENV_URL.removeprefix('hdfs://')}', 0o644)\n",
    )
    return ENV_URL


def options_file(path: Path, zip_path: Path, endpoint: str, kdc_port: int) -> Path:
    """poets.json with the cluster's job_url, HDFS endpoint and KDC, and two workers."""
    spec = json.loads((ROOT / "examples" / "poets" / "poets.json").read_text())
    service = spec["service"]
    service["job_url"] = str(zip_path)
    service["hdfs"]["config_uri"] = endpoint
    service["security"]["kerberos"]["kdc"] = {"hostname": "127.0.0.1", "port": kdc_port}
    spec["worker"]["count"] = 2
    path.write_text(json.dumps(spec, indent=4))
    return path


def job(cluster, *argv: str, timeout: float = DEPLOY_TIMEOUT_S + 60) -> subprocess.CompletedProcess[str]:
    """``lastlayer job ARGV`` in a fresh process with Hadoop's ``yarn`` (the harness's) on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["PATH"] = f"{cluster.bin_dir}:{env['PATH']}"
    argv = (sys.executable, "-m", "lastlayer", "job", *argv)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def deploy(cluster, options: Path, state: Path, store: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [f"--state_dir={state}", f"--secrets_dir={store}", f"--timeout={DEPLOY_TIMEOUT_S}"]
    return job(cluster, "deploy", str(options), *flags, *extra)


@pytest.fixture(scope="module")
def yarn_job(secure_yarn, job_env, endpoint, tmp_path_factory) -> SimpleNamespace:
    """The YARN deploy, then the local one of the same options file."""
    tmp = tmp_path_factory.mktemp("yarn_job")
    photos = make_dataset(tmp / "flower_photos", per_class=IMAGES // 3)
    as_superuser(
        secure_yarn,
        "for d in ('/tensorflow/test_run', '/tensorflow_input_data/flower_photos'):\n"
        "    fs.rm(d, recursive=True) if fs.exists(d) else None\n",
    )
    upload_for_tensorflow(secure_yarn, photos, PHOTOS)
    zip_path = tmp / "poets.zip"
    root = "--root=dcos-tensorflow-demos-master/poets"
    assert main(["job", "package", str(ROOT / "examples" / "poets"), str(zip_path), root]) == 0
    store = tmp / "secrets"
    keytab = secure_yarn.keytab("tensorflow").read_bytes()
    secret_store.write_secret("__dcos_base64__tensorflow_keytab", keytab, str(store), base64_encode=True)
    options = options_file(tmp / "poets.json", zip_path, endpoint, secure_yarn.kdc_port)
    yarn = deploy(secure_yarn, options, tmp / "yarn", store, "--scheduler=yarn", f"--yarn_env={job_env}")
    local = deploy(secure_yarn, options, tmp / "local", store)
    done = SimpleNamespace(yarn=yarn, local=local, state=tmp / "yarn", local_state=tmp / "local")
    done.keytab, done.store = keytab, store
    done.logs = {name: task_log(secure_yarn, done, name) for name in ("worker-0", "worker-1")}
    return done


def rm_app(cluster, app: str) -> dict:
    """The ResourceManager's report on ``app`` (its REST API, SPNEGO as tensorflow)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS} | cluster.env("tensorflow")
    code = (
        "import json, sys, requests\n"
        "from requests_kerberos import OPTIONAL, HTTPKerberosAuth\n"
        "auth = HTTPKerberosAuth(mutual_authentication=OPTIONAL)\n"
        "print(json.dumps(requests.get(sys.argv[1], auth=auth, timeout=30).json()['app']))\n"
    )
    url = f"{cluster.rm_web_url}/ws/v1/cluster/apps/{app}"
    done = subprocess.run(
        [sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def app_id(state: Path, name: str = "tensorflow") -> str:
    return json.loads((state / name / "yarn.json").read_text())["app_id"]


def task_log(cluster, yarn_job, task: str) -> str:
    """``lastlayer job log TASK --completed`` of the YARN deploy: its container's log from YARN."""
    flags = [f"--state_dir={yarn_job.state}", f"--secrets_dir={yarn_job.store}", "--completed"]
    done = job(cluster, "log", task, "stderr", *flags, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def accuracy(text: str) -> str:
    found = re.findall(r"Final test accuracy = .*", text)
    assert found, text[-3000:]
    return found[-1]


def test_the_walkthrough_runs_on_yarn_and_trains_the_local_scheduler_s_model(secure_yarn, yarn_job, capsys):
    yarn = yarn_job.yarn
    assert yarn.returncode == 0, (yarn.stdout + yarn.stderr)[-5000:]
    assert yarn.stdout.startswith("deploy (parallel strategy) (COMPLETE)\n")
    assert "├─ worker-0:[node] (COMPLETE)" in yarn.stdout and "└─ worker-1:[node] (COMPLETE)" in yarn.stdout
    # YARN's own word, over its SPNEGO web endpoint
    app = app_id(yarn_job.state)
    report = rm_app(secure_yarn, app)
    assert (report["state"], report["finalStatus"], report["user"]) == ("FINISHED", "SUCCEEDED", "tensorflow")
    tasks = yarn_job.logs
    # each worker computed its share of the bottlenecks; worker 0 trained
    assert "Final test accuracy = " in tasks["worker-0"] and "Final test accuracy" not in tasks["worker-1"]
    # the local scheduler, same options: every bottleneck from the YARN tasks' cache, same accuracy
    local = yarn_job.local
    assert local.returncode == 0, (local.stdout + local.stderr)[-5000:]
    state = f"--state_dir={yarn_job.local_state}"
    assert main(["job", "log", "worker-0", "stderr", "--completed", state]) == 0
    local_log = capsys.readouterr().out
    assert f"Bottlenecks: 0 computed, {IMAGES} from the cache" in local_log
    assert accuracy(local_log) == accuracy(tasks["worker-0"])


def cluster_line(text: str) -> tuple[str, dict[str, list[str]]]:
    """The address a task published and the ``server.cluster`` it was given, from its log."""
    line = re.search(r"lastlayer: task \S+ at (\S+); cluster (.*)", text)
    assert line, text[-3000:]
    return line.group(1), json.loads(line.group(2))


def test_server_cluster_holds_every_container_s_address(secure_yarn, yarn_job):
    (w0, c0), (w1, c1) = (cluster_line(yarn_job.logs[name]) for name in ("worker-0", "worker-1"))
    assert c0 == c1 and c0["worker"] == [w0, w1] and w0 != w1, (c0, c1)


def test_no_container_holds_the_keytab(secure_yarn, yarn_job):
    """The tasks worked with YARN's delegation tokens: no container was given the keytab, as a file or
    by name in its launch script."""
    app = app_id(yarn_job.state)
    folders = [p for p in secure_yarn.yarn_local_dirs.rglob(f"{app}") if p.is_dir()]
    scripts = [s for f in folders for s in f.rglob("launch_container.sh")]
    assert len(scripts) >= 3, folders  # the application master and the two workers
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert not path.name.endswith(".keytab"), path
                if path.stat().st_size == len(yarn_job.keytab):
                    assert path.read_bytes() != yarn_job.keytab, path
    for script in scripts:
        text = script.read_text(errors="replace")
        assert "keytab" not in text.lower(), script
        assert "HADOOP_TOKEN_FILE_LOCATION" in text, script


def test_plan_show_and_tasks_ask_yarn(secure_yarn, yarn_job):
    flags = [f"--state_dir={yarn_job.state}", f"--secrets_dir={yarn_job.store}"]
    new_plan({"worker": 2}).save(yarn_job.state / "tensorflow" / "plan.json")  # PENDING: YARN says more
    shown = job(secure_yarn, "plan", "show", *flags, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    lines = shown.stdout.splitlines()
    assert lines[0] == "deploy (parallel strategy) (COMPLETE)" and f"yarn: {app_id(yarn_job.state)}" in lines
    listed = job(secure_yarn, "tasks", *flags, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
        ["worker-0", "COMPLETE"],
        ["worker-1", "COMPLETE"],
    ]


def test_plan_restart_runs_a_step_again_in_a_new_application(secure_yarn, yarn_job):
    """`plan restart deploy worker-1`: a new application of worker-1 alone, whose server.cluster still
    names worker-0 at the address it published in the first application."""
    flags = [f"--state_dir={yarn_job.state}", f"--secrets_dir={yarn_job.store}"]
    first = app_id(yarn_job.state)
    done = job(secure_yarn, "plan", "restart", "deploy", "worker-1", *flags, f"--timeout={DEPLOY_TIMEOUT_S}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.startswith("deploy (parallel strategy) (COMPLETE)\n")
    second = app_id(yarn_job.state)
    assert second != first and rm_app(secure_yarn, second)["finalStatus"] == "SUCCEEDED"
    w0, _ = cluster_line(yarn_job.logs["worker-0"])
    w1, cluster = cluster_line(task_log(secure_yarn, yarn_job, "worker-1"))
    assert cluster == {"worker": [w0, w1]}


def placed(step: Step) -> bool:
    """Whether YARN has given the step's task a container (it may still be localizing)."""
    return step.status == RUNNING or (step.status == STARTING and "container_" in (step.message or ""))


SLEEPS = "import time\n\ndef main(server, log_dir, context):\n    time.sleep(600)\n"


def test_stop_kills_the_application_and_uninstall_removes_the_job(secure_yarn, job_env, yarn_job, tmp_path):
    """A job whose task sleeps: `job stop` while it runs ends the deploy following it and kills its YARN
    application; `uninstall` removes the state folder."""
    with zipfile.ZipFile(tmp_path / "sleeps.zip", "w") as archive:
        archive.writestr("jobs/sleeps.py", SLEEPS)
    spec = json.loads((ROOT / "examples" / "poets" / "poets.json").read_text())
    spec["service"].update(
        name="sleeps", job_url=str(tmp_path / "sleeps.zip"), job_path="jobs", job_name="sleeps"
    )
    spec["service"]["security"]["kerberos"]["kdc"] = {"hostname": "127.0.0.1", "port": secure_yarn.kdc_port}
    for key in ("hdfs", "shared_filesystem"):
        spec["service"].pop(key)
    spec["worker"] = {"count": 1, "cpus": 1, "mem": 512}
    (tmp_path / "sleeps.json").write_text(json.dumps(spec))
    flags = [f"--state_dir={tmp_path / 'state'}", f"--secrets_dir={yarn_job.store}", "--name=sleeps"]
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["PATH"] = f"{secure_yarn.bin_dir}:{env['PATH']}"
    argv = [sys.executable, "-m", "lastlayer", "job", "deploy", str(tmp_path / "sleeps.json"), *flags[:2]]
    with subprocess.Popen(
        [*argv, "--scheduler=yarn", f"--yarn_env={job_env}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as deploying:
        plan_path = tmp_path / "state" / "sleeps" / "plan.json"
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        # stopped once YARN runs the task's container (STARTING "container_… on NODE": localizing)
        while not (plan_path.exists() and placed(Plan.load(plan_path).step("worker-0"))):
            assert deploying.poll() is None and time.monotonic() < deadline, deploying.stderr.read()[-3000:]
            time.sleep(0.5)
        stopped = job(secure_yarn, "stop", *flags, timeout=300)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "worker-0:[node] (ERROR)" in stopped.stdout
        assert deploying.wait(timeout=120) != 0
    app = app_id(tmp_path / "state", "sleeps")
    shown = job(secure_yarn, "plan", "show", *flags, timeout=300)
    assert f"yarn: {app}" in shown.stdout and "worker-0: stopped" in shown.stdout, shown.stdout + shown.stderr
    assert rm_app(secure_yarn, app)["state"] == "KILLED"
    removed = job(secure_yarn, "uninstall", *flags, timeout=300)
    assert removed.returncode == 0, removed.stderr[-3000:]
    assert not (tmp_path / "state" / "sleeps").exists()
