"""DisenDiff (CVPR 2024) on the common trainer: its settings, with the paper's defaults, and what
it adds to training (docs/methods/personalize.md).

Caption ``"photo of a <new1> cat and <new2> dog"``; per instance row, M_i = G(minmax(A_<new i>))
and C_i = G(minmax(A_class i))^2 on the captured cross-attention maps; loss
L_mse + alpha * mean_rows[sum_i (1 - IoU(sg(C_i), M_i)) + mean pairwise IoU(C_i, C_j)] (the map
math is `attention_processors.personalize`); Custom Diffusion augmentation; each row a
regularisation image with probability 1/2.

torch is imported inside the methods, so the command line reads the settings without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..settings import setting
from .base import PRIOR, Method, PersonalizeSettings, per_method


@dataclass(frozen=True)
class DisenDiffSettings(PersonalizeSettings):
    """DisenDiff's settings with the paper's defaults: the one place they live; the CLI flags
    and the tab's controls are made from these fields."""

    steps: int = per_method("steps", 250)
    lr: float = per_method("lr", 8e-5)  # the paper's 1e-5 x the effective batch of 8
    batch_size: int = per_method("batch_size", 2)
    grad_accum: int = per_method("grad_accum", 4)
    max_grad_norm: float | None = per_method("max_grad_norm", None)
    augment: bool = per_method("augment", True)
    checkpoint_every: int = per_method("checkpoint_every", 50)  # ours: the paper saves at the end only
    sample_guidance: float = per_method("sample_guidance", 6.0)
    alpha: float = setting(0.01, "weight of the attention losses (with loss_norm paper; it is "
                                 "divided by 4 with mean)", label="Alpha", minimum=0, maximum=100)

    PAPER_BASE: ClassVar[str] = "SD 1.5"
    MAX_CONCEPTS: ClassVar[int] = 3
    INIT_IDS: ClassVar[tuple[int, ...]] = (47629, 42170, 43514)  # "pll", "ktn", "ucd</w>"
    SAMPLE_ETA: ClassVar[float] = 1.0
    SAMPLE_SCHEDULER: ClassVar[str | None] = "ddim"


class DisenDiff(Method):
    """DisenDiff's captions, batches (instance or prior rows, half and half) and IoU losses."""

    title = "DisenDiff"
    summary = "IoU attention losses"
    settings = DisenDiffSettings

    def prior_prompt(self) -> str:
        return " and ".join(f"a {w}" for w in self.trainer.words)

    def instance_caption(self, prefix: str = "") -> str:
        t = self.trainer
        parts = [f"{token} {word}" for token, word in zip(t.tokens, t.words)]
        return f"{prefix}photo of a " + " and ".join(parts)

    def batch_rows(self, step: int) -> tuple[list[tuple], list[int]]:
        import torch

        from attention_processors.personalize import INSTANCE

        t = self.trainer
        has_prior = t.settings.prior_images > 0
        rows = []
        for _ in range(t.settings.batch_size):
            if has_prior and float(torch.rand((), generator=t.generator)) >= 0.5:
                rows.append((*t._prior_row(), PRIOR))
            else:
                rows.append((*t._instance_row(), INSTANCE))
        return rows, list(range(t.n))

    def loss(self, batch: dict, out, refresh: bool, info):
        import torch

        from attention_processors.personalize import disendiff_attention_loss, disendiff_maps

        from .common import masked_mse

        t, s = self.trainer, self.trainer.settings
        loss = masked_mse(out.pred, out.target, out.masks, s.loss_norm)
        parts = {"mse": float(loss.detach())}
        if t.attention_losses and out.instance:
            cross = out.controller.cross_maps()
            att = 0
            for j, row in enumerate(out.instance):
                modifier, cls = t._row_tokens(out.ids[row].tolist())
                m, c = disendiff_maps(cross[j], modifier, cls)
                att = att + disendiff_attention_loss(m, c)
                if j == 0:
                    info.maps = torch.cat([m, c]).detach().cpu()
                    info.map_labels = [*t.tokens, *[f"{w} (class)" for w in t.words]]
            alpha = s.alpha / (4.0 if s.loss_norm == "mean" else 1.0)
            att = alpha * att / len(out.instance)
            parts["attention"] = float(att.detach())
            loss = loss + att
        return loss, parts
