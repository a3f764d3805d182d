"""What this machine can give a job's tasks, checked at deploy before anything starts.

The supervisor runs every task of a job on this machine and holds each to its ``mem`` (see
:mod:`lastlayer.jobs.supervisor`), so a job whose tasks ask for more memory in all than the machine
has cannot run: it is refused in one line naming the options, instead of a plan of tasks that fail
one by one. CPUs are not checked: the supervisor pins a task to at most the cores there are (the
walkthrough's ``worker.cpus`` of 4 runs on 2).
"""

from __future__ import annotations

import os

from lastlayer.errors import UsageError
from lastlayer.jobs.plan import PHASES
from lastlayer.jobs.spec import JobSpec

_MIB = 1 << 20


def memory_mib() -> float:
    """This machine's physical memory, MiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _MIB


def check(spec: JobSpec, memory_mib: float) -> None:
    """Refuse ``spec`` when its tasks ask for more than ``memory_mib`` in all (``count x mem``).

    Raises:
        UsageError: naming the options to lower.
    """
    asked = {group: getattr(spec, group) for _, group, _ in PHASES if getattr(spec, group).count > 0}
    need = sum(tasks.count * tasks.mem for tasks in asked.values())
    if need > memory_mib:
        given = " + ".join(f"{group}.count x {group}.mem" for group in asked)
        raise UsageError(
            f"the tasks ask for {need:,.0f} MiB of memory ({given}) but this machine has "
            f"{memory_mib:,.0f} MiB: lower the counts or mem"
        )
