"""The run folder (``--out``): made writable before any model loads, and locked while a run uses it.

Two runs writing one folder would interleave checkpoints, ``metrics.jsonl`` and the exported student, the later one
silently overwriting the other. :func:`hold_run_folder` holds an exclusive ``flock`` on ``OUT/.alambic.lock`` and
writes its process id, host and start time in it, so a second run stops at once and names the first one's process.
The kernel decides who holds the flock and frees it when its holder dies: a lock file created but not yet written
never reads as stale, and two runs taking over one stale lock cannot both win. A lock left by a killed run is taken
over, and the run says so. On a file system without flock the record alone guards the folder, as it did before.
Under torchrun only the main process (``RANK`` 0) holds the lock.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from alambic.environment import is_main_process
from alambic.errors import AlambicError

LOCK = ".alambic.lock"


def prepare_output_dir(out: Path, option: str = "--out") -> Path:
    """Create ``out`` (and its parents) and check that files can be written there; else one clear error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AlambicError(f"{option} {out} is a file; give a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise AlambicError(f"cannot write to {option} {out}: {reason}; choose a folder you can write to") from None
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _lock_file(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive ``flock``, or None while another process holds it. The
    kernel releases the flock when its holder dies, so a killed run's lock is free at once; and two processes taking
    over one stale lock cannot both get it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # a file system without flock (some network mounts): the record alone guards the folder
            return fd
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # its holder removed that file as it finished, between our open and our flock: try again


def _write_in_place(fd: int, text: str) -> None:
    """Overwrite then trim: a reader never finds the file empty (at worst, for an instant, the new record followed
    by the old one's tail, which reads as no record); whether the folder is held is the flock's answer anyway."""
    data = text.encode("utf-8")
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


@contextmanager
def hold_run_folder(out: Path, say=print):
    """Hold ``out``'s lock for the duration of the ``with`` block (see the module docstring); a folder this created
    and the run left empty (a run refused for bad input) is removed again."""
    created = not Path(out).exists()
    out = prepare_output_dir(out)
    if not is_main_process():
        yield out
        return
    path = out / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd = _lock_file(path)
    holder = _read_lock(path)
    pid, host = holder.get("pid"), holder.get("host")
    try:
        if fd is None or (isinstance(pid, int) and host == mine["host"] and pid != mine["pid"] and _alive(pid)):
            # held right now (or named by a live process of a run that does not flock)
            started = f", started {holder.get('started')}" if holder.get("started") else ""
            who = f"process {pid}{started}" if isinstance(pid, int) else "its record is being written"
            raise AlambicError(f"{out} is in use by another alambic run ({who}): wait for it to finish, stop it, or "
                               "give another --out")
        if isinstance(pid, int) and host not in (None, mine["host"]):
            raise AlambicError(f"{out} is locked by an alambic run on host {host} (process {pid}, started "
                               f"{holder.get('started')}); if that run is over, delete {path} and rerun")
        if holder:
            say(f"taking over the stale lock of {out} (process {pid} is no longer running)")
        _write_in_place(fd, json.dumps(mine))
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    try:
        yield out
    finally:
        path.unlink(missing_ok=True)  # before the flock goes: a run that opened this file meanwhile sees it gone
        os.close(fd)
        if created and not any(out.iterdir()):
            out.rmdir()


def locked_run(run_folder_of: Callable[[dict], Path]):
    """Decorate a verb so it runs holding its run folder's lock; ``run_folder_of`` maps the verb's bound arguments
    (by name) to the folder."""

    def decorate(verb):
        signature = inspect.signature(verb)

        @functools.wraps(verb)
        def run(*args, **kwargs):
            with hold_run_folder(Path(run_folder_of(signature.bind(*args, **kwargs).arguments))):
                return verb(*args, **kwargs)

        return run

    return decorate
