"""``service.user``: the account a job's tasks run as, as DC/OS runs them.

When the service runs as root and ``service.user`` names another account, each task process (and
TensorBoard) becomes that user (groups, gid, then uid) before it imports the job's code, and the
parts of the job's state folder a task must reach are handed to that user (:func:`hand_over`). An
unknown user, or another user asked of a service that does not run as root, is an error before
anything starts, and so is a state folder that user cannot reach.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from lastlayer.errors import UsageError


@dataclass(frozen=True)
class RunAs:
    """An account to become.

    Attributes:
        name: the user name (``service.user``).
        uid, gid: its user id and primary group id.
        groups: every group id it belongs to (primary included).
        home: its home folder (the tasks' ``HOME``).
    """

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def run_as(user: str) -> RunAs | None:
    """The account the tasks run as, or ``None`` when that is this process's own (``user`` empty, or
    the user this process runs as).

    Raises:
        UsageError: no such user, or another user while this process does not run as root.
    """
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(
            f"service.user: there is no user {user!r} on this machine; create it (useradd {user}) or "
            "name an existing user (leave service.user out to run the tasks as yourself)"
        ) from None
    if entry.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        me = _name_of(os.geteuid())
        raise UsageError(
            f"service.user is {user!r} but the service runs as {me!r}, not as root: only root can run "
            f"the tasks as another user; set service.user to {me!r} (or leave it out), or deploy as root"
        )
    groups = tuple(dict.fromkeys([entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)]))
    return RunAs(user, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def become(account: RunAs) -> None:
    """Make this process ``account`` for good (groups, then gid, then uid), and check that it is.

    Raises:
        PermissionError: the change did not take (never run job code then).
    """
    os.setgroups(list(account.groups))
    os.setgid(account.gid)
    os.setuid(account.uid)
    ids = (os.getuid(), os.geteuid(), os.getgid(), os.getegid())
    if ids != (account.uid, account.uid, account.gid, account.gid) or _can_regain_root():
        raise PermissionError(f"could not become user {account.name!r} (uid/euid/gid/egid are {ids})")


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except PermissionError:
        return False
    return True


def unreachable(path: Path, account: RunAs) -> Path | None:
    """The first folder from ``/`` down to ``path`` (included) that ``account`` cannot enter, judged
    from owner, group and other permission bits (no ACLs); ``None`` when every existing one lets it
    in (the missing ones are made by the deploy)."""
    current = Path("/")
    for part in (Path("/"), *path.absolute().parts[1:]):
        current = current / part
        try:
            info = current.stat()
        except FileNotFoundError:
            return None
        if info.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif info.st_gid in account.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return current
    return None


def check_reachable(folder: Path, account: RunAs) -> None:
    """The tasks, as ``account``, must reach the job's state folder.

    Raises:
        UsageError: naming the folder in the way and what to do.
    """
    blocked = unreachable(folder.parent, account)
    if blocked is not None:
        mode = stat.S_IMODE(blocked.stat().st_mode)
        raise UsageError(
            f"service.user {account.name!r} cannot enter {blocked} (mode {mode:04o}, owner "
            f"{_name_of(blocked.stat().st_uid)}), on the way to the job's state folder {folder}: deploy "
            "with a --state_dir that user can reach (e.g. under /var/lib or /srv), or let it in "
            f"(chmod o+x {blocked})"
        )


def python_unreachable(account: RunAs) -> Path | None:
    """The folder that keeps ``account`` from Python's standard library (e.g. an interpreter under
    ``/root``), or ``None``: the tasks import from it as that user."""
    return unreachable(Path(os.__file__).parent, account)


def hand_over(path: Path, account: RunAs) -> None:
    """Give ``path`` and everything under it to ``account`` (links themselves, never followed)."""
    os.lchown(path, account.uid, account.gid)
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(folder, name), account.uid, account.gid)


def let_through(folder: Path, account: RunAs) -> None:
    """Let ``account``'s group enter ``folder`` without listing or reading it (mode 0710)."""
    os.chown(folder, -1, account.gid)
    folder.chmod(0o710)


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class Mirror:
    """Copies, owned by another account, of the service's private files that the tasks read.

    The tasks' environment names files of the job's ``private/`` folder (credential cache,
    krb5.conf, Hadoop and Spark configuration), which only the service's user may read. For tasks
    running as another account, :meth:`env` copies each of them into ``target`` (0700, that
    account's) and names the copies instead; :meth:`refresh` copies again what changed since (a
    renewed ticket), each file replaced in one rename.
    """

    def __init__(self, source: Path, target: Path, account: RunAs) -> None:
        self.source, self.target, self.account = source, target, account
        self.copied: dict[Path, tuple[int, int, int]] = {}  # source file -> (inode, mtime ns, size)

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with every value naming a path under ``source`` (``FILE:`` caches too) renamed to
        its copy, copied now."""
        out: dict[str, str] = {}
        for key, value in env.items():
            prefix = "FILE:" if value.startswith("FILE:") else ""
            path = Path(value.removeprefix(prefix))
            if path.is_absolute() and path.is_relative_to(self.source) and path.exists():
                files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
                for file in files:
                    self._copy(file)
                value = prefix + str(self.target / path.relative_to(self.source))
            out[key] = value
        return out

    def refresh(self) -> None:
        """Copy again every mirrored file that changed."""
        for file, seen in list(self.copied.items()):
            if _signature(file) not in (seen, None):
                self._copy(file)

    def _copy(self, file: Path) -> None:
        dest = self.target / file.relative_to(self.source)
        missing: list[Path] = []
        folder = dest.parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir(mode=0o700)
            os.chown(folder, self.account.uid, self.account.gid)
        signature = _signature(file)
        tmp = dest.with_name(f".{dest.name}.new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(file.read_bytes())
            os.fchown(out.fileno(), self.account.uid, self.account.gid)
        os.replace(tmp, dest)
        if signature is not None:
            self.copied[file] = signature


def _signature(file: Path) -> tuple[int, int, int] | None:
    try:
        info = file.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size
