"""The `icae` command: a thin dispatcher to one recipe module per subcommand.

Each recipe exposes `main(argv: list[str]) -> int | None`. Problems the user can fix raise
`UserError`, printed here as one line (the traceback only with `--debug`); so is a write that finds
the disk full, wherever it happens. The exit statuses are the constants in icae/errors.py.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

# OpenMP threads that wait by spinning turn a core another process needs into a 10x slowdown of our
# token-by-token decoding (950 against 84 ms per token on 2 cores beside a busy process); waiting passively
# costs nothing measurable (benchmarks/results/bf16-cpu.md). Read when torch loads, so set before it does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from icae.errors import EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_USER_ERROR, Preempted, UserError, disk_full_reason
from icae.core.quiet import quiet, verbose_requested

_PACKAGE = Path(__file__).resolve().parent
_default_formatwarning = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (bad UTF-8 replaced, texts skipped) as one `warning: ...` line, like errors."""
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        ours = False
    if ours and issubclass(category, UserWarning):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)

COMMANDS = {
    "pretrain": ("icae.recipes.pretrain", "train an in-context autoencoder (ICAE v2 pretraining)"),
    "finetune": ("icae.recipes.finetune", "instruction fine-tuning: answer prompts about compressed contexts"),
    "prepare": ("icae.recipes.prepare", "build train/eval JSON files from a dataset or local files (also PwC)"),
    "eval": ("icae.recipes.evaluate", "evaluate a checkpoint: AE/LM loss, BLEU, perplexities; QA (--task qa)"),
    "compress": ("icae.recipes.use", "compress text into memory slots (safetensors)"),
    "reconstruct": ("icae.recipes.use", "reconstruct text from memory slots"),
    "generate": ("icae.recipes.use", "continue text from memory slots, or answer --prompt about it"),
    "layout": ("icae.recipes.layout", "print the position ids a layout assigns, as JSON"),
    "ablate": ("icae.recipes.ablate", "run the seed's ablation grid"),
    "report": ("icae.recipes.report", "plot and tabulate finished runs"),
    "export": ("icae.recipes.export", "a smaller copy of a checkpoint (float16, no tokenizer) to share or ship"),
    "demo": ("icae.recipes.demo", "short pretraining + evaluation on the embedded model and corpus"),
}


def _close_progress_bars() -> None:
    """End any progress bar a failing step left open, so that the error starts its own line."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def usage() -> str:
    lines = ["usage: icae COMMAND [flags...]   (icae COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "global flags: --debug    show full tracebacks (and all that --verbose shows)",
              "              --verbose  show dependencies' warnings, log lines and loading bars (or ICAE_VERBOSE=1)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    verbose = "--verbose" in argv
    if verbose:
        argv.remove("--verbose")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    previous = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _formatwarning
    try:
        with quiet(enabled=not (debug or verbose or verbose_requested())):  # icae/core/quiet.py
            _run(command, rest, debug)
    finally:
        warnings.formatwarning = previous  # for callers that run main() in-process


def _run(command: str, rest: list[str], debug: bool) -> None:
    module = importlib.import_module(COMMANDS[command][0])
    try:
        entry = getattr(module, "main")
        code = entry(rest, command=command) if command in ("compress", "reconstruct", "generate") else entry(rest)
    except UserError as err:
        if debug:
            raise
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Preempted as err:  # not a failure: a complete checkpoint was written, rerunning resumes
        _close_progress_bars()
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        reason = disk_full_reason(err)
        if reason is None or debug:
            raise
        _close_progress_bars()
        where = f" while writing {err.filename}" if isinstance(err, OSError) and err.filename else ""
        print(f"error: the disk is full ({reason}){where}: free space, then rerun", file=sys.stderr)
        sys.exit(EXIT_DISK_FULL)
    sys.exit(code or 0)
