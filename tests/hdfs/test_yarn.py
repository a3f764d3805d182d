"""The harness's secure MiniYARNCluster: its ResourceManager answers Kerberos clients, on RPC and on its
SPNEGO web endpoint, and refuses clients without a ticket."""

from __future__ import annotations

import os
import subprocess

import pytest
import requests
from requests_kerberos import OPTIONAL, HTTPKerberosAuth

pytestmark = [pytest.mark.yarn]

CLI_TIMEOUT_S = 120


def node_list(cluster, securehdfs, user: str | None) -> subprocess.CompletedProcess[str]:
    """Hadoop's ``yarn node -list`` (NodeCLI from the harness's jars) as ``user`` (None: no ticket),
    giving up on the ResourceManager after 2 s instead of Hadoop's 15 minutes."""
    env = {**os.environ, **cluster.env(user)}
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
    return subprocess.run(
        [java, f"-Djava.security.krb5.conf={cluster.krb5_conf}",
         "-cp", f"{cluster.conf_dir}:{securehdfs.HARNESS_LIB}/*", "org.apache.hadoop.yarn.client.cli.NodeCLI",
         "-Dyarn.resourcemanager.connect.max-wait.ms=2000",
         "-Dyarn.resourcemanager.connect.retry-interval.ms=500", "-list"],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip


def test_the_resource_manager_answers_with_kerberos_and_refuses_without(secure_yarn, securehdfs, monkeypatch):
    with_ticket = node_list(secure_yarn, securehdfs, "tensorflow")
    assert with_ticket.returncode == 0, with_ticket.stderr[-3000:]
    assert "Total Nodes:2" in with_ticket.stdout
    assert with_ticket.stdout.count("RUNNING") == 2
    without = node_list(secure_yarn, securehdfs, None)
    assert without.returncode != 0
    assert "Client cannot authenticate via:[TOKEN, KERBEROS]" in without.stderr

    url = f"{secure_yarn.rm_web_url}/ws/v1/cluster/info"
    assert requests.get(url, timeout=30).status_code == 401  # SPNEGO: no anonymous access
    for key, value in secure_yarn.env("tensorflow").items():
        monkeypatch.setenv(key, value)
    answer = requests.get(url, auth=HTTPKerberosAuth(mutual_authentication=OPTIONAL), timeout=30)
    assert answer.status_code == 200, answer.text[:2000]
    assert answer.json()["clusterInfo"]["state"] == "STARTED"
    assert (secure_yarn.conf_dir / "yarn-site.xml").is_file()
