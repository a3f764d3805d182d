"""The YARN scheduler's pure parts: the skein application built from an options file, and what a
container does with its name, its peers' addresses and the key-value store's entries."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lastlayer.errors import UsageError
from lastlayer.jobs import container, yarn
from lastlayer.jobs.spec import JobSpec
from lastlayer.jobs.task import TaskDescription
from lastlayer.jobs.yarn_spec import (
    PEERS_ENV,
    SCRIPT,
    TEMPLATE_ENV,
    YarnInputs,
    application_spec,
    decode,
    encode,
    task_template,
)

ROOT = Path(__file__).resolve().parents[2]
INPUTS = YarnInputs(
    "hdfs:///apps/lastlayer/lastlayer-job-env.tar.gz",
    "/state/poets/yarn/job.zip",
    "/state/poets/yarn/lastlayer-driver.zip",
    "/state/poets/yarn/hadoop-conf.zip",
)


def poets(**groups: dict) -> JobSpec:
    data = json.loads((ROOT / "examples" / "poets" / "poets.json").read_text())
    data.update(groups)
    spec, _ = JobSpec.from_dict(data)
    return spec


def test_one_service_per_task_group_sized_by_the_options_file():
    spec = poets(
        worker={"cpu": 2.5, "mem": 4096.4, "count": 2},
        parameter_server={"count": 1, "cpus": 1, "mem": 512},
    )
    app = application_spec(spec, INPUTS)
    assert set(app.services) == {"worker", "ps"}  # no gpuworker: its count is 0
    worker, ps = app.services["worker"], app.services["ps"]
    assert (worker.instances, worker.resources.memory, worker.resources.vcores) == (2, 4097, 3)
    assert (ps.instances, ps.resources.memory, ps.resources.vcores, ps.resources.gpus) == (1, 512, 1, 0)
    assert worker.max_restarts == 0 and app.max_attempts == 1
    assert decode(worker.env[PEERS_ENV]) == {"worker": 2, "ps": 1, "gpuworker": 0}
    assert worker.script == SCRIPT and "-m lastlayer.jobs.container" in SCRIPT
    assert app.name == "lastlayer-tensorflow" and "lastlayer" in app.tags


def test_gpu_workers_ask_yarn_for_their_gpus():
    app = application_spec(poets(gpu_worker={"count": 1, "gpus": 2, "cpus": 1, "mem": 1024}), INPUTS)
    assert app.services["gpuworker"].resources.gpus == 2


def test_every_container_localizes_the_env_the_job_the_code_and_the_hadoop_configuration():
    files = application_spec(poets(), INPUTS).services["worker"].files
    assert set(files) == {"env", "job", "lastlayer.zip", "hadoop-conf"}
    assert files["env"].source == INPUTS.env_archive and str(files["env"].type) == "ARCHIVE"
    assert str(files["job"].type) == "ARCHIVE" and str(files["hadoop-conf"].type) == "ARCHIVE"
    assert str(files["lastlayer.zip"].type) == "FILE"
    without = application_spec(poets(), dataclasses.replace(INPUTS, hadoop_conf="")).services["worker"]
    assert "hadoop-conf" not in without.files
    assert files["job"].source.endswith("/state/poets/yarn/job.zip")


def test_the_task_template_is_the_local_task_s_description_relative_to_the_container():
    spec = poets()
    template = task_template(spec, "worker")
    assert template.module_dir == "job/dcos-tensorflow-demos-master/poets" and template.module == "poets"
    assert template.log_dir == "hdfs://default/tensorflow/test_run" and template.user == ""
    assert template.context == spec.context() and template.cluster == {}
    env = application_spec(spec, INPUTS).services["worker"].env
    assert TaskDescription(**decode(env[TEMPLATE_ENV])) == template
    # YARN writes the values unescaped between double quotes and expands {{...}} in them
    assert "{{shared_filesystem}}" in json.dumps(template.context)
    assert all(re.fullmatch(r"[A-Za-z0-9_=-]+", value) for value in env.values()), env


def test_the_yarn_scheduler_needs_the_packed_python_and_no_service_user():
    with pytest.raises(UsageError, match="--scheduler=yarn needs --yarn_env"):
        yarn.check(poets(), "")
    data = json.loads((ROOT / "examples" / "poets" / "poets.json").read_text())
    data["service"]["user"] = "nobody"
    spec, _ = JobSpec.from_dict(data)
    with pytest.raises(UsageError, match=r"leave service\.user empty"):
        yarn.check(spec, "hdfs:///env.tar.gz")


def test_a_container_s_task_is_its_skein_name_or_the_index_it_stands_in_for():
    assert container.task_name({"SKEIN_CONTAINER_ID": "worker_1"}) == ("worker", 1)
    assert container.task_name({"SKEIN_CONTAINER_ID": "ps_0"}) == ("ps", 0)
    restart = {container.INDEXES_ENV: encode({"worker": [1, 3]})}
    assert container.task_name({"SKEIN_CONTAINER_ID": "worker_1", **restart}) == ("worker", 3)


def test_a_restart_runs_only_the_tasks_it_names_in_a_container_each():
    spec = poets(worker={"count": 4, "cpus": 1, "mem": 1024}, parameter_server={"count": 1})
    app = application_spec(spec, INPUTS, {"worker": [1, 3]})
    assert set(app.services) == {"worker"} and app.services["worker"].instances == 2
    worker = app.services["worker"]
    assert decode(worker.env[PEERS_ENV]) == {"worker": 4, "ps": 1, "gpuworker": 0}  # it waits for all
    assert decode(worker.env[container.INDEXES_ENV]) == {"worker": [1, 3]}
    assert container.INDEXES_ENV not in application_spec(spec, INPUTS).services["worker"].env


def test_the_cluster_is_complete_only_once_every_peer_published_its_address():
    peers = {"worker": 2, "ps": 1, "gpuworker": 0}
    some = {"address/worker-1": "h2:2", "address/ps-0": "h1:3"}
    assert container.cluster_of(some, peers) is None
    every = {**some, "address/worker-0": "h1:1"}
    assert container.cluster_of(every, peers) == {"worker": ["h1:1", "h2:2"], "ps": ["h1:3"]}


def test_waiting_for_peers_gives_up_after_its_timeout(monkeypatch):
    monkeypatch.setattr(container, "PEERS_POLL_S", 0.01)
    reads = []

    def read() -> dict[str, str]:
        reads.append(1)
        return {"address/worker-0": "h:1"} if len(reads) > 2 else {}

    assert container.wait_for_peers(read, {"worker": 1}, timeout=5) == {"worker": ["h:1"]}
    assert container.wait_for_peers(dict, {"worker": 1}, timeout=0.05) is None


def test_the_containers_get_tokens_for_every_file_system_the_job_names():
    app = application_spec(poets(), INPUTS)
    assert app.file_systems == ["hdfs://default"]  # shared_filesystem and --image_dir
    data = json.loads((ROOT / "examples" / "poets" / "poets.json").read_text())
    data["service"]["shared_filesystem"] = "viewfs://cluster/tf"
    data["service"]["job_context"] = json.dumps(
        {"args": {"--image_dir": "hdfs://nn:8020/in", "--x": "hdfs:///a"}}
    )
    spec, _ = JobSpec.from_dict(data)
    assert application_spec(spec, INPUTS).file_systems == ["hdfs://nn:8020", "viewfs://cluster"]


def watch_of(tmp_path: Path, counts: dict[str, int]) -> yarn._Watch:
    """A watch over a fresh plan (no YARN: what is tested folds container states into the plan)."""
    from lastlayer.jobs.plan import new_plan
    from lastlayer.jobs.state import Job

    job = Job(tmp_path / "job")
    job.folder.mkdir()
    return yarn._Watch(
        None, yarn.AppRecord("application_1_0001", 0.0, "hdfs:///env.tar.gz"), job, new_plan(counts), None
    )


def a_container(service: str, instance: int, state: str, message: str = "") -> SimpleNamespace:
    return SimpleNamespace(
        service_name=service,
        instance=instance,
        state=state,
        yarn_container_id=f"container_1_0001_01_{instance + 2:06d}" if state != "WAITING" else "",
        yarn_node_http_address="localhost:8042",
        exit_message=message,
    )


def test_container_states_become_step_statuses_and_the_record_keeps_each_task_s_container(tmp_path):
    watch = watch_of(tmp_path, {"worker": 2})
    assert watch.update(a_container("worker", 0, "RUNNING"), started=False)
    assert watch.plan.step("worker-0").status == "STARTING"  # YARN started it: it is localizing
    assert watch.update(a_container("worker", 0, "RUNNING"), started=True)  # its task published
    assert not watch.update(a_container("worker", 0, "RUNNING"), started=True)  # nothing changed
    failed = a_container("worker", 1, "FAILED", "Container exited with a non-zero exit code 3")
    assert watch.update(failed, started=True)
    w0, w1 = watch.plan.step("worker-0"), watch.plan.step("worker-1")
    assert (w0.status, w0.message) == ("RUNNING", "container_1_0001_01_000002 on localhost:8042")
    assert (w1.status, w1.message) == ("ERROR", "Container exited with a non-zero exit code 3")
    assert watch.record.containers == {
        "worker-0": "container_1_0001_01_000002",
        "worker-1": "container_1_0001_01_000003",
    }


def test_a_restart_s_containers_run_the_tasks_it_names(tmp_path):
    watch = watch_of(tmp_path, {"worker": 4})
    watch.record.indexes = {"worker": [1, 3]}
    watch.update(a_container("worker", 1, "RUNNING"), started=True)
    assert watch.plan.step("worker-3").status == "RUNNING" and watch.plan.step("worker-1").status == "PENDING"
    assert set(watch.record.containers) == {"worker-3"}


def test_parameter_servers_are_stopped_once_the_workers_are_done(tmp_path):
    watch = watch_of(tmp_path, {"worker": 1, "parameter_server": 1})
    watch.update(a_container("ps", 0, "RUNNING"), started=True)
    watch.update(a_container("worker", 0, "RUNNING"), started=True)
    assert not watch.workers_done()
    watch.update(a_container("worker", 0, "SUCCEEDED"), started=True)
    assert watch.workers_done()
    watch.finish("SUCCEEDED", "the workers finished")
    ps = watch.plan.step("ps-0")
    assert (ps.status, ps.message) == ("COMPLETE", "stopped: the workers finished")
    assert watch.plan.status == "COMPLETE"


def test_a_failed_application_fails_the_steps_it_did_not_end_saying_why(tmp_path):
    watch = watch_of(tmp_path, {"worker": 2})
    watch.update(a_container("worker", 0, "SUCCEEDED"), started=True)
    watch.update(a_container("worker", 1, "RUNNING"), started=True)
    watch.finish("FAILED", "Failure in service worker, see logs for more information.")
    assert watch.plan.step("worker-0").status == "COMPLETE"
    failed = watch.plan.step("worker-1")
    assert failed.status == "ERROR" and failed.message.startswith("Failure in service worker")
    assert "`lastlayer job log TASK`" in failed.message
    assert json.loads((tmp_path / "job" / "yarn.json").read_text())["app_id"] == "application_1_0001"
