"""One task of a job, in a fresh process: import the job module and call ``main(server, log_dir, context)``.

Started by the service as ``python -m lastlayer.jobs.task`` with the task's description in the
``LASTLAYER_TASK`` environment variable (JSON: cluster, role, index, module folder and name, log_dir,
context, log level).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lastlayer.errors import LastlayerError

TASK_ENV = "LASTLAYER_TASK"
#: Exit code of a task whose job module or ``main`` cannot be found.
EXIT_BAD_JOB = 3


@dataclass(frozen=True)
class Server:
    """What a job's ``main`` gets as ``server``, after tf.train.Server's attributes.

    Attributes:
        cluster: role to task addresses, e.g. ``{"worker": ["127.0.0.1:4001", ...], "ps": [...]}``.
        job_name: this task's role (``worker``, ``ps`` or ``gpuworker``).
        task_index: this task's index within its role.
        target: ``grpc://<this task's address>``.
    """

    cluster: dict[str, list[str]]
    job_name: str
    task_index: int
    target: str

    @property
    def task_name(self) -> str:
        """``worker-0`` style name."""
        return f"{self.job_name}-{self.task_index}"


def _contents(folder: Path) -> str:
    names = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
    )
    return ", ".join(names[:30]) or "no Python modules"


def _load_main(module_dir: Path, name: str) -> Any:
    """The job module's ``main``; exits with a message listing what the archive holds when missing."""
    sys.path.insert(0, str(module_dir))
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        print(
            f"lastlayer: error: job module {name!r} not found in {module_dir} (service.job_path); "
            f"it holds: {_contents(module_dir)}",
            file=sys.stderr,
        )
        sys.exit(EXIT_BAD_JOB)
    main = getattr(module, "main", None)
    if not callable(main):
        public = [n for n in dir(module) if not n.startswith("_")]
        print(
            f"lastlayer: error: job module {name!r} has no main(server, log_dir, context); "
            f"it defines: {', '.join(public) or 'nothing'}",
            file=sys.stderr,
        )
        sys.exit(EXIT_BAD_JOB)
    return main


def run() -> int:
    """Run the task described by ``LASTLAYER_TASK``; return the exit code."""
    spec = json.loads(os.environ[TASK_ENV])
    logging.basicConfig(
        level=getattr(logging, spec.get("log_level", "INFO").upper(), logging.INFO),
        format="%(levelname)s:%(name)s:%(message)s",
        stream=sys.stderr,
    )
    server = Server(
        {k: list(v) for k, v in spec["cluster"].items()},
        spec["role"],
        int(spec["index"]),
        f"grpc://{spec['cluster'][spec['role']][int(spec['index'])]}",
    )
    main = _load_main(Path(spec["module_dir"]), spec["module"])
    logging.getLogger(__name__).info(
        "Task %s: running %s.main (log_dir %s)", server.task_name, spec["module"], spec["log_dir"]
    )
    try:
        result = main(server, spec["log_dir"], spec["context"])
    except LastlayerError as exc:
        print(f"lastlayer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(run())
