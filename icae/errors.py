"""The exceptions a command ends with, and the exit statuses they give (one place, documented in README).

A requeue script reads the status: 143 means "stopped on request with a checkpoint: rerun to resume",
28 "the disk is full: free space, then rerun", 2 "fix the command", 130 "stopped at once (Ctrl-C twice)".
"""

EXIT_USER_ERROR = 2  # a bad flag, file or model, or an output_dir another run is using
EXIT_DISK_FULL = 28  # the errno of ENOSPC: the disk or quota filled up while writing
EXIT_INTERRUPTED = 130  # a second Ctrl-C (or one outside training): stopped at once, no new checkpoint
EXIT_PREEMPTED = 143  # SIGTERM, SIGUSR1 or a first Ctrl-C: stopped after a step with a complete checkpoint


class UserError(Exception):
    """Bad input, a bad flag or a missing file: the message names the problem and the fix."""

    exit_code = EXIT_USER_ERROR


class DiskFull(UserError):
    """No space left (ENOSPC) or quota exceeded (EDQUOT) while writing: the message says where."""

    exit_code = EXIT_DISK_FULL


class Preempted(Exception):
    """Training stopped on request (a scheduler's SIGTERM/SIGUSR1, or Ctrl-C) after saving a complete
    checkpoint; the message says where. Not a failure: running the same command again resumes."""

    exit_code = EXIT_PREEMPTED


def disk_full_reason(err: BaseException) -> str | None:
    """'No space left on device' or 'Disk quota exceeded' when `err` (or what caused it) is a write that
    ran out of space, else None. Libraries that do not raise OSError (safetensors) still name the errno."""
    import errno
    import os

    codes = (errno.ENOSPC, errno.EDQUOT)
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in codes:
            return os.strerror(seen.errno)
        text = str(seen)
        for code in codes:
            if os.strerror(code) in text or f"os error {code})" in text:
                return os.strerror(code)
        seen = seen.__cause__ or seen.__context__
    return None


CHECKPOINT_FILES = ("icae_config.json", "icae_weights.safetensors")  # icae.core: CONFIG_NAME, WEIGHTS_NAME


def check_output_path(path, flag: str, folder: bool = False):
    """Refuse, before any expensive work, an output path that cannot be written: the file (`folder`:
    the folder) itself is of the other kind, a parent is a file, or the nearest existing folder does not
    take new files (a probe file is made there and removed). Returns the path. Nothing is created."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file to write")
    if path.is_file():
        if path.name in CHECKPOINT_FILES and (path.parent / CHECKPOINT_FILES[0]).is_file():
            raise UserError(f"{flag} {path} is a file of the checkpoint in {path.parent}; writing there would destroy "
                            f"the checkpoint: choose another {flag}")
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path} is not writable; choose another {flag}")
        return path
    nearest = path if folder else path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent  # (a path through a file does not "exist")
    if not nearest.is_dir():
        raise UserError(f"{flag} {path}: {nearest} is a file, not a folder; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(dir=nearest, prefix=".icae-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {nearest} ({err.strerror}); choose another {flag}") from None
    return path
