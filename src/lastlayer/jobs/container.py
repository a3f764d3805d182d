"""A job's task in a YARN container: publish this task's address, wait for its peers', run the task.

Run by each container of :mod:`lastlayer.jobs.yarn_spec` as ``python -m lastlayer.jobs.container``.
Skein names the container ``<role>_<n>`` (``SKEIN_CONTAINER_ID``), and that is its task (a restart's
container runs the ``n``-th index its role has in ``LASTLAYER_YARN_INDEXES``). The task publishes
``host:port`` (the NodeManager's host, a free port there) in the application's key-value store under
``address/<role>-<index>`` and waits up to :data:`PEERS_TIMEOUT_S` for every task the application
has (``LASTLAYER_YARN_PEERS``); then it completes its task's description (``LASTLAYER_YARN_TASK``)
with its index and ``server.cluster`` made of those addresses, and becomes the local scheduler's
task process (``python -m lastlayer.jobs.task``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping

from lastlayer.jobs.task import TASK_ENV, TaskDescription
from lastlayer.jobs.yarn_spec import ADDRESS_PREFIX, INDEXES_ENV, PEERS_ENV, TEMPLATE_ENV, decode

#: Longest wait for the other tasks' addresses, seconds.
PEERS_TIMEOUT_S = 600.0
#: How often the key-value store is read while waiting, seconds.
PEERS_POLL_S = 0.5
#: Exit code of a task whose peers did not all start in time.
EXIT_NO_PEERS = 3


def task_name(env: Mapping[str, str]) -> tuple[str, int]:
    """``(role, index)`` of this container's task: skein's ``<role>_<n>``, or in a restart the
    ``n``-th index of the role's tasks run again."""
    role, _, instance = env["SKEIN_CONTAINER_ID"].rpartition("_")
    if INDEXES_ENV in env:
        return role, int(decode(env[INDEXES_ENV])[role][int(instance)])
    return role, int(instance)


def cluster_of(addresses: Mapping[str, str], peers: Mapping[str, int]) -> dict[str, list[str]] | None:
    """Role -> the addresses of its tasks in index order, from the store's ``address/<role>-<i>``
    entries; ``None`` while one is missing."""
    cluster: dict[str, list[str]] = {}
    for role, count in peers.items():
        if count == 0:
            continue
        found = [addresses.get(f"{ADDRESS_PREFIX}{role}-{i}") for i in range(count)]
        if any(a is None for a in found):
            return None
        cluster[role] = [str(a) for a in found]
    return cluster


def free_address(host: str) -> str:
    """``host:port`` with a port free on this machine now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return f"{host}:{s.getsockname()[1]}"


def wait_for_peers(
    read: Callable[[], Mapping[str, str]], peers: Mapping[str, int], timeout: float
) -> dict[str, list[str]] | None:
    """The cluster once every peer has published its address (``read`` gives the store's entries);
    ``None`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        cluster = cluster_of(read(), peers)
        if cluster is not None or time.monotonic() > deadline:
            return cluster
        time.sleep(PEERS_POLL_S)


def main() -> int:
    """Publish, wait, then replace this process by the task (its exit code is the container's)."""
    import skein  # the container's packed Python has it (scripts/yarn_archives.py --job)

    env = dict(os.environ)
    role, index = task_name(env)
    peers = {str(k): int(v) for k, v in decode(env[PEERS_ENV]).items()}
    kv = skein.ApplicationClient.from_current().kv
    address = free_address(env.get("NM_HOST") or socket.gethostname())
    kv[f"{ADDRESS_PREFIX}{role}-{index}"] = address.encode()

    def read() -> dict[str, str]:
        return {k: v.decode() for k, v in kv.get_prefix(ADDRESS_PREFIX).items()}

    cluster = wait_for_peers(read, peers, PEERS_TIMEOUT_S)
    if cluster is None:
        print(
            f"lastlayer: error: not every task of the job started within {PEERS_TIMEOUT_S:.0f} s "
            "(their addresses are missing): the cluster has too little room for all of them",
            file=sys.stderr,
        )
        return EXIT_NO_PEERS
    print(f"lastlayer: task {role}-{index} at {address}; cluster {json.dumps(cluster)}", file=sys.stderr)
    template = TaskDescription.from_json(json.dumps(decode(env.pop(TEMPLATE_ENV))))
    env[TASK_ENV] = dataclasses.replace(template, cluster=cluster, role=role, index=index).to_json()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lastlayer.jobs.task"], env)


if __name__ == "__main__":
    sys.exit(main())
