"""Quiet by default: a command prints icae's own lines and progress bars, not its dependencies' chatter.

Hidden unless `--verbose` (or ICAE_VERBOSE=1, or `--debug`): warnings raised outside icae (FutureWarnings
from transformers and PEFT, each with a `return forward_call(...)` source line), transformers' and
datasets' log lines, and transformers' own bars ("Loading weights", "Writing model shards"). Download
bars from the hub stay: a long download is progress the user waits for. icae's own warnings are kept,
as one `warning: ...` line (icae/cli.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # icae/
# read by transformers and datasets when imported (also in worker processes, which inherit them)
_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DATASETS_VERBOSITY": "error"}
_active: list[list] = []  # while quiet: undo actions of the libraries quieted so far


def verbose_requested() -> bool:
    return os.environ.get("ICAE_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


def is_ours(filename: str) -> bool:
    """Whether a warning was raised in icae's own code."""
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Hide dependencies' warnings, log lines and loading bars for the duration; restore everything after
    (for callers that run the CLI in-process)."""
    if not enabled:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in _ENV}
    for name, value in _ENV.items():
        os.environ.setdefault(name, value)  # a user's own setting wins
    show = warnings.showwarning

    def show_ours(message, category, filename, lineno, file=None, line=None):
        if is_ours(filename):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_ours
    # HF's TrainingArguments turn the training progress bars off when their logger is above WARNING:
    # keep that one logger at WARNING (set before transformers is imported, which leaves it alone)
    args_logger = logging.getLogger("transformers.training_args")
    args_level = args_logger.level
    args_logger.setLevel(logging.WARNING)
    undo: list = []
    _active.append(undo)
    try:
        quiet_loaded_libraries()
        yield
    finally:
        _active.remove(undo)
        for action in reversed(undo):
            action()
        warnings.showwarning = show
        args_logger.setLevel(args_level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def quiet_loaded_libraries() -> None:
    """Inside `quiet`: silence transformers and datasets if they are imported by now (their import reads
    the environment; this covers an import that happened earlier). Called where models load, so that a
    command importing transformers late is quieted too; outside `quiet` it does nothing."""
    if not _active:
        return
    undo = _active[-1]
    if "transformers" in sys.modules and not any(getattr(a, "lib", None) == "transformers" for a in undo):
        from huggingface_hub import utils as hub
        from transformers.utils import logging as hf_logging

        level, bars, hub_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), \
            not hub.are_progress_bars_disabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights"; it turns the hub's download bars off too:
        if hub_bars:
            hub.enable_progress_bars()

        def restore():
            hf_logging.set_verbosity(level)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            (hub.enable_progress_bars if hub_bars else hub.disable_progress_bars)()

        restore.lib = "transformers"
        undo.append(restore)
    if "datasets" in sys.modules and not any(getattr(a, "lib", None) == "datasets" for a in undo):
        from datasets.utils import logging as ds_logging

        level = ds_logging.get_verbosity()
        ds_logging.set_verbosity_error()

        def restore_datasets():
            ds_logging.set_verbosity(level)

        restore_datasets.lib = "datasets"
        undo.append(restore_datasets)
