"""Speed, memory and operator counts of a task against the plain diffusers pipeline doing the same model calls.

    python benchmarks/run.py TASK [--model tiny] [--steps 10] [--size 64] [--repeats 5] [--warmup 1]
                             [--breakdown] [--ops-only] [--compile [--compile-backend inductor]]
                             [--backend NAME] [--out results.jsonl]
    python benchmarks/run.py all ...        # every task, one after the other, in one process

Timing.  Both arms (method and baseline) are warmed up (`--warmup` calls each: kernels,
allocator, caches, compilation), then run alternately, method then baseline, `--repeats` times
(default 5, at least 5 recommended).  Repeat i gives the paired ratio method_i / baseline_i of
two runs made back to back under nearly the same machine load.  Reported (`common.timing_summary`):
the median of each arm (method_s, baseline_s), ratio = median(method) / median(baseline), the
25-75 % interquartile range of the paired ratios (ratio_iqr), a bootstrap 95 % interval of the
ratio (ratio_ci95, pairs resampled), every paired ratio, and ``noisy`` when the IQR exceeds 10 %
of the median ratio: then the number is not to be trusted (a shared or throttled machine; rerun
with more repeats).  The load average before and after is recorded too.

Output: one JSON line per benchmark on stdout (and appended to `--out`), a readable table on
stderr.  Timing lines have ``"kind": "timing"``:
    {"kind", "task", "model", "device", "dtype", "size", "steps", "repeats", "compile", "backend",
     "method_s", "baseline_s", "ratio", "ratio_iqr", "ratio_ci95", "ratios", "noisy",
     "peak_mem_ratio", "<variant>_ratio", ...}
peak_mem_ratio is the ratio of peak allocated CUDA memory on a GPU, and of the process's peak
resident memory during each run on a CPU (where weights dominate, so it stays near 1 unless a
method allocates a lot).

--breakdown adds (1) the ratios of a task's intermediate variants (e.g. processors installed but
idle), timed in the same alternation, and (2) one ``"kind": "ops"`` line: the torch operators
each controlled attention-layer call runs, with the method attached, against the same layer's
call in the baseline (stock processors), counted with a TorchDispatchMode on one run of each arm
(`common.count_layer_ops`; which operators count is in `benchmarks/common.py`), plus the task's
own goals (e.g. steering: at most 4 extra operators per call).  --ops-only skips the timing.

--compile compiles every loaded pipeline's denoiser's forward in place for both arms (module hooks stay eager),
with `--compile-backend` (default inductor; eager or aot_eager on a CPU to test quickly).  A task
whose model calls run on a copy of the denoiser (Edit video) sets COMPILE = "app": the loaded
denoiser is compiled as the app's --compile does (`models.compile_denoiser`), which the task
follows for its copy.
Recompilations during the timed repeats are reported (``recompiles_timed``): a method that
swaps processors per call can defeat compilation, and this says so.

--backend NAME sets the diffusers attention backend on both arms: ``set_attention_backend`` on
every denoiser and diffusers' ``attention_backend`` context manager around every call.  An
untimed probe run of each arm counts how many attention-layer calls went through the backend
(the dispatcher); the line's ``backend_calls`` says "calls via the backend / attention calls"
per arm, so a run whose processors call SDPA directly is visible as 0/N.

Tasks live in `benchmarks/bench_<task>.py`, found without editing this file.  Each defines
    TASK = "name"
    def prepare(args) -> tuple[method, baseline, variants]   # callables; variants: dict name -> callable
and may define BREAKDOWN = False (with BREAKDOWN_WHY, a sentence) for a task whose --breakdown
has no operator count, and FULL_SIZE = {"model-name": builder(device, dtype) -> pipeline} for full-size
architectures with random weights (e.g. `--model sd15-random`): real-size speed and memory
without downloading anything, and ``ops_probe(args, method, baseline, variants)`` returning
{"scopes": {...}, "report": fn(method_counter, stock_counter, count) -> dict} for --breakdown.
`args` carries model, device, dtype, steps, size, repeats (and, after loading, pipes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    count_layer_ops,
    op_summary,
    task_modules,
    timing_summary,
)
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
            self._process = process
            self._stop = threading.Event()
            # one sample before the block: a block shorter than the sampler's first turn (the
            # thread may not get the GIL before it ends) would otherwise report a peak of 0
            self.peak = process.memory_info().rss

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
            self.peak = max(self.peak, self._process.memory_info().rss)


def timed(fn, device):
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, memory.peak


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _denoisers(args):
    found = []
    for pipe in getattr(args, "pipes", []):
        d = models.denoiser(pipe)
        if all(d is not x for x in found):
            found.append(d)
    return found


# ------------------------------------------------------------------------ attention backend


class BackendProbe:
    """Counts the calls of one diffusers attention backend and of every attention module."""

    def __init__(self, name: str | None, denoisers):
        self.name, self.denoisers = name, denoisers
        self.backend_calls = 0
        self.attention_calls = 0

    @contextmanager
    def watching(self):
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        registry = _AttentionBackendRegistry._backends
        key = AttentionBackendName(self.name or _AttentionBackendRegistry._active_backend)
        original = registry[key]

        def counting(*a, **k):
            self.backend_calls += 1
            return original(*a, **k)

        with ExitStack() as stack:
            registry[key] = counting
            stack.callback(registry.__setitem__, key, original)
            for denoiser in self.denoisers:
                for module in denoiser.modules():
                    if hasattr(module, "set_processor"):
                        stack.callback(module.register_forward_pre_hook(self._count).remove)
            yield self

    def _count(self, *_):
        self.attention_calls += 1

    def describe(self) -> str:
        return f"{self.backend_calls}/{self.attention_calls}"


def backend_context(name: str | None):
    if not name:
        return nullcontext()
    from diffusers.models.attention_dispatch import attention_backend

    return attention_backend(name)


def set_backend(args) -> None:
    for denoiser in _denoisers(args):
        if hasattr(denoiser, "set_attention_backend"):
            denoiser.set_attention_backend(args.backend)


def probe_backend(args, arms: dict) -> dict:
    """Run each arm once (untimed, eager) and count the attention calls made through the backend."""
    result = {}
    for name, fn in arms.items():
        probe = BackendProbe(args.backend, _denoisers(args))
        with probe.watching(), backend_context(args.backend):
            fn()
        result[name] = probe.describe()
    return result


# ---------------------------------------------------------------------------------- compile


def compile_denoisers(args) -> list[str]:
    """Compile each denoiser's `forward` in place (its module hooks, e.g. the controllers' state
    pre-hook, stay eager around it; the attention processors are traced inside), or with
    ``args.compile_as == "app"`` as the app's --compile (see the module docstring)."""
    if getattr(args, "compile_as", "forward") == "app":
        for pipe in args.pipes:
            models.compile_denoiser(pipe, backend=args.compile_backend)
        return [type(d).__name__ for d in _denoisers(args)]
    compiled = []
    for denoiser in _denoisers(args):
        if not getattr(denoiser, "_bench_compiled", False):
            denoiser.forward = torch.compile(denoiser.forward, backend=args.compile_backend)
            denoiser._bench_compiled = True
        compiled.append(type(denoiser).__name__)
    return compiled


@contextmanager
def count_forwards(denoisers):
    """[n]: the number of denoiser forwards while the block runs."""
    n = [0]

    def hook(*_):
        n[0] += 1

    with ExitStack() as stack:
        for d in denoisers:
            stack.callback(d.register_forward_pre_hook(hook).remove)
        yield n


def _graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:  # pragma: no cover - dynamo internals
        return -1


def _graph_count() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - dynamo internals
        return -1


# --------------------------------------------------------------------------------- one task


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _header(args, task):
    return {
        "task": task,
        "model": args.model,
        "device": _device_name(args.device),
        "dtype": str(args.dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
    }


def run_ops(args, task, module, method, baseline, variants) -> dict:
    """The --breakdown operator counts of one task (one run of each arm under the counter)."""
    denoisers = _denoisers(args)
    probe = getattr(module, "ops_probe", None)
    spec = probe(args, method, baseline, variants) if probe else {}
    scopes = spec.get("scopes", {})

    def count(fn, with_scopes=True):
        with backend_context(args.backend), count_layer_ops(denoisers, scopes if with_scopes else {}) as counter:
            fn()
        return counter

    method_ops = count(method)
    stock_ops = count(baseline, with_scopes=False)
    line = {"kind": "ops", **_header(args, task), **op_summary(method_ops, stock_ops)}
    report = spec.get("report")
    if report:
        line.update(report(method_ops, stock_ops, count))
    return line


def run_timing(args, task, method, baseline, variants, backend_calls) -> dict:
    device = args.device
    compiled = compile_denoisers(args) if args.compile else []
    arms = {"method": method, "baseline": baseline, **variants}

    def call(fn):
        with backend_context(args.backend):
            fn()

    warm_start = time.perf_counter()
    calls = {}
    for i in range(max(1, args.warmup)):  # kernels, allocator, caches, compilation
        for name, fn in arms.items():
            if i == 0 and name in ("method", "baseline"):
                with count_forwards(_denoisers(args)) as n:
                    call(fn)
                calls[name] = n[0]
            else:
                call(fn)
    warmup_s = time.perf_counter() - warm_start
    graphs_before = _graph_count()
    load_before = _loadavg()
    runs = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():  # method, baseline, variants, method, baseline, ...
            runs[name].append(timed(lambda fn=fn: call(fn), device))
    method_t = [t for t, _ in runs["method"]]
    baseline_t = [t for t, _ in runs["baseline"]]
    summary = timing_summary(method_t, baseline_t)
    line = {
        "kind": "timing",
        **_header(args, task),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compile": args.compile_backend if args.compile else None,
        "compiled": compiled,
        "backend": args.backend,
        "backend_calls": backend_calls,
        **summary,
        # denoiser forwards per call of each arm (counted in the first warm-up): should be equal
        "denoiser_calls": calls,
        "equal_calls": calls.get("method") == calls.get("baseline"),
        "peak_mem_ratio": round(max(m for _, m in runs["method"]) / max(1, max(m for _, m in runs["baseline"])), 3),
        "warmup_s": round(warmup_s, 2),
        "loadavg": [load_before, _loadavg()],
    }
    if args.compile:
        graphs_after = _graph_count()
        line["recompiles_timed"] = graphs_after - graphs_before if graphs_before >= 0 else None
        line["graph_breaks"] = _graph_breaks()
    for name in variants:
        times = [t for t, _ in runs[name]]
        pairs = [v / b for v, b in zip(times, baseline_t)]
        line[f"{name}_ratio"] = round(statistics.median(times) / summary["baseline_s"], 3)
        line.setdefault("variants", {})[name] = {
            "median_s": round(statistics.median(times), 4),
            "ratio_iqr": [round(x, 3) for x in _iqr(pairs)],
        }
    return line


def _iqr(values):
    from benchmarks.common import quantile

    return quantile(values, 0.25), quantile(values, 0.75)


def run_task(args, task, module) -> list[dict]:
    counts_ops = getattr(module, "BREAKDOWN", True)  # False: the task's model calls are not the loaded denoiser's
    if args.breakdown and not counts_ops:
        print(f"# {task}: no operator breakdown ({module.BREAKDOWN_WHY})", file=sys.stderr)
        if args.ops_only:
            return []
    args.pipes = []
    args.compile_as = getattr(module, "COMPILE", "forward")
    args.size = args.requested_size
    args.dtype = args.requested_dtype
    method, baseline, variants = module.prepare(args)
    variants = variants if args.breakdown else {}
    if args.backend:
        set_backend(args)
    backend_calls = probe_backend(args, {"method": method, "baseline": baseline}) if args.backend else None
    if backend_calls:
        used = {arm: not text.startswith("0/") for arm, text in backend_calls.items()}
        print(f"# {task}: attention backend {args.backend!r}: calls through it / attention calls: "
              + ", ".join(f"{arm} {text}" for arm, text in backend_calls.items())
              + ("" if all(used.values()) else "  (not every arm used it)"), file=sys.stderr)
    lines = []
    if args.breakdown and counts_ops:
        lines.append(run_ops(args, task, module, method, baseline, variants))
    if not args.ops_only:
        lines.append(run_timing(args, task, method, baseline, variants, backend_calls))
    return lines


# ------------------------------------------------------------------------------------ output


def table(lines: list[dict]) -> str:
    rows = []
    timing = [line for line in lines if line.get("kind") == "timing"]
    if timing:
        rows.append(f"{'task':<12} {'model':<14} {'compile':<9} {'method s':>9} {'base s':>9} {'ratio':>7} "
                    f"{'IQR of paired ratios':>21} {'95% CI':>15}  note")
        for t in timing:
            note = "NOISY" if t["noisy"] else ""
            if not t.get("equal_calls", True):
                note += f" UNEQUAL denoiser calls {t['denoiser_calls']}"
            if t.get("backend"):
                used = ", ".join(f"{arm} {text}" for arm, text in (t.get("backend_calls") or {}).items())
                note += f" backend {t['backend']}: {used}"
            if t.get("recompiles_timed"):
                note += f" recompiles {t['recompiles_timed']}"
            iqr, ci = t["ratio_iqr"], t["ratio_ci95"]
            rows.append(f"{t['task']:<12} {t['model']:<14} {str(t['compile'] or '-'):<9} {t['method_s']:>9.4f} "
                        f"{t['baseline_s']:>9.4f} {t['ratio']:>7.3f} {f'{iqr[0]:.3f}-{iqr[1]:.3f}':>21} "
                        f"{f'{ci[0]:.3f}-{ci[1]:.3f}':>15}  {note.strip()}")
            for name, v in t.get("variants", {}).items():
                rows.append(f"{'  ' + name:<36} {v['median_s']:>9.4f} {'':>9} {t[name + '_ratio']:>7.3f} "
                            f"{'{:.3f}-{:.3f}'.format(*v['ratio_iqr']):>21}")
    ops = [line for line in lines if line.get("kind") == "ops"]
    if ops:
        rows.append("")
        rows.append(f"{'task':<12} {'calls':>6} {'ops/call method':>16} {'ops/call stock':>15} {'extra/call':>11}  goals")
        for o in ops:
            goals = "; ".join(f"{g['goal']}: {g['value']} ({'met' if g['met'] else 'NOT met'})" for g in o.get("goals", []))
            rows.append(f"{o['task']:<12} {o['controlled_calls']:>6} {o['ops_per_call_method']:>16} "
                        f"{o['ops_per_call_stock']:>15} {o['extra_ops_per_call']:>11}  {goals}")
    return "\n".join(rows)


def parse_args(argv=None):
    tasks = task_modules()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(tasks) + ["all"])
    parser.add_argument("--model", default="tiny",
                        help="registry name, or a full-size random-weight architecture such as sd15-random")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the registry's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the task's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each arm (>= 5 for a trustworthy spread)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each arm first")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the task's intermediate variants and count operators per attention call")
    parser.add_argument("--ops-only", action="store_true", help="with --breakdown: operator counts only, no timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile both arms' denoisers")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend: inductor, aot_eager, eager")
    parser.add_argument("--backend", default=None,
                        help="diffusers attention backend for both arms (e.g. native, flash, _native_math)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.ops_only:
        args.breakdown = True
    return args, tasks


def main(argv=None) -> int:
    args, tasks = parse_args(argv)
    device = torch.device(args.device) if args.device else models.default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else models.default_dtype(device)
    args.device = device
    args.requested_size, args.requested_dtype = args.size, dtype
    selected = sorted(tasks) if args.task == "all" else [args.task]
    lines = []
    for task in selected:
        for line in run_task(args, task, tasks[task]):
            print(json.dumps(line), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(line) + "\n")
            lines.append(line)
    print(table(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
