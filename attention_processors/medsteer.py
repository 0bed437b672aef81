"""MedSteer / CASteer steering of text cross-attention outputs, as a `post` policy.

The intervention point is the output of every text cross-attention layer (`attn2` of SD/SDXL
UNet transformer blocks and of PixArt-alpha blocks), after `to_out`.  In both block types that
tensor is added to the residual stream without a gate, so editing it inside the processor is
exactly the paper's hook (no block is patched).

Two modes, one controller:

- ``record``: at denoising step t and layer b, add the mean over the rows of one batch role
  (the conditional CFG rows) and all image tokens of the output, in float32, to a running sum;
  `means()` returns sum / count per (t, b).  Nothing else is stored.
- ``steer``: for every token vector a of the steered rows, with d = D[b][t'] (unit norm),
  ``s = max(0, a.d); a1 = a - beta*s*d; a' = a1 * |a| / (|a1| + 1e-8)``.  Tokens with
  a.d <= 0 are returned bit-identical, so the edit is spatially selective without a mask.
  beta = 1 removes the positive component, beta = 2 reflects it (a Householder reflection, norm
  kept), beta > 2 pushes it further.  Arithmetic is float32, cast back to the model dtype.

Step mapping: t' = min(t, T-1) ("clamp", the paper's rule: runs longer than D reuse the last
step's direction) or round(t*(T-1)/(T_run-1)) ("relative", our option).  The step index comes
from the core's timestep pre-hook (never from counting layer calls).

beta = 0 is an exact no-op: `remove_concept` returns its input tensor itself, and the pipeline
does not install any processor at all in that case.

Pure torch + diffusers: no files, no pipeline, no Gradio.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from . import layers as _layers
from .core import AttentionCall, AttentionController, ControlState

#: Denominator guard of the norm restoration (paper value).
NORM_EPS = 1e-8
STEP_MAPS = ("clamp", "relative")


def cross_attention_layers(layer_names: Iterable[str], pattern: str | None = None) -> list[str]:
    """The `attn2` (text cross-attention) layers among `layer_names`, in the given order
    (`layers.cross_attention`: UNet and PixArt transformer blocks).

    `pattern` (the user's regular expression, searched in the name) narrows the set, e.g.
    ``"up_blocks"``.
    """
    names = _layers.cross_attention(layer_names)
    if pattern:
        regex = re.compile(pattern)
        names = [n for n in names if regex.search(n)]
    return names


def remove_concept(a: torch.Tensor, d: torch.Tensor, beta: float) -> torch.Tensor:
    """Gated, norm-preserving removal of direction `d` (C,) from token vectors `a` (..., C).

    Returns a tensor of `a`'s dtype.  beta == 0 returns `a` itself; tokens with a.d <= 0 are
    copied bit for bit.
    """
    if beta == 0:
        return a
    a32 = a.float()
    d32 = d.float()
    s = (a32 @ d32).clamp_min(0)  # the gate
    if beta == 2:
        # For a unit d, |a - beta*s*d|^2 = |a|^2 + beta*(beta-2)*s^2: the paper's beta 2 reflects the
        # aligned component and keeps every norm, so the restoration is the identity (but for the
        # 1e-8 guard of its denominator) and is skipped.  Tokens with s = 0 get a - 0 = a exactly.
        return torch.addcmul(a32, s.unsqueeze(-1), d32, value=-2.0).to(a.dtype)
    edited = a32 - (beta * s).unsqueeze(-1) * d32
    restored = edited * (a32.norm(dim=-1, keepdim=True) / (edited.norm(dim=-1, keepdim=True) + NORM_EPS))
    return torch.where((s > 0).unsqueeze(-1), restored.to(a.dtype), a)


def step_index_tensor(step: torch.Tensor, stored: int, run_steps: int | None, step_map: str = "clamp") -> torch.Tensor:
    """Which stored step's direction to use at the 0-based denoising step `step`, a 0-d int64
    tensor (no device read): the step map of the module docstring (torch.round rounds halves to
    even)."""
    if step_map == "clamp" or not run_steps or run_steps <= 1:
        return step.clamp(0, stored - 1)
    if step_map == "relative":
        return torch.round(step.double() * (stored - 1) / (run_steps - 1)).long().clamp(max=stored - 1)
    raise ValueError(f"unknown step map {step_map!r}; choose one of {', '.join(STEP_MAPS)}")


class MedSteer(AttentionController):
    """Record cross-attention means, or steer cross-attention outputs away from a concept.

    layers: the layer names to control (see `cross_attention_layers`).
    mode: "record" or "steer".
    record_role: batch role whose rows are averaged in record mode ("cond" with CFG).
    steer_roles: batch roles edited in steer mode (both CFG halves by default; ("cond",) for
        the conditional half only; in a batched pair, only the roles of the steered image).
    directions: steer mode: layer name -> (T, C) float32 unit vectors (moved to each layer's
        device once, on first use).
    run_steps: number of denoising steps of the run (for step_map "relative").
    steps: record mode: number of steps to allocate (more steps grow the buffer).
    """

    def __init__(
        self,
        layers: Iterable[str],
        mode: str = "steer",
        *,
        directions: dict[str, torch.Tensor] | None = None,
        beta: float | None = None,
        record_role: str = "cond",
        steer_roles: tuple[str, ...] = ("uncond", "cond"),
        step_map: str = "clamp",
        run_steps: int | None = None,
        state: ControlState | None = None,
    ):
        super().__init__(state or ControlState(row_roles=("uncond", "cond")))
        if mode not in ("record", "steer"):
            raise ValueError(f"unknown mode {mode!r}: use 'record' or 'steer'")
        if step_map not in STEP_MAPS:
            raise ValueError(f"unknown step map {step_map!r}; choose one of {', '.join(STEP_MAPS)}")
        if mode == "steer" and beta is None:
            raise ValueError("steer mode needs a beta (the task's settings hold the paper's)")
        self.layers = list(layers)
        self._selected = set(self.layers)
        self.mode = mode
        self.beta = float(beta or 0.0)
        self.record_role = record_role
        self.steer_roles = tuple(steer_roles)
        self.step_map = step_map
        self.run_steps = run_steps
        self._directions = dict(directions or {})
        if mode == "steer":
            missing = [n for n in self.layers if n not in self._directions]
            if missing:
                raise ValueError(f"no direction for layer {missing[0]} ({len(missing)} missing)")
        self._on_device: dict[str, torch.Tensor] = {}
        self._row: torch.Tensor | None = None  # this forward's step row of the direction tables
        # record mode: per layer, a list over steps of float32 (C,) sums; one row count per step
        self._sums: dict[str, list[torch.Tensor | None]] = {n: [] for n in self.layers}
        self._counts: dict[str, list[int]] = {n: [] for n in self.layers}
        # record mode: this forward's (layer, step tensor, row sum, rows) entries, emptied at the start
        # of every forward and folded eagerly into the per-step lists, so that compiled layers never
        # index Python lists by the step (a device read and a recompile per step)
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []

    def select(self, name: str) -> bool:
        return name in self._selected

    # ---------------------------------------------------------------------------- record

    def begin_forward(self) -> None:
        self._fold()
        if self.mode == "steer" and self.state.device is not None:
            for name in self.layers:  # tables on the input's device before the (compiled) forward
                self._direction(name, self.state.device)
            # every table has the same steps: this forward's row index, once for all layers
            stored = next(iter(self._on_device.values())).shape[0]
            index = step_index_tensor(self.state.step_tensor, stored, self.run_steps, self.step_map).reshape(1)
            if self._row is None or self._row.device != index.device:
                self._row = index.clone()
            else:
                self._row.copy_(index)

    def _fold(self) -> None:
        if not self._pending:
            return
        steps = torch.stack([step for _, step, _, _ in self._pending]).tolist()  # one device read
        for (name, _, summed, n_rows), step in zip(self._pending, steps):
            sums, counts = self._sums[name], self._counts[name]
            while len(sums) <= step:
                sums.append(None)
                counts.append(0)
            sums[step] = summed if sums[step] is None else sums[step] + summed
            counts[step] += n_rows
        self._pending.clear()

    def _record(self, call: AttentionCall, output: torch.Tensor) -> None:
        rows = self.state.rows(self.record_role, output.shape[0])
        with torch.no_grad():
            # sum over rows of the per-row token mean: every row has the same token count
            summed = output[rows].float().mean(1).sum(0)
        self._pending.append((call.name, self.state.step_tensor.clone(), summed, rows.stop - rows.start))

    def means(self) -> dict[str, torch.Tensor]:
        """Recorded means: layer name -> float32 (T, C) on the CPU."""
        self._fold()
        result = {}
        for name in self.layers:
            sums, counts = self._sums[name], self._counts[name]
            if not sums or any(s is None for s in sums):
                raise RuntimeError(f"layer {name} was not recorded at every step")
            result[name] = torch.stack([s.cpu() / c for s, c in zip(sums, counts)])
        return result

    # ---------------------------------------------------------------------------- steer

    def _direction(self, name: str, device: torch.device) -> torch.Tensor:
        table = self._on_device.get(name)
        if table is None or table.device != device:
            table = self._directions[name].to(device=device, dtype=torch.float32)
            self._on_device[name] = table
        return table

    def _steer(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        table = self._direction(call.name, output.device)
        row = self._row
        if row is None or row.device != table.device:  # no begin_forward on this device yet
            row = step_index_tensor(self.state.step_tensor, table.shape[0], self.run_steps, self.step_map)
            row = row.reshape(1).to(table.device)
        d = table.index_select(0, row)[0]  # a tensor index: no device read
        batch = output.shape[0]
        if set(self.steer_roles) == set(self.state.row_roles):
            return remove_concept(output, d, self.beta)
        output = output.clone()
        for role in self.steer_roles:
            rows = self.state.rows(role, batch)
            output[rows] = remove_concept(output[rows], d, self.beta)
        return output

    def post(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        if call.text_keys is None:  # not a cross-attention call
            return output
        if self.mode == "record":
            self._record(call, output)
            return output
        if self.beta == 0:
            return output
        return self._steer(call, output)


def unit_directions(positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                    eps: float = NORM_EPS) -> dict[str, torch.Tensor]:
    """d[t, b] = (mu_pos - mu_neg) / |mu_pos - mu_neg|; entries with norm <= eps stay unnormalised."""
    result = {}
    for name, pos in positive.items():
        diff = pos.float() - negative[name].float()
        norm = diff.norm(dim=-1, keepdim=True)
        result[name] = torch.where(norm > eps, diff / norm.clamp_min(eps), diff)
    return result
