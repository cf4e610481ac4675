"""A run's workdir: the lock held for the whole run, `config.json`, and one-line errors about the
directory itself.

Lock: `WORKDIR/.lock`, a POSIX advisory lock (`fcntl.lockf`, which also works on NFS v4 and Lustre)
taken by process 0 of a run for as long as it runs; the file names the holder (`host pid`). A second
launch on the same workdir is refused with `WorkdirError` naming that host and pid. The lock goes with
the process (also after SIGKILL), so a stale `.lock` file never blocks a new run.

`config.json` is written atomically (temporary file + rename), and by the runner only once the run
holds its state (a checkpoint restored, or the first one written), so a refused or failed start
leaves the saved config as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"


class WorkdirError(RuntimeError):
    """The workdir cannot be used (locked by another run, not a directory, not writable, unreadable files)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary file in the same directory, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_dir(workdir: Path) -> None:
    """Create `workdir` (and parents); one-line WorkdirError when it is a file or not writable."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists and is not a directory; choose another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir} is not writable; choose another --workdir or fix its permissions")


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir's lock (see the module docstring)."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WorkdirError(f"cannot open the lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown host and pid"
            os.close(fd)
            raise WorkdirError(
                f"workdir {self.path.parent} is in use by another run ({holder}); wait for it to end or use "
                "another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_json(path: Path, what: str) -> Any:
    """`json.loads` of a workdir file with a one-line WorkdirError naming it when it is garbled."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkdirError(f"{path} ({what}) is unreadable: {str(e).splitlines()[0]}") from None
