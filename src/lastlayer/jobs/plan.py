"""The deploy plan: phases of steps with live statuses, kept in ``plan.json`` and drawn as DC/OS does.

deploy (parallel strategy) (COMPLETE)
├─ gpuworker (parallel strategy) (COMPLETE)
├─ worker (parallel strategy) (COMPLETE)
│  └─ worker-0:[node] (COMPLETE)
└─ parameter-server (parallel strategy) (COMPLETE)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lastlayer.storage import write_private

PENDING, STARTING, RUNNING, COMPLETE, ERROR = "PENDING", "STARTING", "RUNNING", "COMPLETE", "ERROR"
#: (phase name, task group key in the options file, task name prefix)
PHASES = (
    ("gpuworker", "gpu_worker", "gpuworker"),
    ("worker", "worker", "worker"),
    ("parameter-server", "parameter_server", "ps"),
)


@dataclass
class Step:
    """One task of the plan.

    Attributes:
        name: task name, e.g. ``worker-0``.
        status: one of PENDING, STARTING, RUNNING, COMPLETE, ERROR.
        message: why it failed, or ``None``.
        exit_code: the task process's exit code once it ended.
        pid: the task process while it runs.
        restarts: how many times the step was restarted.
    """

    name: str
    status: str = PENDING
    message: str | None = None
    exit_code: int | None = None
    pid: int | None = None
    restarts: int = 0


@dataclass
class Phase:
    """A group of steps run in parallel."""

    name: str
    steps: list[Step] = field(default_factory=list)

    @property
    def status(self) -> str:
        """ERROR if a step failed, COMPLETE when all are (or there are none), else IN_PROGRESS/PENDING."""
        return _combine([s.status for s in self.steps])


def _combine(statuses: list[str]) -> str:
    if ERROR in statuses:
        return ERROR
    if all(s == COMPLETE for s in statuses):
        return COMPLETE
    if all(s == PENDING for s in statuses):
        return PENDING
    return "IN_PROGRESS"


@dataclass
class Plan:
    """The ``deploy`` plan of a job."""

    phases: list[Phase]
    name: str = "deploy"

    @property
    def status(self) -> str:
        """The plan's status from its phases'."""
        return _combine([p.status for p in self.phases])

    @property
    def steps(self) -> list[Step]:
        """Every step, in phase order."""
        return [s for p in self.phases for s in p.steps]

    def step(self, name: str) -> Step:
        """The step called ``name`` (KeyError when there is none)."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def render(self) -> str:
        """The plan as ``plan show`` prints it."""
        lines = [f"{self.name} (parallel strategy) ({self.status})"]
        for i, phase in enumerate(self.phases):
            last_phase = i == len(self.phases) - 1
            lines.append(f"{'└─' if last_phase else '├─'} {phase.name} (parallel strategy) ({phase.status})")
            for j, step in enumerate(phase.steps):
                branch = "└─" if j == len(phase.steps) - 1 else "├─"
                lines.append(f"{'   ' if last_phase else '│  '}{branch} {step.name}:[node] ({step.status})")
        return "\n".join(lines)

    def reasons(self) -> list[str]:
        """``"worker-0: why it failed"``, one line for each reason of the steps in ERROR; steps that
        failed alike share it: ``"worker-0 and 9 more steps: why they failed"``."""
        alike: dict[str, list[str]] = {}
        for step in self.steps:
            if step.status == ERROR:
                alike.setdefault(step.message or "failed", []).append(step.name)
        return [
            f"{names[0]}{f' and {len(names) - 1} more steps' if len(names) > 1 else ''}: {why}"
            for why, names in alike.items()
        ]

    def to_json(self) -> str:
        """JSON for ``plan.json``."""
        return json.dumps({"name": self.name, "phases": [asdict(p) for p in self.phases]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse :meth:`to_json`."""
        raw = json.loads(text)
        return cls([Phase(p["name"], [Step(**s) for s in p["steps"]]) for p in raw["phases"]], raw["name"])

    def save(self, path: Path) -> None:
        """Write atomically (a second shell may be reading it), owner-only."""
        write_private(path, self.to_json().encode())

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read ``plan.json``."""
        return cls.from_json(path.read_text())


def new_plan(counts: dict[str, int]) -> Plan:
    """A plan with ``counts[group]`` PENDING steps per phase (group keys as in the options file)."""
    return Plan(
        [
            Phase(name, [Step(f"{prefix}-{i}") for i in range(counts.get(group, 0))])
            for name, group, prefix in PHASES
        ]
    )
