"""How to measure: peak memory (RSS high-water mark), the machine's matmul peak, and the environment.

Nothing here knows about ICAE; steps.py uses these around the steps it times.
"""

from __future__ import annotations

import os
import platform
import statistics
import time


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssPeak:
    """Peak resident memory of this process from `reset()` on: the kernel's high-water mark (VmHWM),
    reset through /proc/self/clear_refs; where that is unavailable, a thread polling RSS every 2 ms."""

    def __init__(self):
        self._thread = None
        self._poll_peak = 0
        self.method = "VmHWM"

    @staticmethod
    def rss() -> int:
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        import psutil

        return psutil.Process().memory_info().rss

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _status_kib("VmHWM") is None:
                raise OSError
        except OSError:
            self._start_polling()

    def _start_polling(self) -> None:
        import threading

        self.method = "poll-2ms"
        self._poll_peak = self.rss()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._poll_peak = max(self._poll_peak, self.rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def peak(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return max(self._poll_peak, self.rss())
        return _status_kib("VmHWM") * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(x for x in flags if x.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def environment(device: str) -> dict:
    import peft
    import torch
    import transformers

    env = {
        "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "loadavg_start": loadavg(), "omp_wait_policy": worker_env().get("OMP_WAIT_POLICY"),
    }
    if device == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        with open("/proc/meminfo") as f:
            env["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return env


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def worker_env() -> dict:
    """The workers' environment. OMP_WAIT_POLICY=PASSIVE unless set: with more runnable threads than
    cores (a shared machine), OpenMP's spin-waiting made CPU steps 3-10x slower and erratic here."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def torch_dtype(name: str):
    import torch

    return torch.float32 if name == "fp32" else torch.bfloat16


def matmul_peak(dtype: str, device: str, n: int = 2048, repeats: int = 7, budget_s: float = 3.0) -> dict:
    """Median FLOP/s of an n^3 matmul in the step's compute dtype: the machine's practical peak.

    Also per CPU second (process time, all threads): on a shared machine wall time includes waiting
    for a core, CPU time mostly does not. Where one n^3 matmul would take more than `budget_s`
    (bf16 on a CPU without bf16 instructions runs ~100x slower than fp32), the probe stops at the
    largest size that fits, measured from 512 upwards; the n used is recorded."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)

    def operands(size):
        a = torch.randn(size, size, generator=g).to(device=device, dtype=torch_dtype(dtype))
        b = torch.randn(size, size, generator=g).to(device=device, dtype=torch_dtype(dtype))
        return a, b

    def once(a, b):
        sync()
        t, c = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        sync()
        return time.perf_counter() - t, time.process_time() - c

    requested, size = n, min(512, n)
    while True:
        a, b = operands(size)
        once(a, b)  # warm-up
        wall, _ = once(a, b)
        if size >= n or wall * 8 > budget_s:  # the next size costs 8x
            break
        size *= 2
    runs = [once(a, b) for _ in range(repeats)]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    flops = 2 * size**3
    return {"n": size, "requested_n": requested, "dtype": dtype, "median_s": wall, "flops_per_s": flops / wall,
            "median_cpu_s": cpu, "flops_per_cpu_s": flops / cpu if cpu > 0 else None,
            "times_s": [r[0] for r in runs], "cpu_times_s": [r[1] for r in runs]}
