"""Acceptance: the walkthrough's poets.json, deployed against the secure HDFS harness.

The options file is the walkthrough's own (examples/poets/poets.json) with only job_url (the local
poets.zip) and the KDC and HDFS endpoints changed. The harness's client configuration names its
NameNode as the nameservice ``default`` (the walkthrough's ``hdfs://default/...``).
"""

from __future__ import annotations

import json
import pwd
import shutil
import tempfile
import zipfile
from pathlib import Path

import fsspec
import pytest

from helpers import ENV_KEYS, as_superuser, lastlayer_as, make_dataset
from lastlayer.cli import main
from lastlayer.jobs import secret_store
from lastlayer.jobs.plan import ERROR, Plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deployment(secure_hdfs, endpoint, tmp_path_factory):
    """poets.zip, the keytab secrets, the photos on HDFS, and a function making the options file."""
    tmp = tmp_path_factory.mktemp("job")
    photos = make_dataset(tmp / "flower_photos", per_class=10)
    as_superuser(
        secure_hdfs,
        "fs.makedirs('/tensorflow', exist_ok=True)\n"
        "fs.client.set_owner('/tensorflow', 'tensorflow', 'tensorflow')\n"
        "fs.rm('/tensorflow/test_run', recursive=True) if fs.exists('/tensorflow/test_run') "
        "else None\n"
        "fs.rm('/tensorflow_input_data/flower_photos', recursive=True) "
        "if fs.exists('/tensorflow_input_data/flower_photos') else None\n",
    )
    done = lastlayer_as(
        secure_hdfs, "hdfs", "upload", str(photos), "hdfs:///tensorflow_input_data/flower_photos"
    )
    assert done.returncode == 0, done.stderr
    zip_path = tmp / "poets.zip"
    assert (
        main(
            [
                "job",
                "package",
                str(ROOT / "examples" / "poets"),
                str(zip_path),
                "--root=dcos-tensorflow-demos-master/poets",
            ]
        )
        == 0
    )
    store = tmp / "secrets"
    for user in ("tensorflow", "alice"):
        secret_store.write_secret(
            f"__dcos_base64__{user}_keytab",
            secure_hdfs.keytab(user).read_bytes(),
            str(store),
            base64_encode=True,
        )

    def options(**kerberos) -> Path:
        spec = json.loads((ROOT / "examples" / "poets" / "poets.json").read_text())
        service = spec["service"]
        service["job_url"] = str(zip_path)
        service["hdfs"]["config_uri"] = endpoint
        service["security"]["kerberos"]["kdc"] = {"hostname": "127.0.0.1", "port": secure_hdfs.kdc_port}
        service["security"]["kerberos"].update(kerberos)
        path = tmp / f"poets-{len(list(tmp.glob('poets-*.json')))}.json"
        path.write_text(json.dumps(spec, indent=4))
        return path

    yield options, store, tmp
    as_superuser(
        secure_hdfs,
        "fs.rm('/tensorflow/test_run', recursive=True) if fs.exists('/tensorflow/test_run') else None\n",
    )


def deploy(options: Path, store: Path, state: Path, *extra: str) -> int:
    return main(
        [
            "job",
            "deploy",
            str(options),
            f"--state_dir={state}",
            f"--secrets_dir={store}",
            "--timeout=600",
            *extra,
        ]
    )


def test_the_walkthrough_options_file_runs_to_complete(secure_hdfs, deployment, capsys, monkeypatch):
    options, store, tmp = deployment
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    state = tmp / "state"
    assert deploy(options(), store, state) == 0
    out = capsys.readouterr()
    assert "worker.cpu is read as worker.cpus" in out.err
    assert out.out.startswith("deploy (parallel strategy) (COMPLETE)\n")
    assert "│  └─ worker-0:[node] (COMPLETE)" in out.out
    assert main(["job", "plan", "show", "deploy", f"--state_dir={state}"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "deploy (parallel strategy) (COMPLETE)"
    assert main(["job", "log", "worker-0", "stderr", "--completed", f"--state_dir={state}"]) == 0
    log = capsys.readouterr().out
    assert "Final test accuracy = " in log and ": Step 499: Validation accuracy = " in log
    assert "mobilenet_0.50_224" in log  # the codelab name, substituted with a warning
    for key, value in secure_hdfs.env("tensorflow").items():
        if key in ENV_KEYS:
            monkeypatch.setenv(key, value)
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()
    fs = fsspec.filesystem("hdfs", host="127.0.0.1", port=secure_hdfs.namenode_port)
    listing = {e["name"].rsplit("/", 1)[-1]: e for e in fs.ls("/tensorflow/test_run", detail=True)}
    assert {"retrained_graph.pb", "retrained_labels.txt", "training_summaries"} <= set(listing)
    assert {
        listing[n]["owner"] for n in ("retrained_graph.pb", "retrained_labels.txt", "training_summaries")
    } == {"tensorflow"}
    fsspec.get_filesystem_class("hdfs").clear_instance_cache()


def test_a_wrong_principal_is_an_error_step(deployment, capsys):
    options, store, tmp = deployment
    assert deploy(options(primary="carol"), store, tmp / "state-carol") == 1
    plan = Plan.load(tmp / "state-carol" / "tensorflow" / "plan.json")
    assert plan.status == ERROR and "cannot log in as carol@LOCAL" in (plan.step("worker-0").message or "")


def test_alice_cannot_write_where_only_tensorflow_may(deployment, capsys):
    options, store, tmp = deployment
    assert (
        deploy(
            options(primary="alice", keytab_secret="__dcos_base64__alice_keytab"), store, tmp / "state-alice"
        )
        == 1
    )
    plan = Plan.load(tmp / "state-alice" / "tensorflow" / "plan.json")
    message = plan.step("worker-0").message or ""
    assert plan.status == ERROR and "Permission denied: user=alice, access=WRITE" in message, message


# Only modules the task has imported already: the interpreter may be out of the task user's reach.
READS_ITS_CREDENTIALS = """\
import json, os

def main(server, log_dir, context):
    facts = {"uid": os.getuid()}
    for key in ("KRB5CCNAME", "KRB5_CONFIG", "HADOOP_CONF_DIR"):
        path = os.environ[key].removeprefix("FILE:")
        if key == "HADOOP_CONF_DIR":
            path = os.path.join(path, "core-site.xml")
        with open(path, "rb") as f:
            facts[key] = [path, os.stat(path).st_uid, f.read(2).hex()]
    try:
        open(context["keytab"], "rb").read()
        facts["keytab"] = "read"
    except OSError as exc:
        facts["keytab"] = type(exc).__name__
    print(json.dumps(facts))
"""


def test_tasks_running_as_another_user_read_the_login_through_their_own_copies(deployment):
    """service.user with Kerberos: the task (as nobody) reads a copy of the credential cache, krb5.conf
    and Hadoop configuration made for it, not the service's private files, and never the keytab."""
    options, store, tmp = deployment
    spec = json.loads(options().read_text())
    zip_path = tmp / "creds.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("jobs/creds.py", READS_ITS_CREDENTIALS)
    base = Path(tempfile.mkdtemp(prefix="lastlayer-hdfs-user-"))
    base.chmod(0o755)  # pytest's folders are 0700: the task user could not reach the job
    try:
        state = base / "state"
        service = spec["service"]
        service.update(
            name="creds",
            user="nobody",
            job_url=str(zip_path),
            job_path="jobs",
            job_name="creds",
            job_context=json.dumps({"keytab": str(state / "creds" / "private" / "keytab")}),
        )
        service.pop("shared_filesystem")
        path = tmp / "creds.json"
        path.write_text(json.dumps(spec))
        assert deploy(path, store, state) == 0
        facts = json.loads((state / "creds" / "tasks" / "worker-0" / "stdout").read_text())
        nobody = pwd.getpwnam("nobody").pw_uid
        assert facts["uid"] == nobody and facts["keytab"] == "PermissionError"
        for key in ("KRB5CCNAME", "KRB5_CONFIG", "HADOOP_CONF_DIR"):
            copy, owner, _ = facts[key]
            assert copy.startswith(str(state / "creds" / "task-private")) and owner == nobody, facts
        assert facts["KRB5CCNAME"][2] == "0504"  # a credential cache (MIT format 4)
    finally:
        shutil.rmtree(base)
