"""`lastlayer upload` to the real secure HDFS: many files in flight through hdfs-native's asynchronous
client, each whole or absent, and a re-run (also after a SIGKILL) that copies only what is missing."""

from __future__ import annotations

import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ENV_KEYS, as_superuser, make_dataset, principal_flags
from lastlayer import storage
from lastlayer.errors import StorageError
from lastlayer.hadoop import ClusterConfig, HadoopLogin
from lastlayer.transfer import START_IN_FLIGHT, upload

BASE = "/uploads"


@pytest.fixture(scope="module")
def upload_dir(secure_hdfs) -> str:
    """/uploads, owned by tensorflow (made by the superuser)."""
    as_superuser(
        secure_hdfs,
        f"fs.makedirs('{BASE}', exist_ok=True)\nfs.client.set_owner('{BASE}', 'tensorflow', 'tensorflow')\n",
    )
    return BASE


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("upload") / "photos", per_class=150)


@pytest.fixture
def tensorflow(secure_hdfs, monkeypatch):
    """A library process logged in as tensorflow (KRB5_CONFIG names the cluster's krb5.conf)."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KRB5_CONFIG", str(secure_hdfs.krb5_conf))
    config = ClusterConfig(
        principal=secure_hdfs.principal("tensorflow"),
        keytab=str(secure_hdfs.keytab("tensorflow")),
        krb5_conf=str(secure_hdfs.krb5_conf),
        hadoop_conf_dir=str(secure_hdfs.conf_dir),
    )
    with HadoopLogin(config) as login:
        yield login


def listing(login: HadoopLogin, folder: str) -> dict[str, int]:
    """``{relative path: size}`` of every file below ``folder``, temporary files included."""
    fs, root = storage.url_to_fs(f"hdfs://{folder}", login.storage_options())
    return {posixpath.relpath(p, root): int(i["size"]) for p, i in fs.find(root, detail=True).items()}


def visible(files: dict[str, int]) -> dict[str, int]:
    """``files`` without the temporary (hidden) ones."""
    return {rel: size for rel, size in files.items() if not rel.split("/")[-1].startswith(".")}


def sources(photos: Path) -> dict[str, int]:
    return {p.relative_to(photos).as_posix(): p.stat().st_size for p in photos.rglob("*") if p.is_file()}


def test_many_files_in_flight_then_a_resume_of_only_what_is_missing(photos, upload_dir, tensorflow):
    dst = f"hdfs://{upload_dir}/resume"
    options = tensorflow.storage_options()
    first = upload(str(photos), dst, storage_options=options)
    assert (first.files, first.copied, first.skipped) == (450, 450, 0)
    assert first.in_flight > START_IN_FLIGHT  # the window grew: the latency, not the CPU, bound it
    assert listing(tensorflow, f"{upload_dir}/resume") == sources(photos)  # and no temporary file left
    # an interruption: two files missing, one cut short, a stray temporary file
    fs, _ = storage.url_to_fs(dst, options)
    for rel in ("Red Circles/img_007.jpg", "green-stripes/img_149.jpg"):
        fs.rm_file(f"{upload_dir}/resume/{rel}")
    storage.write_atomic(f"{dst}/blue_squares/img_010.jpg", b"cut", options)
    storage.write_atomic(f"{dst}/blue_squares/{storage.TEMP_PREFIX}x_img_011.jpg", b"partial", options)
    again = upload(str(photos), dst, storage_options=options, threads=16)
    assert (again.copied, again.skipped, again.in_flight) == (3, 447, 3)
    for rel in ("Red Circles/img_007.jpg", "blue_squares/img_010.jpg"):
        assert storage.read_bytes(f"{dst}/{rel}", options) == (photos / rel).read_bytes()
    assert upload(str(photos), dst, storage_options=options).copied == 0


def test_a_killed_upload_leaves_only_whole_files_and_a_re_run_completes_it(
    secure_hdfs, photos, upload_dir, tensorflow
):
    folder = f"{upload_dir}/killed"
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    argv = [sys.executable, "-m", "lastlayer", "upload", str(photos), f"hdfs://{folder}"]
    proc = subprocess.Popen(
        [*argv, *principal_flags(secure_hdfs, "tensorflow")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fs, _ = storage.url_to_fs(f"hdfs://{folder}", tensorflow.storage_options())
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if fs.exists(folder) and len(visible(listing(tensorflow, folder))) >= 10:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    whole, want = visible(listing(tensorflow, folder)), sources(photos)
    assert 10 <= len(whole) < len(want)  # killed in the middle ...
    assert all(want[rel] == size for rel, size in whole.items())  # ... and every visible file is whole
    report = upload(str(photos), f"hdfs://{folder}", storage_options=tensorflow.storage_options())
    assert (report.copied, report.skipped) == (len(want) - len(whole), len(whole))
    assert visible(listing(tensorflow, folder)) == want


def test_a_refused_upload_says_so_in_hadoop_s_words(photos, upload_dir, tensorflow):
    with pytest.raises(StorageError, match=r"Permission denied: user=tensorflow, access=WRITE"):
        upload(str(photos), "hdfs:///not-tensorflows/photos", storage_options=tensorflow.storage_options())
