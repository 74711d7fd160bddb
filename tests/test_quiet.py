"""Quiet by default (issue 31, section 4): a command prints icae's own lines, not its dependencies' warnings,
log lines and loading bars; --verbose (or ICAE_VERBOSE=1) shows them; errors are one line, --debug adds the
traceback. Run as a user would: the real CLI in a subprocess, on a tiny checkpoint."""

import os
import subprocess
import sys

import pytest

from icae.core.config import ICAEConfig
from icae.core.model import ICAE
from icae.testing import byte_tokenizer, save_tiny_model, tiny_base_model

NOISE = ("Warning", "Loading weights", "forward_call", "deprecated")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    base = save_tiny_model(root / "tiny")
    config = ICAEConfig(model_name_or_path=base, fixed_mem_size=4, mean_compression_rate=4, lora_r=4)
    ICAE(config, base_model=tiny_base_model(), tokenizer=byte_tokenizer()).save_pretrained(root / "ckpt")
    (root / "context.txt").write_text("a short text to compress and reconstruct")
    return root


def icae(*argv, env=None):
    inherited = {k: v for k, v in os.environ.items() if k != "ICAE_VERBOSE"}  # the caller's own setting aside
    env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "icae", *argv], capture_output=True, text=True, env=env)


def reconstruct(root, *extra, env=None):
    return icae("reconstruct", "--checkpoint", str(root / "ckpt"), "--context", str(root / "context.txt"),
                "--max_new_tokens", "3", "--device", "cpu", "--dtype", "float32", *extra, env=env)


def test_a_command_prints_only_its_own_lines_unless_verbose(checkpoint):
    quiet = reconstruct(checkpoint, env={"ICAE_VERBOSE": "0"})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip()  # the reconstruction
    assert not [word for word in NOISE if word in quiet.stderr], quiet.stderr
    verbose = reconstruct(checkpoint, "--verbose")
    assert verbose.returncode == 0 and verbose.stdout == quiet.stdout
    assert "Loading weights" in verbose.stderr  # what quiet hides is really there


def test_errors_are_one_line_and_debug_shows_the_traceback(checkpoint):
    missing = str(checkpoint / "no_such_checkpoint")
    proc = icae("reconstruct", "--checkpoint", missing, "--context", str(checkpoint / "context.txt"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    proc = icae("reconstruct", "--checkpoint", missing, "--context", str(checkpoint / "context.txt"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_icae_verbose_is_read_from_the_environment(monkeypatch):
    from icae.core.quiet import verbose_requested

    for value, expected in [("1", True), ("yes", True), ("0", False), ("", False)]:
        monkeypatch.setenv("ICAE_VERBOSE", value)
        assert verbose_requested() is expected
    monkeypatch.delenv("ICAE_VERBOSE")
    assert verbose_requested() is False
