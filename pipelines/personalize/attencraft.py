"""AttenCraft (arXiv 2405.17965) on the common trainer: its settings, with the paper's defaults,
and what it adds to training (docs/methods/personalize.md).

Prompts ``"a photo of <new1> and <new2>"`` with a uniformly sampled concept subset (the full
prompt on every mask-refresh step); masks from self-attention-propagated cross-attention
(initialised at t < `init_t_max`, refreshed every `refresh_every` steps and kept unless the new
ones are distinct and SSIM >= `ssim_threshold` similar); loss = masked MSE on the instance rows
(inside the union of the prompt's concept masks) + prior MSE + JSD(softmax(C_k), softmax(B(k)))
over the prompt's tokens and the background (start-of-text) token.  The map math is
`attention_processors.personalize`.

torch is imported inside the methods, so the command line reads the settings without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import UserInputError
from ..settings import setting
from .base import MAX_STEPS, MAX_WEIGHT, PRIOR, Method, PersonalizeSettings, per_method


@dataclass(frozen=True)
class AttenCraftSettings(PersonalizeSettings):
    """AttenCraft's settings with the paper's defaults: the one place they live; the CLI flags
    and the tab's controls are made from these fields."""

    steps: int = per_method("steps", 500)
    lr: float = per_method("lr", 1e-4)  # the paper's 5e-5 x 2 for prior preservation
    batch_size: int = per_method("batch_size", 1)  # + as many prior rows
    grad_accum: int = per_method("grad_accum", 1)
    max_grad_norm: float | None = per_method("max_grad_norm", 1.0)
    augment: bool = per_method("augment", False)
    checkpoint_every: int = per_method("checkpoint_every", 100)
    sample_guidance: float = per_method("sample_guidance", 7.5)
    tau: float = setting(0.1, "label margin of the attention masks", label="The margin tau",
                         minimum=0, maximum=0.99, step=0.01)
    refresh_every: int = setting(20, "steps between mask refreshes", label="The mask refresh interval",
                                 minimum=1, maximum=MAX_STEPS)
    full_prompt_every: int = setting(20, "the full prompt every N steps (else a random concept subset)",
                                     label="The full-prompt interval", minimum=1, maximum=MAX_STEPS)
    ssim_threshold: float = setting(0.8, "refreshed masks are kept when this SSIM-similar to the old",
                                    label="The SSIM threshold", minimum=0, maximum=1)
    init_t_max: int = setting(300, "the masks are initialised at a timestep below this",
                              label="The initial masks' timestep limit", minimum=1, maximum=1000)
    init_retries: int = setting(5, "tries of the mask initialisation (ours)",
                                label="The mask initialisation tries", minimum=1, maximum=100)
    jsd_weight: float = setting(1.0, "weight of the JSD attention loss", label="The JSD weight",
                                minimum=0, maximum=MAX_WEIGHT)
    jsd_temperature: float = setting(1.0, "softmax temperature of the JSD", label="The JSD temperature",
                                     above=0, maximum=MAX_WEIGHT)
    prior_weight: float = setting(1.0, "weight of the prior-preservation loss", label="The prior weight",
                                  minimum=0, maximum=MAX_WEIGHT)
    prior_prompt: str = setting("a photo at the beach", "prompt of the regularisation images",
                                label="The prior prompt")

    PAPER_BASE: ClassVar[str] = "SD 2.1-base"
    MAX_CONCEPTS: ClassVar[int] = 2
    INIT_IDS: ClassVar[tuple[int, ...]] = (42170, 47629, 43514)  # "ktn+pll+ucd"
    SAMPLE_ETA: ClassVar[float] = 0.0
    SAMPLE_SCHEDULER: ClassVar[str | None] = None  # the checkpoint's own

    def check(self) -> None:
        if self.prior_images < 1:
            raise UserInputError("AttenCraft needs prior-preservation images; set the number of prior images "
                                 "to 1 or more.")


def concept_spans(ids: list[int], tokenizer) -> list[list[int]]:
    """AttenCraft's concept spans: tokens between "of"/"and" and the next "and"/EoT (first EoT)."""
    eot = tokenizer.eos_token_id
    of_id = tokenizer("of", add_special_tokens=False).input_ids[0]
    and_id = tokenizer("and", add_special_tokens=False).input_ids[0]
    end = ids.index(eot) if eot in ids else len(ids)
    spans, current = [], None
    for i, t in enumerate(ids[:end]):
        if t in (of_id, and_id):
            if current:
                spans.append(current)
            current = []
        elif current is not None:
            current.append(i)
    if current:
        spans.append(current)
    return spans


def uniform_subset_sampler(step: int, stats: dict, n: int, generator, full_every: int = 20) -> list[int]:
    """AttenCraft's default: the full prompt every `full_every` steps; else one of {c1}, {c2},
    {c1, c2} uniformly (pair in random order).  For n concepts: every non-empty subset."""
    import torch

    if step % full_every == 0:
        return list(range(n))
    subsets = [[i] for i in range(n)] + ([list(range(n))] if n > 1 else [])
    pick = subsets[int(torch.randint(len(subsets), (1,), generator=generator))]
    if len(pick) > 1:
        pick = [pick[i] for i in torch.randperm(len(pick), generator=generator).tolist()]
    return pick


class AttenCraft(Method):
    """AttenCraft's prompts and concept subsets, [instance, prior] batches, masks and JSD loss.

    The masks live on the trainer (`trainer.masks`: (K, h, w) binary, concepts then the
    background; `trainer.assignment`: the token of each), which checkpoints them and writes them
    into the learned file.
    """

    title = "AttenCraft"
    summary = "attention masks + JSD"
    settings = AttenCraftSettings

    def prior_prompt(self) -> str:
        return self.trainer.settings.prior_prompt

    def instance_caption(self, prefix: str = "") -> str:
        return "a photo of " + " and ".join(self.trainer.tokens)

    def batch_rows(self, step: int) -> tuple[list[tuple], list[int]]:
        from attention_processors.personalize import INSTANCE

        t, s = self.trainer, self.trainer.settings
        if step % s.refresh_every == 0:
            subset = list(range(t.n))
        elif t.subset_sampler is not None:
            subset = list(t.subset_sampler(step, {"losses": t.losses}))
        else:
            subset = uniform_subset_sampler(step, {}, t.n, t.generator, s.full_prompt_every)
        rows = []
        for _ in range(s.batch_size):
            latents, mask, _ = t._instance_row()
            rows.append((latents, mask, "a photo of " + " and ".join(t.tokens[i] for i in subset), INSTANCE))
        if s.prior_images > 0:
            for _ in range(s.batch_size):
                rows.append((*t._prior_row(), PRIOR))
        return rows, subset

    def refresh_due(self, step: int) -> bool:
        return self.trainer.attention_losses and step % self.trainer.settings.refresh_every == 0

    def prepare(self) -> None:
        self.init_masks()

    def loss(self, batch: dict, out, refresh: bool, info):
        import torch
        import torch.nn.functional as F

        from attention_processors.personalize import attencraft_loss_maps, jsd, union_mask

        from .common import masked_mse

        t, s = self.trainer, self.trainer.settings
        inst, prior, subset = out.instance, out.prior, batch["subset"]
        pred, target = out.pred, out.target
        if refresh:
            self._refresh_masks(out.controller, out.ids[inst[0]].tolist())
        lat_hw = tuple(pred.shape[-2:])
        if t.attention_losses and t.masks is not None:
            t2m = {tok: j for j, tok in enumerate(t.assignment)}
            u = union_mask(t.masks.to(t.device), t2m, subset, lat_hw)
            inst_mask = out.masks[inst] * u[None, None]
        else:
            inst_mask = out.masks[inst]
        l_inst = masked_mse(pred[inst], target[inst], inst_mask, s.loss_norm)
        loss = l_inst
        parts = {"instance": float(l_inst.detach())}
        if prior:
            l_prior = F.mse_loss(pred[prior].float(), target[prior].float())
            loss = loss + s.prior_weight * l_prior
            parts["prior"] = float(l_prior.detach())
        if t.attention_losses and t.masks is not None:
            cross = out.controller.cross_maps()
            grid = tuple(t.masks.shape[-2:])
            temp = float(s.jsd_temperature)
            total = 0
            for j, row in enumerate(inst):
                modifier, _ = t._row_tokens(out.ids[row].tolist())
                order = list(subset)  # concept index of each modifier, in prompt order
                token_cols = modifier + [0]
                concept_of = order + [t.n]
                cmaps = attencraft_loss_maps(cross[j][token_cols], grid)
                d = []
                for cmap, concept in zip(cmaps, concept_of):
                    target_mask = t.masks[t2m[concept]].to(cmap)
                    d.append(jsd((cmap.flatten() / temp).softmax(-1), (target_mask.flatten() / temp).softmax(-1)))
                total = total + torch.stack(d).mean()
                if j == 0:
                    info.maps = cmaps.detach().cpu()
                    info.map_labels = [t.tokens[c] for c in order] + ["background (SoT)"]
            l_jsd = s.jsd_weight * total / len(inst)
            parts["jsd"] = float(l_jsd.detach())
            loss = loss + l_jsd
        if t.masks is not None:
            info.masks = t.masks.cpu()
            info.mask_labels = [self._token_label(tok) for tok in t.assignment]
        return loss, parts

    # ------------------------------------------------------------------ masks

    def _token_label(self, token: int) -> str:
        t = self.trainer
        return "background" if token == t.n else f"{t.tokens[token]} {t.words[token]}"

    def _mask_inputs(self, controller, ids_row: list[int]):
        modifier, _ = self.trainer._row_tokens(ids_row)
        cross = controller.cross_maps()[0].detach()[modifier + [0]]
        s = controller.self_map()[0]
        return cross, s, controller.self_grid

    def _refresh_masks(self, controller, ids_row: list[int]) -> bool:
        from attention_processors.personalize import accept_refresh, attencraft_masks

        t, s = self.trainer, self.trainer.settings
        cross, self_map, grid = self._mask_inputs(controller, ids_row)
        masks, assignment, _ = attencraft_masks(cross, self_map, grid, float(s.tau))
        if accept_refresh(t.masks, masks, assignment, t.n, float(s.ssim_threshold)):
            t.masks, t.assignment = masks.cpu(), assignment
            return True
        return False

    def init_masks(self) -> None:
        """The mask initialisation: full prompt, t ~ U[0, init_t_max), retried (no optimiser step)."""
        import torch

        from attention_processors.personalize import INSTANCE, attencraft_masks

        t, s = self.trainer, self.trainer.settings
        if t.masks is not None or not t.attention_losses:
            return
        with torch.no_grad():
            for _ in range(s.init_retries):
                latents, mask, caption = t._instance_row()
                timesteps = torch.randint(0, s.init_t_max, (1,), generator=t.generator)
                noise = torch.randn(latents.shape, generator=t.generator)
                batch = {"latents": latents, "masks": mask[None], "captions": [caption], "roles": (INSTANCE,),
                         "timesteps": timesteps, "noise": noise}
                _, _, controller, ids = t.forward(batch, capture_self=True)
                cross, self_map, grid = self._mask_inputs(controller, ids[0].tolist())
                masks, assignment, _ = attencraft_masks(cross, self_map, grid, float(s.tau))
                if assignment is not None:
                    t.masks, t.assignment = masks.cpu(), assignment
                    return
        raise UserInputError(
            f"AttenCraft could not separate the concepts in the attention maps after {s.init_retries} "
            f"tries; try a smaller margin tau (now {s.tau}), e.g. 0.05."
        )
