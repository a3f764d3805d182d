"""The job options file: the walkthrough's poets.json as written, defaults, and every kind of error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import get_type_hints

import pytest

from lastlayer.errors import UsageError
from lastlayer.jobs import spec as spec_module
from lastlayer.jobs.spec import JobSpec, ServiceSpec, TaskGroupSpec, describe_options
from lastlayer.settings import fields

# The walkthrough's demos/poets.json, verbatim (section "Distributing the job").
POETS_JSON = r"""{
    "service": {
        "name": "tensorflow",
        "security": {
            "kerberos": {
                "enabled": true,
                "kdc": {
                    "hostname": "kdc.marathon.autoip.dcos.thisdcos.directory",
                    "port": 2500
                },
                "primary": "tensorflow",
                "realm": "LOCAL",
                "keytab_secret": "__dcos_base64__tensorflow_keytab"
            }
        },
        "hdfs": {
            "config_uri": "http://api.hdfs.marathon.l4lb.thisdcos.directory/v1/endpoints"
        },
        "job_url": "https://github.com/elezar/dcos-tensorflow-demos/archive/master.zip",
        "job_path": "dcos-tensorflow-demos-master/poets",
        "job_name": "poets",
        "job_context": "{\r\n    \"args\": {\r\n        \"--bottleneck_dir\": \"{{shared_filesystem}}\/bottlenecks\",\r\n        \"--how_many_training_steps\": 500,\r\n        \"--model_dir\": \"\/mnt\/mesos\/sandbox\/tf-volume\/models\/\",\r\n        \"--summaries_dir\": \"{{shared_filesystem}}\/training_summaries\/mobilenet_0.50_224\",\r\n        \"--output_graph\": \"{{shared_filesystem}}\/retrained_graph.pb\",\r\n        \"--output_labels\": \"{{shared_filesystem}}\/retrained_labels.txt\",\r\n        \"--architecture\": \"mobilenet_0.50_224\",\r\n        \"--image_dir\": \"hdfs:\/\/default\/tensorflow_input_data\/flower_photos\"\r\n    }\r\n}",
        "shared_filesystem": "hdfs://default/tensorflow/test_run"
    },
    "parameter_server": {
        "count": 0
    },
    "worker": {
        "cpu": 4.0,
        "mem": 4096,
        "count": 1
    }
}
"""  # noqa: E501 - verbatim

MINIMAL = {"service": {"job_url": "https://example.com/job.zip", "job_name": "poets"}}


def with_changes(*changes: tuple[str, object]) -> dict:
    """MINIMAL with ``("a.b.c", value)`` set (sections created as needed)."""
    data = json.loads(json.dumps(MINIMAL))
    for path, value in changes:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def error_of(data: object) -> str:
    with pytest.raises(UsageError) as info:
        JobSpec.from_dict(data)
    return str(info.value)


def test_the_walkthrough_file_loads_with_one_warning(tmp_path: Path):
    path = tmp_path / "poets.json"
    path.write_text(POETS_JSON, encoding="utf-8")
    spec, warnings = JobSpec.load(str(path))
    assert warnings == [
        "worker.cpu is read as worker.cpus: rename the key to 'cpus' (the service's option name)"
    ]
    service = spec.service
    assert (service.name, service.user, service.log_level) == ("tensorflow", "", "INFO")  # "": the deployer
    assert service.job_url == "https://github.com/elezar/dcos-tensorflow-demos/archive/master.zip"
    assert service.job_path == "dcos-tensorflow-demos-master/poets"
    assert service.job_name == "poets"
    assert service.shared_filesystem == "hdfs://default/tensorflow/test_run"
    assert service.use_tensorboard is False
    assert service.hdfs.config_uri == "http://api.hdfs.marathon.l4lb.thisdcos.directory/v1/endpoints"
    kerberos = service.security.kerberos
    assert kerberos.enabled is True and kerberos.debug is False
    assert (kerberos.kdc.hostname, kerberos.kdc.port) == ("kdc.marathon.autoip.dcos.thisdcos.directory", 2500)
    assert (kerberos.primary, kerberos.realm) == ("tensorflow", "LOCAL")
    assert kerberos.keytab_secret == "__dcos_base64__tensorflow_keytab"
    assert spec.worker == TaskGroupSpec(count=1, cpus=4.0, mem=4096.0, disk=0.0, gpus=0)
    assert spec.parameter_server == TaskGroupSpec(count=0)
    assert spec.gpu_worker == TaskGroupSpec(count=0, gpus=1)
    assert "\r\n" in service.job_context  # the walkthrough's CR LF line ends survive and parse
    assert spec.context() == {
        "args": {
            "--bottleneck_dir": "{{shared_filesystem}}/bottlenecks",
            "--how_many_training_steps": 500,
            "--model_dir": "/mnt/mesos/sandbox/tf-volume/models/",
            "--summaries_dir": "{{shared_filesystem}}/training_summaries/mobilenet_0.50_224",
            "--output_graph": "{{shared_filesystem}}/retrained_graph.pb",
            "--output_labels": "{{shared_filesystem}}/retrained_labels.txt",
            "--architecture": "mobilenet_0.50_224",
            "--image_dir": "hdfs://default/tensorflow_input_data/flower_photos",
        }
    }
    assert spec.context() is not spec.context()  # callers may change their copy


def test_to_dict_round_trips_without_warnings(tmp_path: Path):
    spec, _ = JobSpec.from_dict(json.loads(POETS_JSON))
    data = spec.to_dict()
    assert data["worker"]["cpus"] == 4.0 and "cpu" not in data["worker"]
    again, warnings = JobSpec.from_dict(json.loads(json.dumps(data)))
    assert again == spec and warnings == []
    (tmp_path / "state.json").write_text(json.dumps(data))
    assert JobSpec.load(f"file://{tmp_path}/state.json") == (spec, [])


def test_defaults_when_sections_are_missing():
    spec, warnings = JobSpec.from_dict(MINIMAL)
    assert warnings == []
    service = spec.service
    assert (service.name, service.user, service.log_level, service.job_path) == (
        "tensorflow",
        "",
        "INFO",
        "",
    )
    assert (service.job_url_max_bytes, service.job_url_timeout) == (512 * 2**20, 600.0)
    assert (service.hdfs.config_max_bytes, service.hdfs.config_timeout) == (4 * 2**20, 30.0)
    assert (service.job_context, service.shared_filesystem, service.use_tensorboard) == ("{}", "", False)
    assert service.hdfs.config_uri == ""
    kerberos = service.security.kerberos
    assert (kerberos.enabled, kerberos.debug, kerberos.kdc.hostname, kerberos.kdc.port) == (
        False,
        False,
        "",
        88,
    )
    assert (kerberos.primary, kerberos.realm, kerberos.keytab_secret) == ("", "", "")
    assert spec.worker == TaskGroupSpec(count=1, cpus=1.0, mem=1024.0, disk=0.0, gpus=0)
    assert spec.parameter_server.count == 0 and spec.gpu_worker.count == 0
    assert spec.context() == {}
    # A section given in part keeps its group's defaults for the rest.
    spec, _ = JobSpec.from_dict(with_changes(("worker.mem", 2048), ("parameter_server.cpus", 2)))
    assert spec.worker == TaskGroupSpec(count=1, mem=2048.0)
    assert spec.parameter_server == TaskGroupSpec(count=0, cpus=2.0)
    spec, _ = JobSpec.from_dict(
        with_changes(("service.security", {}), ("service.security.kerberos.debug", True))
    )
    assert spec.service.security.kerberos.debug and spec.service.security.kerberos.kdc.port == 88


def test_required_options_name_their_path():
    message = error_of({})
    assert message.startswith("2 problems in the job options: ")
    assert "service.job_url is required: URL of the job archive" in message
    assert "service.job_name is required" in message
    assert error_of({"service": {"job_name": "poets"}}).startswith("service.job_url is required")
    assert error_of(with_changes(("service.job_url", " "))) == (
        "service.job_url: must not be empty; give the URL of the job archive"
    )


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("gpuworker", "unknown option gpuworker (did you mean gpu_worker?)"),
        ("service.jobname", "unknown option service.jobname (did you mean service.job_name?)"),
        ("worker.counts", "unknown option worker.counts (did you mean worker.count?)"),
        (
            "service.hdfs.config_url",
            "unknown option service.hdfs.config_url (did you mean service.hdfs.config_uri?)",
        ),
        (
            "service.security.kerberos.kdc.hostnme",
            "unknown option service.security.kerberos.kdc.hostnme "
            "(did you mean service.security.kerberos.kdc.hostname?)",
        ),
        (
            "service.security.kerberoz",
            "unknown option service.security.kerberoz (did you mean service.security.kerberos?)",
        ),
    ],
)
def test_unknown_keys_name_the_path_and_the_closest_option(key: str, expected: str):
    assert error_of(with_changes((key, 1))) == expected


def test_unknown_key_without_a_close_match_lists_the_options():
    message = error_of(with_changes(("service.hdfs.zzz", 1)))
    assert message == (
        "unknown option service.hdfs.zzz: remove it (options here: service.hdfs.config_uri, "
        "service.hdfs.config_max_bytes, service.hdfs.config_timeout)"
    )


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("worker.count", "1", 'worker.count: must be a whole number, got a string ("1")'),
        ("worker.count", 1.5, "worker.count: must be a whole number, got a number (1.5)"),
        ("worker.count", True, "worker.count: must be a whole number, got a boolean (true)"),
        ("worker.cpus", "4", 'worker.cpus: must be a number, got a string ("4")'),
        ("gpu_worker.mem", None, "gpu_worker.mem: must be a number, got null (null)"),
        (
            "service.use_tensorboard",
            "yes",
            'service.use_tensorboard: must be true or false, got a string ("yes")',
        ),
        (
            "service.security.kerberos.enabled",
            1,
            "service.security.kerberos.enabled: must be true or false, got a number (1)",
        ),
        ("service.job_url", 5, "service.job_url: must be a string, got a number (5)"),
        ("service.hdfs", "x", "service.hdfs: must be a JSON object, got a string"),
        ("worker", [1], "worker: must be a JSON object, got an array"),
    ],
)
def test_wrong_types_name_the_path(path: str, value: object, expected: str):
    assert error_of(with_changes((path, value))) == expected


def test_the_whole_file_must_be_an_object():
    assert error_of([MINIMAL]) == "the job options: must be a JSON object, got an array"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("worker.count", -1, "worker.count: must be >= 0, got -1"),
        ("parameter_server.count", -3, "parameter_server.count: must be >= 0, got -3"),
        ("worker.cpus", 0, "worker.cpus: must be > 0, got 0.0"),
        ("worker.mem", -5, "worker.mem: must be > 0, got -5.0"),
        ("worker.disk", -1, "worker.disk: must be >= 0, got -1.0"),
        ("worker.gpus", -1, "worker.gpus: must be >= 0, got -1"),
        (
            "service.security.kerberos.kdc.port",
            70000,
            "service.security.kerberos.kdc.port: must be <= 65535, got 70000",
        ),
        (
            "service.log_level",
            "LOUD",
            'service.log_level: must be one of DEBUG, INFO, WARN, WARNING, ERROR, FATAL, got "LOUD"',
        ),
    ],
)
def test_out_of_range_values_name_the_path(path: str, value: object, expected: str):
    assert error_of(with_changes((path, value))) == expected


def test_numbers_are_read_as_declared():
    spec, _ = JobSpec.from_dict(
        with_changes(("worker.count", 2.0), ("worker.cpus", 3), ("worker.mem", 512.5))
    )
    assert spec.worker.count == 2 and isinstance(spec.worker.count, int)
    assert spec.worker.cpus == 3.0 and isinstance(spec.worker.cpus, float) and spec.worker.mem == 512.5


def test_cpu_and_cpus_together_is_an_error():
    assert error_of(with_changes(("worker.cpu", 2), ("worker.cpus", 3))) == (
        "worker.cpu and worker.cpus both set worker.cpus: keep one"
    )


def test_several_problems_are_reported_together():
    message = error_of(with_changes(("worker.count", -1), ("worker.mem", 0), ("service.jobname", "x")))
    assert message.startswith("unknown option service.jobname (did you mean service.job_name?)")
    message = error_of(with_changes(("worker.count", -1), ("worker.mem", 0)))
    assert (
        message == "2 problems in the job options: worker.count: must be >= 0, got -1; "
        "worker.mem: must be > 0, got 0.0"
    )


def test_job_context_must_be_a_json_object_string():
    message = error_of(with_changes(("service.job_context", '{\r\n  "args": {\r\n    "--a": 1,\r\n  }\r\n}')))
    assert message.startswith("service.job_context: invalid JSON at line 4, column 3: ")
    assert "Expecting property name enclosed in double quotes" in message
    assert error_of(with_changes(("service.job_context", "[1, 2]"))).startswith(
        "service.job_context: must hold a JSON object, got an array"
    )
    spec, _ = JobSpec.from_dict(with_changes(("service.job_context", '{"args": {"--x": "y"}}')))
    assert spec.context() == {"args": {"--x": "y"}}


def test_kerberos_enabled_needs_its_settings():
    message = error_of(with_changes(("service.security.kerberos.enabled", True)))
    assert message.startswith("4 problems in the job options: ")
    for name in ("primary", "realm", "kdc.hostname", "keytab_secret"):
        assert (
            f"service.security.kerberos.{name}: must be set when service.security.kerberos.enabled is true"
            in message
        )
    data = json.loads(POETS_JSON)
    del data["service"]["security"]["kerberos"]["realm"]
    assert error_of(data) == (
        "service.security.kerberos.realm: must be set when service.security.kerberos.enabled is true; "
        "give the realm, e.g. LOCAL, or set service.security.kerberos.enabled to false"
    )


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (
            "service.job_name",
            "poets.py",
            "service.job_name: 'poets.py' is not a module name; drop the .py: 'poets'",
        ),
        ("service.job_name", "my-job", "service.job_name: 'my-job' is not a module name"),
        ("service.job_path", "/abs/poets", "service.job_path: '/abs/poets' must be a folder relative"),
        ("service.job_path", "a/../../b", "service.job_path: 'a/../../b' must be a folder relative"),
        ("service.name", "TensorFlow", "service.name: 'TensorFlow' is not a service name"),
        ("service.name", "../decoy", "service.name: '../decoy' is not a service name"),
        ("service.name", "a/../b", "service.name: 'a/../b' is not a service name"),
        ("service.job_url_max_bytes", 0, "service.job_url_max_bytes: must be >= 1, got 0"),
        ("service.job_url_timeout", 0, "service.job_url_timeout: must be > 0, got 0"),
        ("service.hdfs.config_max_bytes", -5, "service.hdfs.config_max_bytes: must be >= 1, got -5"),
        ("service.hdfs.config_timeout", -1, "service.hdfs.config_timeout: must be > 0, got -1"),
    ],
)
def test_service_values(path: str, value: str, fragment: str):
    assert error_of(with_changes((path, value))).startswith(fragment)


def test_gpu_workers_need_gpus():
    assert error_of(with_changes(("gpu_worker.count", 1), ("gpu_worker.gpus", 0))).startswith(
        "gpu_worker.gpus: must be >= 1 when gpu_worker.count is 1, got 0"
    )
    spec, _ = JobSpec.from_dict(with_changes(("gpu_worker.count", 2)))
    assert spec.gpu_worker == TaskGroupSpec(count=2, gpus=1)


def test_load_reports_invalid_json_with_line_and_column(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "service": {\n    "name": "tensorflow",\n  }\n}\n')
    with pytest.raises(
        UsageError, match=r"bad.json: invalid JSON at line 4, column 3: Expecting property name"
    ):
        JobSpec.load(str(path))
    path.write_text('{"service": {"job_url": "a", "job_url": "b", "job_name": "p"}}')
    with pytest.raises(UsageError, match='the key "job_url" appears twice in one object: keep one of them'):
        JobSpec.load(str(path))
    path.write_bytes(b'{"service": "\xff"}')
    with pytest.raises(UsageError, match="not UTF-8 text"):
        JobSpec.load(str(path))


def test_specs_are_frozen_and_construction_validates():
    spec, _ = JobSpec.from_dict(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.worker = TaskGroupSpec(count=3)  # type: ignore[misc]
    assert dataclasses.replace(spec, worker=TaskGroupSpec(count=3)).worker.count == 3
    with pytest.raises(UsageError, match=r"worker.count: must be >= 0, got -1"):
        dataclasses.replace(spec, worker=TaskGroupSpec(count=-1))
    with pytest.raises(UsageError, match=r"worker.cpus: must be a float, got str"):
        dataclasses.replace(spec, worker=TaskGroupSpec(cpus="4"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"service\.job_name: '' is not a module name"):
        JobSpec(service=ServiceSpec(job_url="https://x/j.zip", job_name=""))


def test_every_option_is_described_once():
    options = list(describe_options())
    paths = [path for path, _, _, _ in options]
    assert len(paths) == len(set(paths)) == 36
    assert all(doc for _, _, _, doc in options)
    described = {path: (kind, default) for path, kind, default, _ in options}
    assert described["service.job_url"] == ("str", None)
    assert described["worker.count"] == ("int", 1) and described["parameter_server.count"] == ("int", 0)
    assert described["service.security.kerberos.kdc.port"] == ("int", 88)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Legacy:
    """A section with an option accepted only to say what happens instead."""

    knob: str = fields.option("off", "An old knob.", unsupported="nothing turns; leave knob out")
    kept: int = fields.option(1, "A used option.")


def test_unsupported_options_are_read_with_a_warning_saying_what_happens_instead():
    assert list(spec_module._unsupported(_Legacy(knob="on", kept=2), "legacy")) == [
        'legacy.knob is "on", which is ignored: nothing turns; leave knob out'
    ]
    assert list(spec_module._unsupported(_Legacy(), "legacy")) == []  # the default says nothing
    # The service's own options are all used now: service.user and use_tensorboard say nothing.
    assert (
        JobSpec.from_dict(with_changes(("service.user", "alice"), ("service.use_tensorboard", True)))[1] == []
    )


def _unsupported(cls: type, path: str = "") -> set[str]:
    found: set[str] = set()
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{path}.{f.name}" if path else f.name
        if fields.is_section(hints[f.name]):
            found |= _unsupported(hints[f.name], full)
        elif fields.info(f).unsupported:
            found.add(full)
    return found


# Where the job service uses each option; a new option must be added here or marked unsupported.
USED = {
    "service.name": "the state folder's name (state.Job.named)",
    "service.user": "the account the tasks and TensorBoard become (user.run_as, task._become)",
    "service.use_tensorboard": "TensorBoard on log_dir while the job runs (supervisor.start_tensorboard)",
    "service.job_url_max_bytes": "the archive's download and extracted size (prepare.extract_job)",
    "service.job_url_timeout": "the archive's download time (prepare.extract_job)",
    "service.hdfs.config_max_bytes": "each Hadoop configuration file's size (prepare._hadoop_conf)",
    "service.hdfs.config_timeout": "each Hadoop configuration file's download time (prepare._hadoop_conf)",
    "service.log_level": "the tasks' log level (TaskDescription.log_level)",
    "service.job_url": "the archive fetched (prepare.extract_job)",
    "service.job_path": "the job module's folder (prepare.extract_job)",
    "service.job_name": "the job module imported (task._load_module)",
    "service.job_context": "the tasks' context and executors(context) (TaskDescription.context)",
    "service.shared_filesystem": "the tasks' log_dir (prepare.prepare)",
    "service.hdfs.config_uri": "the Hadoop configuration downloaded (prepare.cluster_login)",
    "service.security.kerberos.enabled": "the keytab login (prepare.cluster_login)",
    "service.security.kerberos.debug": "KRB5_TRACE into the tasks' stderr (prepare.prepare)",
    "service.security.kerberos.kdc.hostname": "krb5.conf (prepare.krb5_conf)",
    "service.security.kerberos.kdc.port": "krb5.conf (prepare.krb5_conf)",
    "service.security.kerberos.primary": "the principal (prepare.cluster_login)",
    "service.security.kerberos.realm": "the principal and krb5.conf (prepare.cluster_login)",
    "service.security.kerberos.keytab_secret": "the keytab (prepare.cluster_login)",
    **{
        f"{group}.{name}": use
        for group in ("worker", "parameter_server", "gpu_worker")
        for name, use in {
            "count": "the plan's steps (plan.new_plan)",
            "cpus": "each task's cores (supervisor.start) and the Spark executors' cores",
            "mem": "each task's memory limit (supervisor.poll) and the Spark executors' memory",
            "disk": "free disk checked before the tasks start (prepare._check_disk)",
            "gpus": "a GPU required on the machine (prepare._check_gpu)",
        }.items()
    },
}


def test_every_option_is_used_or_warned_about():
    unsupported = _unsupported(JobSpec)
    assert unsupported == set()
    assert {path for path, _, _, _ in describe_options()} == set(USED) | unsupported
    assert not set(USED) & unsupported
