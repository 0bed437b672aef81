"""Speed and memory of a task against the plain diffusers pipeline doing the same model calls.

    python benchmarks/run.py TASK [--model tiny] [--steps 10] [--size 64] [--repeats 5] [--breakdown]

Runs the method and its baseline in one process, alternating (method, baseline, method, ...)
after one warm-up each, and prints one JSON line:
    {"task", "model", "device", "dtype", "size", "steps", "repeats", "method_s", "baseline_s",
     "ratio", "peak_mem_ratio", ...}
method_s and baseline_s are medians.  peak_mem_ratio is the ratio of peak allocated CUDA memory
on a GPU, and of the process's peak resident memory during each run on a CPU (where weights
dominate, so it stays near 1 unless a method allocates a lot).  --breakdown adds the ratios of a
task's intermediate variants (e.g. processors installed but idle), to show where time goes.

Tasks live in `benchmarks/bench_<task>.py`, found without editing this file.  Each defines
    TASK = "name"
    def prepare(args) -> tuple[method, baseline, variants]   # callables; variants: dict name -> callable
and may define FULL_SIZE = {"model-name": builder(device, dtype) -> pipeline} for full-size
architectures with random weights (e.g. `--model sd15-random`): real-size speed and memory
without downloading anything.  `args` carries model, device, dtype, steps, size, repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import task_modules  # noqa: E402
from pipelines import models  # noqa: E402


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or sampled process RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            process = psutil.Process()
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self.peak = max(self.peak, process.memory_info().rss)
                    self._stop.wait(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def timed(fn, device):
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, memory.peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tasks = task_modules()
    parser.add_argument("task", choices=sorted(tasks))
    parser.add_argument("--model", default="tiny",
                        help="registry name, or a full-size random-weight architecture such as sd15-random")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the registry's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the task's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="also time the task's intermediate variants")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else models.default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else models.default_dtype(device)
    args.device, args.dtype = device, dtype
    method, baseline, variants = tasks[args.task].prepare(args)
    variants = variants if args.breakdown else {}

    method(), baseline()  # warm-up: kernels, allocator, caches
    method_runs, baseline_runs = [], []
    variant_runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        method_runs.append(timed(method, device))
        baseline_runs.append(timed(baseline, device))
        for name, variant in variants.items():
            variant_runs[name].append(timed(variant, device)[0])
    method_s = statistics.median(t for t, _ in method_runs)
    baseline_s = statistics.median(t for t, _ in baseline_runs)
    method_mem = max(m for _, m in method_runs)
    baseline_mem = max(m for _, m in baseline_runs)
    breakdown = {f"{name}_ratio": round(statistics.median(runs) / baseline_s, 3) for name, runs in variant_runs.items()}
    print(json.dumps({
        "task": args.task,
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "method_s": round(method_s, 4),
        "baseline_s": round(baseline_s, 4),
        "ratio": round(method_s / baseline_s, 3),
        "peak_mem_ratio": round(method_mem / baseline_mem, 3),
        **breakdown,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
