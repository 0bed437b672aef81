"""Every task's benchmark on full-size random-weight architectures, eager and compiled, in a time budget.

    python benchmarks/gpu_all.py [--budget 480] [--results outputs/gpu_all.jsonl] [--steps N] [--repeats 5]
    python benchmarks/gpu_all.py --model tiny --budget 300 --compile-backend eager   # dry run on a CPU

Runs `benchmarks/run.py` once per (task, model, compile) in a subprocess, in the order of PLAN:
first every task eagerly, then compiled, each with a timeout of what is left of the budget (so
the whole run stays under `--budget` seconds, default 480 = 8 minutes, counted from the start of
this script; `gpu_all.sh` passes the time its wheel install took).  A run that does not fit is
recorded as skipped, one that fails or times out with the tail of its output: every planned run
gives exactly one JSON line in `--results`, run.py's own lines (``"kind": "timing"`` or
``"ops"``) or ``{"kind": "skipped" | "failed", "task", "model", "compile", "reason"}``.

Steps and repeats are chosen for the budget: 4 denoising steps (eraser: 5, i.e. 4 UNet calls at
strength 0.8) and 5 repeats; each task's estimated cost (seconds on an H100/H200-class card,
eager / compiled, including building the random weights) orders nothing but decides whether a run
can still fit.  `--model tiny` replaces every model by the tiny one (no GPU needed) and runs the
same plan: the check that this script works before it is carried to a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (task, full-size model, steps, estimated seconds eager, estimated seconds compiled)
PLAN = [
    ("generate", "sd15-random", 4, 45, 150),
    ("steering", "pixart-random", 4, 45, 150),
    ("eraser", "sdxl-random", 5, 70, 200),
    ("grounding", "flux-random", 4, 90, 240),
    ("personalize", "sd21-random", 4, 60, 200),
]


def _line(kind, task, model, compile_backend, reason, **extra) -> dict:
    return {"kind": kind, "task": task, "model": model, "compile": compile_backend, "reason": reason, **extra}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    parser.add_argument("--spent", type=float, default=0.0, help="seconds already used (e.g. by the wheel install)")
    parser.add_argument("--results", default=str(ROOT / "outputs" / "gpu_all.jsonl"))
    parser.add_argument("--model", default=None, help="run every task on this model instead (tiny: a CPU dry run)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the plan's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--no-compile", action="store_true", help="eager runs only")
    parser.add_argument("--breakdown", action="store_true", help="also time variants and count operators (slower)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    args = parser.parse_args(argv)

    start = time.monotonic() - args.spent
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    plan = [p for p in PLAN if not args.tasks or p[0] in args.tasks.split(",")]
    runs = [(task, model, steps, eager, None) for task, model, steps, eager, _ in plan]
    if not args.no_compile:
        runs += [(task, model, steps, compiled, args.compile_backend) for task, model, steps, _, compiled in plan]
    dry = args.model is not None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with results.open("a") as out:
        for task, model, steps, estimate, backend in runs:
            model = args.model or model
            left = args.budget - (time.monotonic() - start)
            need = min(estimate, 30) if dry else estimate
            if left < need:
                line = _line("skipped", task, model, backend, f"budget: {left:.0f} s left, about {need} s needed")
                print(json.dumps(line), flush=True)
                out.write(json.dumps(line) + "\n")
                continue
            command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), task, "--model", model,
                       "--steps", str(args.steps or steps), "--repeats", str(args.repeats)]
            if args.dtype:
                command += ["--dtype", args.dtype]
            if backend:
                command += ["--compile", "--compile-backend", backend, "--warmup", "2"]
            if args.breakdown:
                command.append("--breakdown")
            t0 = time.monotonic()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, left - 2), env=env,
                                      cwd=ROOT)
            except subprocess.TimeoutExpired as e:
                tail = (e.stderr or b"")[-800:]
                tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
                lines = [_line("failed", task, model, backend, "timed out at the budget", tail=tail)]
            else:
                lines = [json.loads(x) for x in done.stdout.splitlines()
                         if x.startswith("{") and '"kind"' in x]
                if done.returncode or not lines:
                    lines = [_line("failed", task, model, backend, f"exit status {done.returncode}",
                                   tail=(done.stderr or done.stdout)[-800:])]
            for line in lines:
                line.setdefault("wall_s", round(time.monotonic() - t0, 1))
                print(json.dumps(line), flush=True)
                out.write(json.dumps(line) + "\n")
            out.flush()
    print(f"# {time.monotonic() - start:.0f} s of {args.budget:.0f}; results in {results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
