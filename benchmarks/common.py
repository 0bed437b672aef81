"""Shared by benchmarks/run.py and the task modules benchmarks/bench_<task>.py."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from pipelines import models

ROOT = Path(__file__).resolve().parents[1]


def task_modules() -> dict:
    found = {}
    for info in pkgutil.iter_modules([str(ROOT / "benchmarks")]):
        if info.name.startswith("bench_"):
            module = importlib.import_module(f"benchmarks.{info.name}")
            found[module.TASK] = module
    return found


def load_model(args):
    """The pipeline named by --model: a full-size random-weight architecture or a registry name."""
    for module in task_modules().values():
        builder = getattr(module, "FULL_SIZE", {}).get(args.model)
        if builder is not None:
            return builder(args.device, args.dtype)
    return models.load(args.model, device=args.device, dtype=args.dtype)
