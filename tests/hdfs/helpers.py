"""Helpers of the secure-HDFS tests: client identities, lastlayer as a harness user, superuser set-up."""

from __future__ import annotations

import os
import subprocess
import sys

#: Variables that carry a Kerberos or Hadoop client identity; tests clear them to start from nothing.
ENV_KEYS = ("KRB5CCNAME", "KRB5_CONFIG", "HADOOP_CONF_DIR")


def principal_flags(cluster, user: str) -> list[str]:
    """lastlayer's flags to log in as ``user`` of the harness from its keytab."""
    return [
        f"--principal={cluster.principal(user)}",
        f"--keytab={cluster.keytab(user)}",
        f"--krb5_conf={cluster.krb5_conf}",
        f"--hadoop_conf_dir={cluster.conf_dir}",
    ]


def lastlayer_as(cluster, user: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m lastlayer ARGV`` in a fresh process, logged in as ``user``, no ticket cache prepared."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    return subprocess.run(
        [sys.executable, "-m", "lastlayer", *argv, *principal_flags(cluster, user)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def as_superuser(cluster, code: str) -> None:
    """Run Python ``code`` with an hdfs-native ``fs`` as the `hdfs` superuser, in a fresh process."""
    env = {**os.environ, **cluster.env("hdfs")}
    prologue = (
        f"import fsspec\nfs = fsspec.filesystem('hdfs', host='127.0.0.1', port={cluster.namenode_port})\n"
    )
    subprocess.run([sys.executable, "-c", prologue + code], env=env, check=True, timeout=120)


def upload_for_tensorflow(cluster, photos, folder: str) -> subprocess.CompletedProcess[str]:
    """As the `hdfs` superuser: /tensorflow made and owned by tensorflow, then ``lastlayer upload`` of
    ``photos`` into ``folder`` (asserted to succeed); the upload's process."""
    as_superuser(
        cluster,
        "fs.makedirs('/tensorflow', exist_ok=True)\n"
        "fs.client.set_owner('/tensorflow', 'tensorflow', 'tensorflow')\n",
    )
    done = lastlayer_as(cluster, "hdfs", "upload", str(photos), f"hdfs://{folder}")
    assert done.returncode == 0, done.stderr
    return done
