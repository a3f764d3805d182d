"""The job service on local files: deploy, plan, tasks, logs, restart, several workers, bad deployments,
the job module's executors(context), options used or warned about, and each action's own flags."""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from helpers import make_dataset
from lastlayer.cli import main
from lastlayer.jobs import prepare, secret_store
from lastlayer.jobs.plan import COMPLETE, ERROR, Plan, new_plan
from lastlayer.jobs.task import TaskDescription

ROOT = Path(__file__).resolve().parents[2]
POETS = ROOT / "examples" / "poets"


def options(
    tmp: Path, job_url: str, images: Path, model_dir: Path, workers: int = 1, args=None, **service
) -> Path:
    """An options file in the walkthrough's shape, on local paths and without Kerberos."""
    context = {
        "args": {
            "--bottleneck_dir": "{{shared_filesystem}}/bottlenecks",
            "--how_many_training_steps": 40,
            "--model_dir": str(model_dir),
            "--summaries_dir": "{{shared_filesystem}}/training_summaries/m",
            "--output_graph": "{{shared_filesystem}}/retrained_graph.pb",
            "--output_labels": "{{shared_filesystem}}/retrained_labels.txt",
            "--image_dir": str(images),
            "--random_seed": 5,
            **(args or {}),
        }
    }
    spec = {
        "service": {
            "name": service.pop("name", "poets-test"),
            "job_url": job_url,
            "job_path": "dcos-tensorflow-demos-master/poets",
            "job_name": "poets",
            "job_context": json.dumps(context),
            "shared_filesystem": str(tmp / "shared"),
            **service,
        },
        "worker": {"count": workers, "cpus": 1, "mem": 2048},
    }
    path = tmp / "options.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def poets_zip(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("zip") / "poets.zip"
    assert main(["job", "package", str(POETS), str(target), "--root=dcos-tensorflow-demos-master/poets"]) == 0
    return target


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("images"), per_class=8)


def job(*argv: str, state: Path) -> int:
    """``lastlayer job ...`` with ``--state_dir`` (and ``--timeout`` where the action runs tasks)."""
    runs = argv[0] == "deploy" or argv[:2] == ("plan", "restart")
    return main(["job", *argv, f"--state_dir={state}", *(["--timeout=300"] if runs else [])])


def test_plan_renders_as_the_walkthrough():
    plan = new_plan({"worker": 1})
    for step in plan.steps:
        step.status = COMPLETE
    assert plan.render() == (
        "deploy (parallel strategy) (COMPLETE)\n"
        "├─ gpuworker (parallel strategy) (COMPLETE)\n"
        "├─ worker (parallel strategy) (COMPLETE)\n"
        "│  └─ worker-0:[node] (COMPLETE)\n"
        "└─ parameter-server (parallel strategy) (COMPLETE)"
    )
    assert Plan.from_json(plan.to_json()).render() == plan.render()


def test_deploy_runs_the_poets_job_to_complete(tmp_path, poets_zip, images, model_dir, capsys):
    opts = options(tmp_path, str(poets_zip), images, model_dir)
    assert job("deploy", str(opts), state=tmp_path / "state") == 0
    out = capsys.readouterr().out
    assert "deploy (parallel strategy) (COMPLETE)" in out and "worker-0:[node] (COMPLETE)" in out
    shared = tmp_path / "shared"
    assert {"retrained_graph.pb", "retrained_labels.txt", "training_summaries"} <= {
        p.name for p in shared.iterdir()
    }
    assert (
        job("log", "worker-0", "stderr", "--name=poets-test", state=tmp_path / "state") == 2
    )  # needs --completed
    assert "--completed" in capsys.readouterr().err
    assert job("log", "worker-0", "stderr", "--completed", "--name=poets-test", state=tmp_path / "state") == 0
    assert "Final test accuracy = " in capsys.readouterr().out
    assert job("tasks", "--name=poets-test", state=tmp_path / "state") == 0
    assert capsys.readouterr().out.startswith("worker-0     COMPLETE")


def test_two_workers_share_the_work_and_give_the_one_worker_model(tmp_path, poets_zip, images, model_dir):
    one = tmp_path / "one"
    two = tmp_path / "two"
    one.mkdir()
    two.mkdir()
    assert (
        job("deploy", str(options(one, str(poets_zip), images, model_dir, name="one")), state=one / "s") == 0
    )
    assert (
        job(
            "deploy",
            str(options(two, str(poets_zip), images, model_dir, workers=2, name="two")),
            state=two / "s",
        )
        == 0
    )
    assert (two / "shared" / "retrained_graph.pb").read_bytes() == (
        one / "shared" / "retrained_graph.pb"
    ).read_bytes()
    worker1 = (two / "s" / "two" / "tasks" / "worker-1" / "stderr").read_text()
    assert "its shard of the bottlenecks is cached; worker 0 trains" in worker1


def test_detached_deploy_is_watched_from_another_shell(tmp_path, poets_zip, images, model_dir, capsys):
    state = tmp_path / "state"
    assert (
        job("deploy", str(options(tmp_path, str(poets_zip), images, model_dir)), "--detach", state=state) == 0
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job("plan", "show", "deploy", "--name=poets-test", state=state)
        text = capsys.readouterr().out
        if "(COMPLETE)\n├─ gpuworker" in text or "(ERROR)" in text.splitlines()[0]:
            break
        time.sleep(0.5)
    assert text.startswith("deploy (parallel strategy) (COMPLETE)"), text


def bad_zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("unreachable", "cannot"),
        ("corrupt", "archive"),
        ("zip-slip", ".."),
        ("missing module", "job module 'poets' not found"),
        ("missing main", "has no main(server, log_dir, context)"),
        ("missing secret", "tensorflow_keytab"),
        ("gpu", "has no GPU"),
    ],
)
def test_bad_deployments_end_in_error_with_a_reason(
    case, needle, tmp_path, poets_zip, images, model_dir, capsys
):
    url = str(poets_zip)
    extra: dict = {}
    if case == "unreachable":
        url = "http://127.0.0.1:9/poets.zip"
    elif case == "corrupt":
        url = str(tmp_path / "corrupt.zip")
        Path(url).write_bytes(poets_zip.read_bytes()[:200])
    elif case == "zip-slip":
        url = str(bad_zip(tmp_path / "slip.zip", {"../../evil.py": "x = 1"}))
    elif case == "missing module":
        url = str(bad_zip(tmp_path / "m.zip", {"dcos-tensorflow-demos-master/poets/other.py": "x = 1"}))
    elif case == "missing main":
        url = str(bad_zip(tmp_path / "n.zip", {"dcos-tensorflow-demos-master/poets/poets.py": "x = 1"}))
    elif case == "missing secret":
        extra = {
            "security": {
                "kerberos": {
                    "enabled": True,
                    "kdc": {"hostname": "127.0.0.1", "port": 9},
                    "primary": "tensorflow",
                    "realm": "LOCAL",
                    "keytab_secret": "__dcos_base64__tensorflow_keytab",
                }
            }
        }
    opts = options(tmp_path, url, images, model_dir, **extra)
    if case == "gpu":
        spec = json.loads(opts.read_text())
        spec["gpu_worker"] = {"count": 1}
        opts.write_text(json.dumps(spec))
    state = tmp_path / "state"
    start = time.monotonic()
    assert job("deploy", str(opts), f"--secrets_dir={tmp_path / 'secrets'}", state=state) == 1
    assert time.monotonic() - start < 120
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out
    plan = Plan.load(state / "poets-test" / "plan.json")
    assert plan.status == ERROR
    messages = " ".join(s.message or "" for s in plan.steps)
    assert needle in messages, messages


def test_a_failed_step_is_restarted(tmp_path, poets_zip, images, model_dir, capsys):
    state = tmp_path / "state"
    broken = tmp_path / "missing-images"
    opts = options(tmp_path, str(poets_zip), broken, model_dir)
    assert job("deploy", str(opts), state=state) == 1
    plan = Plan.load(state / "poets-test" / "plan.json")
    assert plan.step("worker-0").status == ERROR and "does not exist" in (plan.step("worker-0").message or "")
    broken.symlink_to(images, target_is_directory=True)  # the data arrives; restart the failed step
    assert job("plan", "restart", "deploy", "worker-0", "--name=poets-test", state=state) == 0
    plan = Plan.load(state / "poets-test" / "plan.json")
    assert plan.status == COMPLETE and plan.step("worker-0").restarts == 1


def test_mem_is_enforced(tmp_path, poets_zip, images, model_dir):
    opts = options(tmp_path, str(poets_zip), images, model_dir)
    spec = json.loads(opts.read_text())
    spec["worker"]["mem"] = 64
    opts.write_text(json.dumps(spec))
    assert job("deploy", str(opts), state=tmp_path / "state") == 1
    step = Plan.load(tmp_path / "state" / "poets-test" / "plan.json").step("worker-0")
    assert step.status == ERROR and "over its mem of 64 MiB" in (step.message or "")


def test_stop_ends_a_running_job(tmp_path, poets_zip, images, model_dir, capsys):
    opts = options(tmp_path, str(poets_zip), images, model_dir)
    spec = json.loads(opts.read_text())
    context = json.loads(spec["service"]["job_context"])
    context["args"]["--how_many_training_steps"] = 10_000_000
    spec["service"]["job_context"] = json.dumps(context)
    opts.write_text(json.dumps(spec))
    state = tmp_path / "state"
    assert job("deploy", str(opts), "--detach", state=state) == 0
    deadline = time.monotonic() + 120
    plan = Plan.load(state / "poets-test" / "plan.json")
    while plan.step("worker-0").status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
        plan = Plan.load(state / "poets-test" / "plan.json")
    pid = plan.step("worker-0").pid
    assert job("stop", "--name=poets-test", state=state) == 0
    plan = Plan.load(state / "poets-test" / "plan.json")
    assert plan.step("worker-0").status == ERROR and plan.step("worker-0").message in (
        "stopped",
        "exit code -15",
    )
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert job("uninstall", "--name=poets-test", state=state) == 0
    assert not (state / "poets-test").exists()


@pytest.mark.spark
def test_with_the_spark_engine_the_workers_become_executors(
    tmp_path, poets_zip, images, model_dir, monkeypatch
):
    for name in ("SPARK_CONF_DIR", "SPARK_HOME", "MASTER"):
        monkeypatch.delenv(name, raising=False)
    opts = options(tmp_path, str(poets_zip), images, model_dir, workers=2, args={"--engine": "spark"})
    assert job("deploy", str(opts), state=tmp_path / "s") == 0
    folder = tmp_path / "s" / "poets-test"
    conf = (folder / "private" / "spark-conf" / "spark-defaults.conf").read_text().splitlines()
    assert conf == [
        "spark.master local[2]",
        "spark.executor.instances 2",
        "spark.executor.cores 1",
        "spark.executor.memory 2048m",
    ]
    driver = (folder / "tasks" / "worker-0" / "stderr").read_text()
    assert "master local[2], 2 cores" in driver and "Bottlenecks: 24 computed" in driver
    assert "worker 0 drives them" in (folder / "tasks" / "worker-1" / "stderr").read_text()
    assert (tmp_path / "shared" / "retrained_graph.pb").exists()


# --- the typed task description, the job module's executors(context), the options used or warned --


def test_the_task_description_round_trips_through_json():
    task = TaskDescription(
        {"worker": ["127.0.0.1:4001", "127.0.0.1:4002"], "ps": ["127.0.0.1:4003"]},
        "worker",
        1,
        "/jobs/poets",
        "poets",
        "hdfs://default/run",
        {"args": {"--how_many_training_steps": 5}},
        "DEBUG",
    )
    assert TaskDescription.from_json(task.to_json()) == task
    server = task.server()
    assert (server.job_name, server.task_index, server.task_name) == ("worker", 1, "worker-1")
    assert server.target == "grpc://127.0.0.1:4002" and server.cluster == task.cluster
    data = json.loads(task.to_json())
    with pytest.raises(ValueError, match=r"missing \['log_level'\], unknown \['level'\]"):
        TaskDescription.from_json(
            json.dumps({**{k: v for k, v in data.items() if k != "log_level"}, "level": 1})
        )
    with pytest.raises(ValueError, match="wrong type of cluster, index"):
        TaskDescription.from_json(json.dumps({**data, "index": "1", "cluster": {"worker": "a:1"}}))


def tiny_job(tmp: Path, source: str) -> Path:
    """A job archive whose module ``tiny`` is ``source``."""
    return bad_zip(tmp / "tiny.zip", {"jobs/tiny.py": source})


def tiny_options(tmp: Path, job_url: Path, context: dict | None = None, **sections) -> Path:
    spec = {
        "service": {
            "name": "tiny",
            "job_url": str(job_url),
            "job_path": "jobs",
            "job_name": "tiny",
            "job_context": json.dumps(context or {}),
            **sections.pop("service", {}),
        },
        "worker": {"count": 2, "cpus": 1, "mem": 1024},
        **sections,
    }
    path = tmp / "tiny.json"
    path.write_text(json.dumps(spec))
    return path


SHOW_ENV = (
    "import os\n"
    "def main(server, log_dir, context):\n"
    "    for key in ('KRB5_TRACE', 'SPARK_CONF_DIR', 'OMP_NUM_THREADS'):\n"
    "        print(f'{key}={os.environ.get(key, \"\")}')\n"
)


def test_the_service_reads_no_job_flag_the_job_module_says_how_its_workers_run(tmp_path, capsys):
    """`--engine spark` in the context means nothing to the service: only the job module's
    executors(context) makes the workers Spark executors."""
    state = tmp_path / "s"
    spark_context = {"args": {"--engine": "spark"}}
    assert (
        job("deploy", str(tiny_options(tmp_path, tiny_job(tmp_path, SHOW_ENV), spark_context)), state=state)
        == 0
    )
    assert not (state / "tiny" / "private" / "spark-conf").exists()
    assert (state / "tiny" / "tasks" / "worker-0" / "stdout").read_text().splitlines()[1:] == [
        "SPARK_CONF_DIR=",
        "OMP_NUM_THREADS=1",
    ]
    source = SHOW_ENV + "def executors(context):\n    return 'spark' if context.get('spark') else None\n"
    assert (
        job("deploy", str(tiny_options(tmp_path, tiny_job(tmp_path, source), {"spark": 1})), state=state) == 0
    )
    conf = state / "tiny" / "private" / "spark-conf"
    assert (conf / "spark-defaults.conf").read_text().splitlines()[-3:] == [
        "spark.executor.instances 2",
        "spark.executor.cores 1",
        "spark.executor.memory 1024m",
    ]
    driver = (state / "tiny" / "tasks" / "worker-0" / "stdout").read_text()
    assert f"SPARK_CONF_DIR={conf}" in driver
    assert (
        f"OMP_NUM_THREADS={min(2, len(os.sched_getaffinity(0)))}" in driver
    )  # worker-0 gets both workers' cores
    assert "OMP_NUM_THREADS=1" in (state / "tiny" / "tasks" / "worker-1" / "stdout").read_text()


@pytest.mark.parametrize(
    ("hook", "needle"),
    [
        (
            "def executors(context):\n    raise RuntimeError('no way')\n",
            "executors(context) failed: RuntimeError: no way",
        ),
        ("def executors(context):\n    return 'flink'\n", "executors(context) answered 'flink'; answer None"),
    ],
)
def test_a_failing_executors_answer_is_an_error_step(tmp_path, hook, needle, capsys):
    opts = tiny_options(tmp_path, tiny_job(tmp_path, SHOW_ENV + hook))
    assert job("deploy", str(opts), state=tmp_path / "s") == 1
    plan = Plan.load(tmp_path / "s" / "tiny" / "plan.json")
    assert plan.status == ERROR and f"job module 'tiny': {needle}" in (plan.step("worker-0").message or "")


def test_kerberos_debug_traces_kerberos_into_the_tasks_stderr(tmp_path, capsys):
    kerberos = {"security": {"kerberos": {"debug": True}}}
    opts = tiny_options(tmp_path, tiny_job(tmp_path, SHOW_ENV), service=kerberos)
    assert job("deploy", str(opts), state=tmp_path / "s") == 0
    assert "KRB5_TRACE=/dev/stderr" in (tmp_path / "s" / "tiny" / "tasks" / "worker-0" / "stdout").read_text()


def test_disk_is_checked_free_before_the_tasks_start(tmp_path, capsys):
    free = shutil.disk_usage(tmp_path).free / 2**20
    opts = tiny_options(tmp_path, tiny_job(tmp_path, SHOW_ENV), worker={"count": 2, "disk": free})
    assert job("deploy", str(opts), state=tmp_path / "s") == 1
    message = Plan.load(tmp_path / "s" / "tiny" / "plan.json").step("worker-0").message or ""
    assert message.startswith(f"the tasks ask for {2 * free:g} MiB of disk (worker.disk x worker.count) but ")
    assert "free some space, lower disk, or deploy with another --state_dir" in message
    opts = tiny_options(tmp_path, tiny_job(tmp_path, SHOW_ENV), worker={"count": 2, "disk": 1})
    assert job("deploy", str(opts), state=tmp_path / "s") == 0


def test_tasks_asking_for_gpus_need_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "gpu_available", lambda: False)
    opts = tiny_options(tmp_path, tiny_job(tmp_path, SHOW_ENV), worker={"count": 1, "gpus": 1})
    assert job("deploy", str(opts), state=tmp_path / "s") == 1
    message = Plan.load(tmp_path / "s" / "tiny" / "plan.json").step("worker-0").message
    assert message == (
        "worker.gpus is 1 but this machine has no GPU (no /dev/nvidia0, no nvidia-smi): set worker.gpus to 0"
    )


# --- the command line: one sub-parser per action, each with only its own flags -------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["deploy", "x.json", "--name=x"], "--name"),
        (["deploy", "x.json", "--completed"], "--completed"),
        (["plan", "show", "--detach"], "--detach"),
        (["plan", "show", "--timeout=5"], "--timeout"),
        (["plan", "restart", "--completed"], "--completed"),
        (["tasks", "--scheduler=yarn"], "--scheduler"),
        (["log", "worker-0", "--detach"], "--detach"),
        (["stop", "--root=x"], "--root"),
        (["uninstall", "--timeout=1"], "--timeout"),
        (["package", "a", "b", "--state_dir=/tmp"], "--state_dir"),
        (["secret", "a", "b", "--name=x"], "--name"),
    ],
)
def test_each_action_refuses_the_flags_of_the_others(argv, flag, tmp_path, capsys):
    assert main(["job", *argv]) == 2
    assert f"lastlayer: error: unknown flag {flag}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_actions_explain_themselves_and_their_mistakes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["job", "deploy", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lastlayer job deploy [-h] [--state_dir STR] [--detach BOOL]" in out
    assert "service.job_url (str, required): URL of the job archive" in out  # the options file's options
    assert "worker.count (int, default 1): Number of tasks in the group." in out
    with pytest.raises(SystemExit):
        main(["job", "log", "--help"])
    assert "[--completed BOOL] [TASK] [STREAM]" in " ".join(capsys.readouterr().out.split())
    usage = "(usage: job deploy OPTIONS.json | job plan show [deploy] |"
    for argv, message in [
        (["job"], "job needs deploy, plan, tasks, log, stop, uninstall, package or secret "),
        (["job", "bogus"], "unknown job action 'bogus' "),
        (["job", "plan"], "job plan needs show or restart "),
        (["job", "plan", "again"], "unknown job plan action 'again' "),
        (["job", "deploy"], "job deploy needs the options file "),
        (["job", "log"], "job log needs a task name "),
        (["job", "package", "src"], "job package needs the job folder and the zip to write "),
        (["job", "secret", "name"], "job secret needs the secret name and the file holding its value "),
    ]:
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"lastlayer: error: {message}{usage}")
    assert main(["job", "plan", "show", "recovery"]) == 2
    assert "invalid choice: 'recovery' (choose from 'deploy')" in capsys.readouterr().err
    assert main(["job", "deploy", "x.json", "--timeout=-1"]) == 2
    assert "--timeout=-1.0: must be 0 (no limit) or positive" in capsys.readouterr().err


def test_secret_and_package_actions(tmp_path, capsys):
    keytab = tmp_path / "keytab"
    keytab.write_bytes(b"\x05\x02binary")
    store = tmp_path / "store"
    assert main(["job", "secret", "__dcos_base64__k", str(keytab), f"--secrets_dir={store}"]) == 0
    assert capsys.readouterr().out == "stored secret __dcos_base64__k\n"
    assert secret_store.read_secret("__dcos_base64__k", store) == b"\x05\x02binary"
    assert main(["job", "secret", "x", str(tmp_path / "missing"), f"--secrets_dir={store}"]) == 2
    assert "cannot read " in capsys.readouterr().err
    assert main(["job", "package", str(POETS), str(tmp_path / "p.zip")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'p.zip'}\n"
