"""Shared by benchmarks/run.py and the task modules benchmarks/bench_<task>.py.

- `task_modules`, `load_model`: the task registry and the model named by ``--model`` (every
  pipeline a task loads is remembered in ``args.pipes``, so run.py can compile the denoisers or
  set their attention backend on both arms).
- `timing_summary`: medians, per-repeat ratios, their interquartile range and a bootstrap
  interval of the median ratio.
- `OpCounter`, `count_layer_ops`, `op_summary`: torch-operator counts per attention-layer call
  (``--breakdown``), with a `TorchDispatchMode`.

Which operators are counted.  The dispatch mode sees every aten operator that reaches a kernel
after autograd and the composite decompositions (``matmul`` arrives as ``bmm``/``mm``/``mv``,
``linear`` as ``addmm``/``mm``, SDPA as one fused op).  Operators that launch nothing are
skipped: those whose schema says the output aliases an input without writing it (views:
``view``, ``transpose``, ``t``, ``slice``, ``select``, ``expand``, ``unsqueeze``, ``permute``,
``detach``, ``alias``, ``as_strided``, ``unbind``, ...) and the small list `IGNORED_OPS`
(``_unsafe_view`` and ``_reshape_alias``, views by another name; ``empty*``/``new_empty*``,
allocations without a kernel; ``lift_fresh``).  Everything else counts once, including copies
(``clone``, ``_to_copy``, ``contiguous`` copies), in-place ops and ``_local_scalar_dense`` (a
device-to-host read: a sync on a GPU, also reported on its own as ``host_reads``).  On a GPU
each counted operator is about one kernel launch (cuBLAS/cuDNN may launch more than one).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import random
import statistics
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from pipelines import models

ROOT = Path(__file__).resolve().parents[1]


def task_modules() -> dict:
    found = {}
    for info in pkgutil.iter_modules([str(ROOT / "benchmarks")]):
        if info.name.startswith("bench_"):
            module = importlib.import_module(f"benchmarks.{info.name}")
            found[module.TASK] = module
    return found


def full_size_models() -> dict:
    """{"sd15-random": builder, ...}: every task's full-size random-weight architectures."""
    found = {}
    for module in task_modules().values():
        found.update(getattr(module, "FULL_SIZE", {}))
    return found


def load_model(args):
    """The pipeline named by --model: a full-size random-weight architecture or a registry name.

    The pipeline is appended to ``args.pipes`` (created if missing), so that run.py can compile
    its denoiser or set its attention backend for both arms.
    """
    builder = full_size_models().get(args.model)
    pipe = builder(args.device, args.dtype) if builder is not None else models.load(
        args.model, device=args.device, dtype=args.dtype)
    pipes = getattr(args, "pipes", None)
    if pipes is None:
        pipes = args.pipes = []
    if all(p is not pipe for p in pipes):
        pipes.append(pipe)
    return pipe


# ------------------------------------------------------------------------------------ timing


def quantile(values, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def timing_summary(method_s: list[float], baseline_s: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Medians of both arms, their ratio, and its spread over the paired repeats.

    Repeat i ran method_s[i] right before baseline_s[i] (the arms alternate), so
    ratio_i = method_s[i] / baseline_s[i] compares runs made under nearly the same machine load.
    ``ratio`` is median(method) / median(baseline); ``ratio_iqr`` the 25-75 % interquartile range
    of the per-repeat ratios; ``ratio_ci95`` a percentile bootstrap interval of ``ratio`` (pairs
    resampled with replacement, fixed seed).  ``spread`` = (q75 - q25) / median of the per-repeat
    ratios: above 0.1 the run is flagged ``noisy``.
    """
    if len(method_s) != len(baseline_s) or not method_s:
        raise ValueError("need the same, non-zero number of method and baseline repeats")
    pairs = [m / b for m, b in zip(method_s, baseline_s)]
    med_m, med_b = statistics.median(method_s), statistics.median(baseline_s)
    rng = random.Random(seed)
    n = len(pairs)
    boot = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boot.append(statistics.median(method_s[i] for i in idx) / statistics.median(baseline_s[i] for i in idx))
    q25, q75 = quantile(pairs, 0.25), quantile(pairs, 0.75)
    median_pair = statistics.median(pairs)
    spread = (q75 - q25) / median_pair
    return {
        "method_s": round(med_m, 4),
        "baseline_s": round(med_b, 4),
        "ratio": round(med_m / med_b, 3),
        "ratio_median_of_pairs": round(median_pair, 3),
        "ratio_iqr": [round(q25, 3), round(q75, 3)],
        "ratio_ci95": [round(quantile(boot, 0.025), 3), round(quantile(boot, 0.975), 3)],
        "method_iqr_s": [round(quantile(method_s, 0.25), 4), round(quantile(method_s, 0.75), 4)],
        "baseline_iqr_s": [round(quantile(baseline_s, 0.25), 4), round(quantile(baseline_s, 0.75), 4)],
        "ratios": [round(r, 3) for r in pairs],
        "spread": round(spread, 3),
        "noisy": bool(spread > 0.1),
    }


# --------------------------------------------------------------------------- operator counts

#: aten operators that launch no kernel but whose schema does not say so (see the module docstring).
IGNORED_OPS = frozenset({
    "_unsafe_view", "_reshape_alias", "lift_fresh", "lift_fresh_copy",
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "empty_permuted",
})
HOST_READ = "_local_scalar_dense"


@functools.lru_cache(maxsize=None)
def counted(func) -> bool:
    """Whether the aten overload `func` counts as an operator (not a view, not an allocation)."""
    if func.__name__.split(".")[0] in IGNORED_OPS:
        return False
    returns = func._schema.returns
    if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
        return False  # a view of an input
    return True


class _Record:
    __slots__ = ("kind", "name", "info", "ops", "by_op", "start", "end")

    def __init__(self, kind: str, name: str, info, start: int):
        self.kind, self.name, self.info, self.start = kind, name, info, start
        self.ops = 0
        self.by_op: Counter = Counter()
        self.end = None


class OpCounter(TorchDispatchMode):
    """Counts the operators of `counted` dispatched while active: in total, by name, and inside
    every open scope (`open`/`close`; nested scopes each count the ops they contain)."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.host_reads = 0
        self.by_op: Counter = Counter()
        self.records: list[_Record] = []
        self._open: list[_Record] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and counted(func):
            self.total += 1
            name = func.__name__
            self.by_op[name] += 1
            if name.startswith(HOST_READ):
                self.host_reads += 1
            for record in self._open:
                record.ops += 1
                record.by_op[name] += 1
        return func(*args, **(kwargs or {}))

    def open(self, kind: str, name: str, info=None) -> _Record:
        record = _Record(kind, name, info, self.total)
        self.records.append(record)
        self._open.append(record)
        return record

    def close(self, record: _Record) -> None:
        record.end = self.total
        if record in self._open:
            self._open.remove(record)

    def of(self, kind: str) -> list[_Record]:
        return [r for r in self.records if r.kind == kind]


def is_stock_processor(processor) -> bool:
    """A diffusers processor (not one of this project's controlled processors)."""
    return type(processor).__module__.startswith("diffusers.")


@contextmanager
def count_layer_ops(denoisers, scopes: dict | None = None, forward_only: bool = True):
    """Count operators per attention-layer call of `denoisers` while the block runs.

    With `forward_only` (the default) the dispatch mode is active only inside the denoiser
    forwards (text encoders, VAE, schedulers and backward passes run at full speed and are not
    counted); without it, every operator of the block counts in ``total``.

    Every call of an attention module becomes a record of kind "layer" (info: whether its
    processor was a controlled one), every denoiser forward a record of kind "forward".
    `scopes`: {label: (owner, attribute, info_fn)}: the function ``owner.attribute`` is wrapped
    for the block, and each of its calls becomes a record of kind `label` (info: ``info_fn(*args)``
    or None).  Hooks use ``always_call``, so a forward stopped by an exception (RefAM's early
    exit) still closes its records.
    """
    counter = OpCounter()
    with ExitStack() as stack:
        for denoiser in denoisers:
            def fwd_pre(module, args, counter=counter):
                if forward_only:
                    counter.__enter__()
                module._bench_op_record = counter.open("forward", type(module).__name__)

            def fwd_post(module, args, output, counter=counter):
                counter.close(module._bench_op_record)
                if forward_only:
                    counter.__exit__(None, None, None)

            stack.callback(denoiser.register_forward_pre_hook(fwd_pre).remove)
            stack.callback(denoiser.register_forward_hook(fwd_post, always_call=True).remove)
            for name, module in denoiser.named_modules():
                if not hasattr(module, "set_processor"):
                    continue

                def pre(module, args, name=name, counter=counter):
                    controlled = not is_stock_processor(module.processor)
                    module._bench_op_record = counter.open("layer", name, controlled)

                def post(module, args, output, counter=counter):
                    counter.close(module._bench_op_record)

                stack.callback(module.register_forward_pre_hook(pre).remove)
                stack.callback(module.register_forward_hook(post, always_call=True).remove)
        for label, (owner, attribute, info_fn) in (scopes or {}).items():
            original = owner.__dict__[attribute] if attribute in owner.__dict__ else getattr(owner, attribute)

            def wrapped(*args, _original=original, _label=label, _info=info_fn, **kwargs):
                info = None
                if _info:  # the measurement's own reads are not counted
                    counter.paused = True
                    try:
                        info = _info(*args)
                    finally:
                        counter.paused = False
                record = counter.open(_label, _label, info)
                try:
                    return _original(*args, **kwargs)
                finally:
                    counter.close(record)

            setattr(owner, attribute, wrapped)
            stack.callback(setattr, owner, attribute, original)
        if not forward_only:
            stack.enter_context(counter)
        yield counter


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 2) if values else 0.0


def op_summary(method: OpCounter, stock: OpCounter, top: int = 8) -> dict:
    """Operators per controlled attention-layer call of the method arm against the same layers'
    calls in the stock arm, plus whole-run totals.

    Layer calls are matched by layer name and call index (the k-th call of a layer in the method
    arm against the k-th call of that layer in the stock arm).  ``extra_ops_per_call`` is the mean
    difference; ``extra_by_op`` the mean difference per operator name (negative: the method runs
    fewer of it, e.g. SDPA replaced by explicit matmuls).
    """
    stock_calls: dict[str, list[_Record]] = {}
    for r in stock.of("layer"):
        stock_calls.setdefault(r.name, []).append(r)
    seen: Counter = Counter()
    pairs = []
    for r in method.of("layer"):
        k = seen[r.name]
        seen[r.name] += 1
        if r.info and k < len(stock_calls.get(r.name, ())):
            pairs.append((r, stock_calls[r.name][k]))
    extra = [m.ops - s.ops for m, s in pairs]
    by_op: Counter = Counter()
    for m, s in pairs:
        by_op.update(m.by_op)
        by_op.subtract(s.by_op)
    by_op = {k: round(v / len(pairs), 2) for k, v in by_op.most_common() if v} if pairs else {}
    by_op = dict(sorted(by_op.items(), key=lambda kv: -abs(kv[1]))[:top])
    m_fw, s_fw = method.of("forward"), stock.of("forward")
    m_in = sum(r.ops for r in method.of("layer"))
    s_in = sum(r.ops for r in stock.of("layer"))
    return {
        "controlled_calls": len(pairs),
        "ops_per_call_method": _mean(m.ops for m, _ in pairs),
        "ops_per_call_stock": _mean(s.ops for _, s in pairs),
        "extra_ops_per_call": _mean(extra),
        "extra_ops_min_max": [min(extra), max(extra)] if extra else [0, 0],
        "extra_by_op": by_op,
        "stock_arm_controlled_calls": sum(1 for r in stock.of("layer") if r.info),
        "forwards": [len(m_fw), len(s_fw)],
        # operators in the denoiser forwards outside every attention layer (state pre-hook, ...)
        "outside_layers_per_forward": [round((sum(r.ops for r in m_fw) - m_in) / max(1, len(m_fw)), 2),
                                       round((sum(r.ops for r in s_fw) - s_in) / max(1, len(s_fw)), 2)],
        "total_ops": [method.total, stock.total],  # inside the denoiser forwards by default
        "host_reads": [method.host_reads, stock.host_reads],
    }


def ops_after_last_controlled(counter: OpCounter) -> list[int]:
    """Per denoiser forward: operators dispatched in it after its last controlled layer call ended."""
    result = []
    layers = [r for r in counter.of("layer") if r.info]
    for fw in counter.of("forward"):
        inside = [r for r in layers if r.start >= fw.start and r.end is not None and r.end <= fw.end]
        if inside:
            result.append(fw.end - max(r.end for r in inside))
    return result


def scope_stats(counter: OpCounter, label: str) -> dict:
    """{"calls", "ops_per_call", "max"} of the records of one scope label."""
    records = counter.of(label)
    return {"calls": len(records), "ops_per_call": _mean(r.ops for r in records),
            "max": max((r.ops for r in records), default=0)}


def goal(text: str, value, limit) -> dict:
    """One goal of the --breakdown line: met when value <= limit."""
    return {"goal": text, "value": value, "limit": limit, "met": bool(value <= limit)}
