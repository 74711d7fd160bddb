"""Faults a cluster user meets, handled alike by every training recipe.

- Preemption: schedulers send SIGTERM (SLURM's `--signal` also SIGUSR1) and kill a while later.
  `StopOnSignal` turns those and a first Ctrl-C into "stop after this optimizer step with a complete
  checkpoint"; all ranks agree on the step, so one checkpoint is written, not two half ones. A second
  Ctrl-C stops at once.
- A second launch into the same output_dir: `OutputDirLock` refuses it while the first run lives,
  and takes over the lock of a run that is gone.
- A full disk while saving: `disk_full_reason` tells a write that ran out of space from other
  failures, also where torch.save hides the errno.

The exit statuses these end with are in icae/errors.py.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from icae.errors import UserError
from icae.errors import disk_full_reason as _reason_from_error

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
LOCK_NAME = ".icae.lock"
LOW_SPACE_BYTES = 1 << 20  # a failed write with less than this left on its disk is taken as "disk full"

# ----------------------------------------------------------------------------- preemption


class StopOnSignal(TrainerCallback):
    """SIGTERM, SIGUSR1 or a first Ctrl-C: finish the optimizer step, save a checkpoint, stop training.

    The signal handler only records the request; the callback acts on it at the end of the step, after
    every rank has said whether it got one (a launcher signals its workers one after another), so all
    ranks save the same step. `stopped_at` is then the step saved; the trainer turns it into `Preempted`.
    """

    def __init__(self):
        self.signal_name: str | None = None  # the first stop signal this process received
        self.stopped_at: int | None = None

    @contextmanager
    def installed(self):
        """The handlers, for the duration of the block (signals can only be handled in the main thread)."""
        self.signal_name = self.stopped_at = None
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # Ctrl-C once more: stop at once, without a checkpoint
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            # os.write, not print: a handler may run in the middle of another write to stderr
            os.write(2, f"\nnote: {self.signal_name} received: stopping after this training step with a "
                        f"checkpoint (Ctrl-C again stops at once, without one)\n".encode())

    def on_step_end(self, args, state, control, **kwargs):
        if _on_any_rank(self.signal_name is not None, args.device):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the grace period is short: this step's evaluation is skipped
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # saved already at the step end: no second save or eval of the same step
            control.should_save = False
            control.should_evaluate = False
        return control


def _on_any_rank(flag: bool, device) -> bool:
    """`flag` or-ed over all ranks (every rank calls this at the same step), so they stop together."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ----------------------------------------------------------------------------- one run per output_dir


class OutputDirLock:
    """`output_dir/.icae.lock`: held (flock) by the run writing there, naming it (pid, host, start, command).

    The kernel releases a flock when its process dies, however it dies, so a lock left by a killed run
    is taken over (with a note) and a live one refuses the new run. On file systems without flock
    (some Lustre mounts) the pid decides instead: a holder on this host whose pid is gone is stale.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def check(self) -> None:
        """Refuse at once if a live run holds the lock; writes nothing (for the checks before a run starts)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            got = _flock(fd, fcntl.LOCK_SH)
            holder = _read_holder(fd)
            if got is False or (got is None and _maybe_alive(holder)):
                raise UserError(self._busy(holder))
        finally:
            os.close(fd)

    def acquire(self) -> OutputDirLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            got = _flock(fd, fcntl.LOCK_EX)
            holder = _read_holder(fd)
            if got and not _names(self.path, fd):  # its holder released and removed it meanwhile: again
                os.close(fd)
                continue
            if got is False and attempt < 5:  # perhaps another launch's `check` for an instant
                os.close(fd)
                time.sleep(0.1)
                continue
            if got is False or (got is None and _maybe_alive(holder)):
                os.close(fd)
                raise UserError(self._busy(holder))
            break
        else:
            raise UserError(self._busy(None))
        if holder:
            print(f"note: taking over {self.path} from {_describe(holder)}, which is no longer running",
                  file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _names(self.path, self._fd):
                self.path.unlink()  # before the unlock: a waiting run then finds a new file, not this one
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, holder: dict | None) -> str:
        return (f"output_dir {self.folder} is in use by another run ({_describe(holder)}): wait for it to end "
                "or stop it (SIGTERM saves a checkpoint), or choose another --output_dir")


_held: dict[Path, OutputDirLock] = {}  # the output_dirs this process's runs hold


def check_output_dir(folder: str | Path) -> None:
    """Refuse at once when another live run holds `folder` (this process's own lock is no obstacle)."""
    if Path(folder).resolve() not in _held:
        OutputDirLock(folder).check()


def hold_output_dir(folder: str | Path) -> None:
    """Lock `folder` for this run, until `release_output_dir` or the end of the process. A later run in
    the same process (after one that failed before releasing) keeps the lock instead of refusing itself."""
    key = Path(folder).resolve()
    if key not in _held:
        _held[key] = OutputDirLock(folder).acquire()


def release_output_dir(folder: str | Path) -> None:
    lock = _held.pop(Path(folder).resolve(), None)
    if lock is not None:
        lock.release()


@atexit.register
def _release_all() -> None:  # the kernel drops the flocks anyway; this removes the files
    for key in list(_held):
        release_output_dir(key)


def _flock(fd: int, operation: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still is the file open as `fd`."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _maybe_alive(holder: dict | None) -> bool:
    """Without flock: is the holder possibly alive? Only a pid on this host can be checked."""
    if not holder or holder.get("pid") == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not yet said which"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


# ----------------------------------------------------------------------------- full disk


def disk_full_reason(err: BaseException, path: str | Path | None = None) -> str | None:
    """Why a failed write failed for want of space, or None when it did not.

    torch.save reports a full disk as a short write ("unexpected pos"), without the errno, so a failed
    write that leaves less than LOW_SPACE_BYTES free on `path`'s file system counts too.
    """
    reason = _reason_from_error(err)
    if reason is not None or path is None:
        return reason
    free = free_bytes(path)
    if free is not None and free < LOW_SPACE_BYTES:
        return f"{os.strerror(errno.ENOSPC)}: {free:,} bytes free"
    return None


def free_bytes(path: str | Path) -> int | None:
    """Space left to this user on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
