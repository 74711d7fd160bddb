"""Faults a cluster user meets, end to end on a tiny model: preemption (SIGTERM, SIGUSR1, Ctrl-C; one
process and two under torchrun), a second launch into the same output_dir, a full disk while saving."""

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icae.errors import EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from icae.recipes.pretrain import main as pretrain
from icae.testing import save_tiny_model
from icae.training import faults
from icae.training.faults import LOCK_NAME, OutputDirLock, StopOnSignal
from icae.training.trainer import complete_checkpoints, incomplete_checkpoints, is_complete_checkpoint

ICAE = [sys.executable, "-m", "icae", "pretrain"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "icae", "pretrain"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_model(root / "tiny")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(40 + i)) + f" #{i}" for i in range(24)]
    (root / "train.json").write_text(json.dumps([{"text": t} for t in texts[4:]]))
    (root / "eval.json").write_text(json.dumps(texts[:4]))
    return root, model


def run_flags(workspace, out, extra=""):
    """The existing kill -9 test's run: 24 steps, dropout on, a checkpoint every 4 steps."""
    root, model = workspace
    return shlex.split(
        f"--output_dir {out} --model_name_or_path {model} --train_file {root}/train.json "
        f"--eval_file {root}/eval.json --lora_r 8 --report_to none --fixed_mem_size 8 --model_max_length 128 "
        "--lm_ratio 0.5 --min_tokens_for_lm 16 --max_steps 24 --save_steps 4 --logging_steps 4 --eval_strategy no "
        "--per_device_train_batch_size 2 --learning_rate 5e-3 --seed 11 --lora_dropout 0.05 --disable_tqdm True "
        + extra
    )


@pytest.fixture(scope="module")
def straight(workspace):
    """The uninterrupted run that interrupted ones must end equal to."""
    out = workspace[0] / "straight"
    assert pretrain(run_flags(workspace, out)) == 0
    return out


def _weights(path):
    return load_file(Path(path) / "icae_weights.safetensors")


def assert_same_weights(a, b, atol=1e-6):
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0)


def wait_for(condition, proc, what, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def logged_step(out, step):
    """A condition: metrics.jsonl has a record at `step` or later (training is under way)."""
    def condition():
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(json.loads(line)["step"] >= step for line in lines if line.endswith("}"))
    return condition


_started = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """A failing test must not leave a run training (or an ablation's run, a grandchild) on the CPUs."""
    yield
    while _started:
        try:
            os.killpg(_started.pop().pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(cmd, tmp_path, name):
    """A run in the background (in a process group of its own), its stdout and stderr going to files
    that the test can poll."""
    stdout, stderr = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, start_new_session=True)
    _started.append(proc)
    return proc


def read(tmp_path, name, stream="err"):
    return (tmp_path / f"{name}.{stream}").read_text()


# ----------------------------------------------------------------------------- preemption


def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_ends_like_a_straight_run(workspace, straight, tmp_path):
    out = tmp_path / "preempted"
    cmd = ICAE + run_flags(workspace, out, "--save_strategy no")  # no checkpoint but the one SIGTERM asks for
    proc = start(cmd, tmp_path, "run")
    wait_for(logged_step(out, 8), proc, "step 8")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == EXIT_PREEMPTED, read(tmp_path, "run")[-3000:]
    (checkpoint,) = complete_checkpoints(out)
    assert not incomplete_checkpoints(out)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert checkpoint.name == f"checkpoint-{step}" and 8 <= step < 24
    stderr = read(tmp_path, "run")
    assert f"stopped: SIGTERM after step {step} of 24: saved {checkpoint}; run the same command again" in stderr
    assert "Traceback" not in stderr and not (out / LOCK_NAME).exists()

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the same command resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resume: {checkpoint}" in proc.stdout
    assert_same_weights(straight, out)


def test_a_first_ctrl_c_also_saves_and_exits_143(workspace, tmp_path):
    out = tmp_path / "ctrl-c"
    proc = start(ICAE + run_flags(workspace, out, "--save_strategy no"), tmp_path, "run")
    wait_for(logged_step(out, 4), proc, "step 4")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == EXIT_PREEMPTED, read(tmp_path, "run")[-3000:]
    assert len(complete_checkpoints(out)) == 1 and not incomplete_checkpoints(out)
    assert "Ctrl-C again stops at once" in read(tmp_path, "run")


def test_a_second_ctrl_c_stops_at_once(workspace, tmp_path):
    out = tmp_path / "ctrl-c-twice"
    # long steps (64 micro-batches), so that the second Ctrl-C comes while the first one's step still runs
    proc = start(ICAE + run_flags(workspace, out, "--save_strategy no --gradient_accumulation_steps 64 "
                                  "--logging_steps 1"), tmp_path, "run")
    wait_for(logged_step(out, 1), proc, "step 1")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT received" in read(tmp_path, "run"), proc, "the note on the first Ctrl-C")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == EXIT_INTERRUPTED, read(tmp_path, "run")[-3000:]
    assert read(tmp_path, "run").rstrip().endswith("interrupted")
    assert not complete_checkpoints(out)
    assert not (out / LOCK_NAME).exists()


def test_sigusr1_requests_a_stop_and_handlers_are_restored_after_training():
    """SLURM's `--signal=USR1@60`: the same request as SIGTERM (in-process: no run needed)."""
    from transformers import TrainerControl, TrainerState

    stop = StopOnSignal()
    before = signal.getsignal(signal.SIGUSR1)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # let Python run the handler
    assert signal.getsignal(signal.SIGUSR1) is before
    assert stop.signal_name == "SIGUSR1"
    control, state = TrainerControl(), TrainerState()
    state.global_step = 5
    stop.on_step_end(type("Args", (), {"device": "cpu"})(), state, control)
    assert control.should_save and control.should_training_stop and stop.stopped_at == 5


def test_sigterm_to_torchrun_gives_one_checkpoint_that_both_ranks_resume_from(workspace, tmp_path):
    """Two gloo processes: torchrun forwards SIGTERM, the ranks agree on the step, rank 0 marks it complete."""
    root, model = workspace
    flags = shlex.split(f"--model_name_or_path {model} --train_file {root}/train.json --eval_file {root}/eval.json "
                        "--fixed_mem_size 8 --model_max_length 48 --lm_ratio 0 --max_steps 20 --logging_steps 1 "
                        "--lora_r 8 --lora_dropout 0 --learning_rate 1e-2 --save_strategy no --report_to none "
                        "--seed 3 --eval_strategy no --disable_tqdm True")
    one, two = tmp_path / "one-process", tmp_path / "two-processes"
    cmd = TORCHRUN + flags + ["--output_dir", str(two), "--per_device_train_batch_size", "1"]
    proc = start(cmd, tmp_path, "torchrun")
    wait_for(logged_step(two, 3), proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    stderr = read(tmp_path, "torchrun")
    (checkpoint,) = complete_checkpoints(two)
    assert not incomplete_checkpoints(two)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert stderr.count(f"stopped: SIGTERM after step {step} of 20") == 2, stderr[-3000:]  # one line per rank
    assert code == 1, stderr[-3000:]  # torchrun's own status when it was signalled (docs/FAULTS.md says so)

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resume: {checkpoint}" in proc.stdout
    assert pretrain(flags + ["--output_dir", str(one), "--per_device_train_batch_size", "2"]) == 0
    assert_same_weights(one, two, atol=1e-4)  # as in the two-process test of test_pretrain.py


def test_sigterm_to_icae_ablate_reaches_its_run_and_stops_the_grid(workspace, tmp_path):
    """Kubernetes signals only a container's first process: `icae ablate` passes SIGTERM on to its run."""
    root = tmp_path / "grid"
    flags = [a for a in run_flags(workspace, "unused") if a not in ("--output_dir", "unused", "--seed", "11")]
    cmd = [sys.executable, "-m", "icae", "ablate", "--grid", "layout", "--output_dir", str(root), *flags,
           "--max_steps", "100000", "--save_strategy", "no", "--logging_steps", "1"]
    proc = start(cmd, tmp_path, "ablate")
    wait_for(logged_step(root / "default-seed42", 2), proc, "step 2 of the first run")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == EXIT_PREEMPTED, read(tmp_path, "ablate")[-3000:]
    assert "default-seed42: stopped (exit 143" in read(tmp_path, "ablate")
    assert len(complete_checkpoints(root / "default-seed42")) == 1
    assert not (root / "epl-seed42").exists(), "the grid stops: the next run does not start"


def test_sigterm_stops_icae_finetune_the_same_way(workspace, tmp_path):
    """The fine-tuning recipe shares the Trainer and the output_dir handling: 143, one checkpoint, resumable."""
    root, model = workspace
    pre = root / "pre"
    if not pre.exists():
        assert pretrain(shlex.split(f"--model_name_or_path {model} --train_file {root}/train.json --output_dir {pre} "
                                    "--fixed_mem_size 4 --lora_r 4 --model_max_length 32 --max_steps 1 "
                                    "--eval_strategy no --save_strategy no --report_to none")) == 0
    records = [{"input": f"alpha beta gamma #{i}", "prompt": "First word?", "answer": "alpha"} for i in range(16)]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    out = tmp_path / "finetuned"
    cmd = [sys.executable, "-m", "icae", "finetune", "--restore_from", str(pre), "--train_file",
           str(tmp_path / "qa.json"), "--eval_strategy", "no", "--output_dir", str(out), "--max_steps", "40",
           "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "True",
           "--per_device_train_batch_size", "2"]
    proc = start(cmd, tmp_path, "finetune")
    wait_for(logged_step(out, 2), proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == EXIT_PREEMPTED, read(tmp_path, "finetune")[-3000:]
    (checkpoint,) = complete_checkpoints(out)
    assert f"stopped: SIGTERM after step {checkpoint.name.split('-')[1]} of 40" in read(tmp_path, "finetune")
    assert not (out / LOCK_NAME).exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resume: {checkpoint}" in proc.stdout


# ----------------------------------------------------------------------------- a second launch


def test_a_second_launch_is_refused_while_the_first_runs_and_a_dead_runs_lock_is_taken_over(workspace, tmp_path,
                                                                                          capsys):
    out = tmp_path / "shared"
    flags = run_flags(workspace, out, "--max_steps 100000")
    first = start(ICAE + flags, tmp_path, "first")
    try:
        wait_for(lambda: (out / "checkpoint-4" / "COMPLETE").exists(), first, "checkpoint-4")
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock, but leaving the CPU to the second launch
        second = subprocess.run(ICAE + flags, capture_output=True, text=True, timeout=300)
        assert second.returncode == EXIT_USER_ERROR, second.stderr[-3000:]
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: output_dir {out} is in use by another run (pid {first.pid} on "
                               f"{socket.gethostname()}, started "), line
        assert "train examples" not in second.stdout
        with pytest.raises(UserError, match=f"is in use by another run \\(pid {first.pid} "):
            pretrain(flags + ["--overwrite_output_dir"])  # "start afresh" does not bypass a live run either
        assert is_complete_checkpoint(out / "checkpoint-4"), "a refused run touched the first one's files"
    finally:
        first.kill()  # kill -9: the lock file stays, naming a process that is gone
        first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    capsys.readouterr()
    assert pretrain(run_flags(workspace, out, "--max_steps 2 --overwrite_output_dir")) == 0
    assert f"note: taking over {out / LOCK_NAME} from pid {first.pid} on " in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists(), "released at the end"


def test_lock_refuses_a_second_holder_until_released(tmp_path):
    folder = tmp_path / "run"
    with OutputDirLock(folder):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        for attempt in (OutputDirLock(folder).check, OutputDirLock(folder).acquire):
            with pytest.raises(UserError, match=rf"output_dir {folder} is in use by another run \(pid {os.getpid()}"):
                attempt()
    assert not (folder / LOCK_NAME).exists()
    OutputDirLock(folder).check()
    with OutputDirLock(folder):
        pass


def test_a_later_run_in_the_same_process_keeps_the_lock_a_failed_one_left(tmp_path):
    """A run that failed after taking the lock (in a notebook, a test) does not make the next one refuse itself."""
    folder = tmp_path / "run"
    faults.hold_output_dir(folder)  # ... and the run fails before releasing it
    faults.check_output_dir(folder)
    faults.hold_output_dir(folder)
    with pytest.raises(UserError, match="in use by another run"):
        OutputDirLock(folder).check()  # still locked against other processes
    faults.release_output_dir(folder)
    assert not (folder / LOCK_NAME).exists()


def test_lock_without_flock_goes_by_the_pid(tmp_path, monkeypatch, capsys):
    """Where the file system has no flock (some Lustre mounts): a holder on this host is stale once its pid is gone."""
    monkeypatch.setattr(faults, "_flock", lambda fd, operation: None)
    folder = tmp_path / "run"
    folder.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    for holder, live in (({"pid": os.getppid(), "host": socket.gethostname()}, True),
                         ({"pid": 1, "host": "another-host"}, True),
                         ({"pid": gone.pid, "host": socket.gethostname()}, False)):
        (folder / LOCK_NAME).write_text(json.dumps(holder))
        if live:
            with pytest.raises(UserError, match=f"pid {holder['pid']} on {holder['host']}"):
                OutputDirLock(folder).acquire()
        else:
            OutputDirLock(folder).acquire().release()
            assert f"taking over {folder / LOCK_NAME} from pid {gone.pid}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 16 MiB: tmpfs, else a loop-mounted ext2 image; skipped where neither mounts."""
    disk = tmp_path / "disk"
    disk.mkdir()
    image = tmp_path / "disk.img"
    tries = {"tmpfs": f"mount -t tmpfs -o size=16m tmpfs {disk}",
             "a loop-mounted ext2 image": f"truncate -s 16M {image} && mkfs.ext2 -q -b 4096 -m 0 {image} && "
                                          f"mount -o loop {image} {disk}"}
    failures = []
    for name, command in tries.items():
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            break
        failures.append(f"{name}: {(proc.stderr.strip() or f'exit {proc.returncode}').splitlines()[0]}")
    else:
        pytest.skip("needs a small file system to fill, and this machine lets the test mount none "
                    f"(needs root or CAP_SYS_ADMIN): {'; '.join(failures)}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _disk_bytes(folder):
    """What the files of `folder` take on a file system of 4 KiB blocks."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in Path(folder).rglob("*") if p.is_file())


def test_a_full_disk_while_saving_stops_with_one_line_and_the_rerun_resumes(workspace, straight, small_disk):
    out = small_disk / "run"
    # Fill the disk so that checkpoint-4 fits and checkpoint-8 does not (sizes from the straight run).
    size = _disk_bytes(straight / "checkpoint-4")
    keep = size + size // 2 + 4 * 4096  # checkpoint-4, half of checkpoint-8, the lock and run_config.json
    ballast = small_disk / "ballast"
    free = lambda: shutil.disk_usage(small_disk).free  # noqa: E731
    with open(ballast, "wb") as f:
        while free() > keep:
            f.write(b"\0" * min(1 << 20, free() - keep))
            f.flush()
    cmd = ICAE + run_flags(workspace, out, "--logging_steps 1000")  # no metrics written until the end
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: the disk is full while saving checkpoint-8 to {out} (No space left on device")
    assert line.endswith("): free space and rerun to resume from checkpoint-4"), line
    assert "Traceback" not in proc.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4"]
    assert not (out / "checkpoint-8").exists(), "the half-written checkpoint is removed"
    from icae.core.model import load_checkpoint

    load_checkpoint(str(out / "checkpoint-4"), device="cpu")  # the last complete one loads

    ballast.unlink()  # free space, then the same command again
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resume: {out / 'checkpoint-4'}" in proc.stdout
    assert_same_weights(straight, out)


def test_disk_full_is_told_from_other_failures(tmp_path, monkeypatch):
    from icae.errors import disk_full_reason as from_error

    assert from_error(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert from_error(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded"
    assert from_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert from_error(OSError(errno.EACCES, "Permission denied")) is None
    # torch.save: a short write without the errno; low free space on the disk tells
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(faults, "free_bytes", lambda path: 4096)
    assert "No space left on device" in faults.disk_full_reason(short_write, tmp_path)
    monkeypatch.setattr(faults, "free_bytes", lambda path: 10 << 30)
    assert faults.disk_full_reason(short_write, tmp_path) is None


def test_a_full_disk_at_the_final_save_names_the_folder_and_the_checkpoint_to_resume(tmp_path, monkeypatch):
    from icae.core.config import ICAEConfig
    from icae.core.model import ICAE as Model
    from icae.errors import DiskFull
    from icae.recipes.pretrain import PretrainArguments
    from icae.testing import byte_tokenizer, tiny_base_model
    from icae.training.trainer import ICAETrainer

    model = Model(ICAEConfig(fixed_mem_size=4, lora_r=4), tiny_base_model(), byte_tokenizer())
    trainer = ICAETrainer(model=model, args=PretrainArguments(output_dir=str(tmp_path), report_to="none"),
                          data_collator=model.collator)

    def full(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(DiskFull, match=f"the disk is full while saving the final weights to {tmp_path} "
                                       r"\(No space left on device\): free space and rerun with --overwrite"):
        trainer.save_model(str(tmp_path))


def test_the_cli_reports_a_full_disk_anywhere_as_one_line(monkeypatch, capsys):
    import icae.recipes.layout
    from icae.cli import main

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.json")

    monkeypatch.setattr(icae.recipes.layout, "main", full)
    with pytest.raises(SystemExit) as exit_:
        main(["layout"])
    assert exit_.value.code == EXIT_DISK_FULL
    assert capsys.readouterr().err == ("error: the disk is full (No space left on device) while writing "
                                       "/data/out.json: free space, then rerun\n")
