"""One task of a job, in a fresh process: import the job module and call ``main(server, log_dir, context)``.

The supervisor starts ``python -m lastlayer.jobs.task`` with a :class:`TaskDescription` as JSON in the
``LASTLAYER_TASK`` environment variable. Before the tasks start, preparation asks the job module how
its workers should run with ``python -m lastlayer.jobs.task --executors FD`` (same description; the
answer goes to the open file descriptor FD): a job module may define ``executors(context) -> str |
None``; ``"spark"`` makes the workers Spark executors driven by worker-0, ``None`` (or no such
function) keeps one process per worker; the module is imported once more for that question, so
importing it and answering should be quick and free of side effects. ``--tensorboard`` runs
TensorBoard on the description's ``log_dir`` (``service.use_tensorboard``). Each mode first becomes
``service.user`` when that is another user (:func:`lastlayer.jobs.user.become`), before any job code
is imported. This module is the task's edge: it configures logging, sets ``HOME`` and prints its own
errors.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from lastlayer.errors import LastlayerError
from lastlayer.fetch import one_line
from lastlayer.jobs.user import become, run_as

TASK_ENV = "LASTLAYER_TASK"
#: Exit code of a task whose job module or ``main`` cannot be found, or whose description is wrong.
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


@dataclass(frozen=True)
class TaskDescription:
    """Everything one task process is told by its supervisor.

    Attributes:
        cluster: role to task addresses (``host:port``) of every task of the job.
        role: this task's role (``worker``, ``ps``, ``gpuworker``).
        index: this task's index within its role.
        module_dir: the folder put first on ``sys.path`` (the archive's ``service.job_path``).
        module: the job module's name (``service.job_name``).
        log_dir: the job's shared folder (``service.shared_filesystem``) or its persistent folder.
        context: ``service.job_context``, parsed.
        log_level: ``service.log_level``.
        user: ``service.user``: the account the task becomes before it imports the job's code
            (``""``: the supervisor's own).
        cores: the CPUs the task keeps to (its affinity, set first; empty: all).
    """

    cluster: dict[str, list[str]]
    role: str
    index: int
    module_dir: str
    module: str
    log_dir: str
    context: dict[str, Any]
    log_level: str = "INFO"
    user: str = ""
    cores: list[int] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        """The description as JSON (:meth:`from_json` reads it back)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TaskDescription:
        """Parse :meth:`to_json`. Raises ValueError naming what is missing, unknown or of a wrong type."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a task description is a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
            raise ValueError(
                f"task description: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}"
            )
        cluster = data["cluster"]
        checks = {
            "cluster": isinstance(cluster, dict)
            and all(isinstance(a, list) and all(isinstance(x, str) for x in a) for a in cluster.values()),
            "index": isinstance(data["index"], int) and not isinstance(data["index"], bool),
            "context": isinstance(data["context"], dict),
            "cores": isinstance(data["cores"], list)
            and all(isinstance(c, int) and not isinstance(c, bool) for c in data["cores"]),
        }
        checks.update(
            {
                n: isinstance(data[n], str)
                for n in ("role", "module_dir", "module", "log_dir", "log_level", "user")
            }
        )
        wrong = sorted(name for name, ok in checks.items() if not ok)
        if wrong:
            raise ValueError(f"task description: wrong type of {', '.join(wrong)}")
        return cls(**data)

    def server(self) -> Server:
        """The ``server`` handed to the job's ``main`` (KeyError/IndexError when not in ``cluster``)."""
        address = self.cluster[self.role][self.index]
        return Server(
            {k: list(v) for k, v in self.cluster.items()}, self.role, self.index, f"grpc://{address}"
        )


def _fail(message: str) -> NoReturn:
    print(f"lastlayer: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_JOB)


def _description() -> TaskDescription:
    """The description in ``LASTLAYER_TASK``; exits with a message when it is absent or wrong."""
    text = os.environ.get(TASK_ENV)
    if text is None:
        _fail(f"{TASK_ENV} is not set: tasks are started by the job service (`lastlayer job deploy`)")
    try:
        return TaskDescription.from_json(text)
    except ValueError as exc:
        _fail(f"{TASK_ENV} is not a task description: {one_line(exc)}")


def _become(task: TaskDescription) -> None:
    """Become ``task.user`` (groups, gid, uid, then ``HOME``, ``USER``, ``LOGNAME``) when it is not
    this process's user; exits with a message when that fails, before any job code is imported."""
    try:
        account = run_as(task.user)
        if account is None:
            return
        become(account)
    except (LastlayerError, OSError) as exc:
        _fail(f"cannot run the task as service.user {task.user!r}: {one_line(exc)}")
    os.environ.update(HOME=account.home, USER=account.name, LOGNAME=account.name)


def _contents(folder: Path) -> str:
    names = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
    )
    return ", ".join(names[:30]) or "no Python modules"


def _load_module(module_dir: Path, name: str) -> ModuleType:
    """The job module; exits with a message listing what the archive holds when it is missing."""
    sys.path.insert(0, str(module_dir))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        _fail(
            f"job module {name!r} not found in {module_dir} (service.job_path); "
            f"it holds: {_contents(module_dir)}"
        )


def _load_main(module: ModuleType) -> Any:
    """The job module's ``main``; exits with a message listing what the module defines when missing."""
    main = getattr(module, "main", None)
    if not callable(main):
        public = [n for n in dir(module) if not n.startswith("_")]
        _fail(
            f"job module {module.__name__!r} has no main(server, log_dir, context); "
            f"it defines: {', '.join(public) or 'nothing'}"
        )
    return main


def run() -> int:
    """Run the task described by ``LASTLAYER_TASK``; return the exit code."""
    task = _description()
    logging.basicConfig(
        level=getattr(logging, task.log_level.upper(), logging.INFO),
        format="%(levelname)s:%(name)s:%(message)s",
        stream=sys.stderr,
    )
    server = task.server()
    if task.cores:
        os.sched_setaffinity(0, task.cores)  # before any thread starts, so every pool follows
    _become(task)
    main = _load_main(_load_module(Path(task.module_dir), task.module))
    logging.getLogger(__name__).info(
        "Task %s: running %s.main (log_dir %s)", server.task_name, task.module, task.log_dir
    )
    try:
        result = main(server, task.log_dir, task.context)
    except LastlayerError as exc:
        print(f"lastlayer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        return 1
    return result if isinstance(result, int) else 0


def answer_executors(answer: int) -> int:
    """Write ``{"executors": <the job module's executors(context), or null>}`` to the file
    descriptor ``answer`` (opened by the asker, so the task's user need not reach its folder), or
    ``{"error": "..."}`` when that function fails; nothing when the module cannot be loaded."""
    task = _description()
    _become(task)
    module = _load_module(Path(task.module_dir), task.module)
    ask = getattr(module, "executors", None)
    try:
        result: dict[str, Any] = {"executors": ask(task.context) if callable(ask) else None}
        json.dumps(result)
    except Exception as exc:
        result = {"error": f"{exc.__class__.__name__}: {one_line(exc)}"}
    with os.fdopen(answer, "wb") as out:  # one write; the asker reads it once this process ended
        out.write(json.dumps(result).encode())
    return 0


def tensorboard() -> int:
    """Run TensorBoard on the task's ``log_dir``, on 127.0.0.1 and a free port, as ``user``."""
    task = _description()
    from tensorboard import main as tensorboard_main  # the test extra; the supervisor checked it

    _become(task)  # after importing TensorBoard (no job code), so its files need not be the user's

    sys.argv = ["tensorboard", "--logdir", task.log_dir, "--host", "127.0.0.1", "--port", "0"]
    tensorboard_main.run_main()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--executors"] and len(sys.argv) == 3 and sys.argv[2].isdigit():
        sys.exit(answer_executors(int(sys.argv[2])))
    if sys.argv[1:] == ["--tensorboard"]:
        sys.exit(tensorboard())
    sys.exit(run())
