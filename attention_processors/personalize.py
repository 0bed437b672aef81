"""DisenDiff and AttenCraft personalization: the attention policy and the attention-map math.

The controller (`PersonalizeAttention`) does three things during a training forward:

- **SOT detach** (Custom Diffusion, both methods): in every ``attn2`` layer the key and value
  rows of text token 0 (start of text) are replaced by their detached copies: same values, no
  gradient into ``to_k``/``to_v`` through them.
- **Cross capture with gradients** on the capture layers (`capture_layers`): the processor
  computes P = softmax(QK^T/sqrt(d)) explicitly in float32, returns P·V as the output and keeps
  the head-mean of P for the *instance* rows in the autograd graph (DisenDiff's IoU losses,
  AttenCraft's JSD loss).  Only those rows and only the head-mean are stored.
- **Self capture without gradients** (AttenCraft mask refresh steps only, `capture_self=True`):
  on the `self_layers` (one level finer than the capture layers), the head-mean self-attention
  of the instance rows is added to a running float32 sum under ``torch.no_grad`` (the output
  itself still comes from SDPA).  Nothing N x N is kept per layer or per head.

Every other attention layer keeps its stock fused-SDPA processor; the non-capture ``attn2``
layers run SDPA on the SOT-detached key/value.

torch.compile.  The layer calls write only per-forward scratch (this forward's cross maps, self
sum and count), which `begin_forward` folds into the totals eagerly and empties in place before
every forward, so a compiled denoiser finds the same Python structure at every forward (no graph
break, no recompilation); the readers (`cross`, `cross_maps`, `self_map`, `stored_bytes`) fold
first.  A layer's cross map of a later forward replaces the earlier one, as before.

Layer choice.  The papers' code uses SD 1.5/2.1 layers (docs/methods/personalize.md): the 16x16 cross-attentions
``down_blocks.2.attentions.{0,1}`` and ``up_blocks.1.attentions.{0,1,2}`` (transformer block 0),
and for AttenCraft's self-attention the 32x32 ``down_blocks.1.attentions.{0,1}`` and
``up_blocks.2.attentions.{0,1,2}``.  Generalisation (ours), so that small models (our 64 px
`tiny`, 16x16-latent `builtin`) work too: the capture level is the *second-coarsest* UNet level
that has cross-attention (the mid block counts as the coarsest), and the self-attention level is
the next finer one; only ``transformer_blocks.0`` of down/up blocks is used.  On SD 1.x/2.x this
rule yields exactly the papers' layer names (a test checks it on an SD-layout UNet).  Grid sizes
always come from the latent size (``state.grid``), never from 512 px or a VAE factor of 8.

Row roles: the trainer writes ``state.row_roles``, one role per batch row (e.g. ``("instance",
"prior")``), or one role per equal chunk as elsewhere in the project; captures keep only the
rows whose role is ``"instance"``.

The map math (pure torch, no files) also lives here: min-max, DisenDiff's Gaussian smoothing
and soft IoU, AttenCraft's random-walk masks, margin labels, assignment, SSIM gate and JSD.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from . import layers as _layers
from .core import AttentionCall, AttentionController, ControlState

INSTANCE = "instance"


# ----------------------------------------------------------------------------- layer selection


def personalization_layers(layer_names: Iterable[str], n_down: int, n_up: int) -> dict[str, list[str]]:
    """{"attn2": every cross-attention layer, "capture": the cross-capture layers, "self": the
    self-attention layers of AttenCraft's masks} for a UNet with `n_down`/`n_up` blocks.

    See the module docstring for the rule; on SD 1.x/2.x it gives the papers' names.  The sets
    are `layers.cross_attention` / `layers.self_attention` at one UNet level.
    """
    names = list(layer_names)
    attn2 = _layers.cross_attention(names)
    levels = _layers.unet_levels(attn2, n_down, n_up)  # ascending; the mid block is the coarsest
    if not levels:
        raise ValueError("this UNet has no cross-attention layers")
    cross_level = levels[-2] if len(levels) > 1 else levels[-1]
    self_level = max(cross_level - 1, 0)
    at = dict(section=("down", "up"), unet_depth=n_down, up_depth=n_up, transformer_block=0)
    capture = _layers.cross_attention(names, level=cross_level, **at)
    self_layers = _layers.self_attention(names, level=self_level, **at)
    return {"attn2": attn2, "capture": capture, "self": self_layers}


def unet_personalization_layers(unet) -> dict[str, list[str]]:
    """`personalization_layers` for a diffusers UNet2DConditionModel."""
    from .core import attention_layer_names

    return personalization_layers(attention_layer_names(unet), len(unet.config.down_block_types),
                                  len(unet.config.up_block_types))


# ----------------------------------------------------------------------------- the controller


def detach_sot(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N_k, D) keys or values with row 0 (start of text) detached: same values."""
    return torch.cat([x[:, :, :1].detach(), x[:, :, 1:]], dim=2)


def role_rows(state: ControlState, batch_size: int, role: str = INSTANCE) -> list[int]:
    """Batch rows of `role`: one role per row, or one role per equal chunk of rows."""
    roles = state.row_roles
    if len(roles) == batch_size:
        return [i for i, r in enumerate(roles) if r == role]
    if role not in roles:
        return []
    s = state.rows(role, batch_size)
    return list(range(s.start, s.stop))


class PersonalizeAttention(AttentionController):
    """Capture policy of DisenDiff and AttenCraft training (see the module docstring).

    attn2_layers: every cross-attention layer (SOT detach); capture_layers: cross capture with
    gradients; self_layers: no-grad self capture, installed only when `capture_self` is True at
    `attach` time (AttenCraft's refresh steps).  `capture_cross=False` keeps only the SOT detach
    (plain Custom Diffusion training).
    """

    def __init__(self, attn2_layers: Iterable[str], capture_layers: Iterable[str], self_layers: Iterable[str] = (),
                 capture_cross: bool = True, capture_self: bool = False, sot_detach: bool = True,
                 state: ControlState | None = None):
        super().__init__(state)
        self.attn2_layers = set(attn2_layers)
        self.capture_layers = set(capture_layers)
        self.self_layers = set(self_layers)
        self.capture_cross = capture_cross
        self.capture_self = capture_self
        self.sot_detach = sot_detach
        self.reset()

    def reset(self) -> None:
        """Forget every capture.  The buffers are emptied in place: the compiled layers keep
        finding the same objects (and the same empty structure) at the start of every forward."""
        if not hasattr(self, "_cross"):
            self._cross: dict[str, torch.Tensor] = {}  # layer -> (b_inst, N_img, T), in the graph
            # this forward's captures, empty at the start of every forward (`begin_forward`) and
            # folded into the totals eagerly, so the layer calls see the same Python structure at
            # every step (no recompilation under torch.compile)
            self._forward_cross: dict[str, torch.Tensor] = {}
        self._cross.clear()
        self._forward_cross.clear()
        self._self_sum: torch.Tensor | None = None  # (b_inst, N, N) float32, no graph
        self._self_count = 0
        self._forward_self_sum: torch.Tensor | None = None  # this forward's sum over self layers
        self._forward_self_count = 0
        self.cross_grid: tuple[int, int] | None = None
        self.self_grid: tuple[int, int] | None = None

    def begin_forward(self) -> None:
        self._fold()

    def _fold(self) -> None:
        """Move this forward's captures into the totals (eagerly, outside any compiled region):
        a layer's cross map replaces the one of an earlier forward, self sums add up."""
        if self._forward_cross:
            self._cross.update(self._forward_cross)
            self._forward_cross.clear()
        if self._forward_self_sum is not None:
            pending = self._forward_self_sum
            with torch.no_grad():
                self._self_sum = pending if self._self_sum is None else self._self_sum.add_(pending)
            self._self_count += self._forward_self_count
            self._forward_self_sum = None
            self._forward_self_count = 0

    @property
    def cross(self) -> dict[str, torch.Tensor]:
        """{layer: (b_inst, N_img, T) head-mean cross-attention of the instance rows}, in the graph."""
        self._fold()
        return self._cross

    def select(self, name: str) -> bool:
        return name in self.attn2_layers or (self.capture_self and name in self.self_layers)

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        if call.kind != "cross":
            return None  # self-attention: SDPA, read in capture()
        if self.sot_detach:
            call.key, call.value = detach_sot(call.key), detach_sot(call.value)
        q, k, v = call.query, call.key, call.value
        if not (self.capture_cross and call.name in self.capture_layers):
            return call.sdpa(q, k, v, attn_mask=call.attn_mask, scale=call.logit_scale)
        logits = q.float() @ (k.float() * call.scale).transpose(-1, -2)
        if call.attn_mask is not None:
            logits = logits + call.attn_mask.float()
        probs = logits.softmax(-1)
        rows = role_rows(call.state, call.batch_size)
        if rows:
            self._forward_cross[call.name] = probs[rows].mean(1)  # head-mean at once; keeps the graph
            self.cross_grid = call.grid
        return probs.to(v.dtype) @ v

    def capture(self, call: AttentionCall) -> None:
        if call.kind != "self" or not self.capture_self or call.name not in self.self_layers:
            return
        rows = role_rows(call.state, call.batch_size)
        if not rows:
            return
        with torch.no_grad():
            q = call.query[rows].float()
            k = call.key[rows].float() * call.scale
            total = None
            for h in range(q.shape[1]):  # one head at a time: one N x N matrix alive
                p = (q[:, h] @ k[:, h].transpose(-1, -2)).softmax(-1)
                total = p if total is None else total.add_(p)
            mean = total / q.shape[1]
            pending = self._forward_self_sum
            self._forward_self_sum = mean if pending is None else pending.add_(mean)
            self._forward_self_count += 1
            self.self_grid = call.grid

    def cross_maps(self) -> torch.Tensor:
        """Layer- and head-mean cross-attention (b_inst, T, h, w), in the autograd graph."""
        cross = self.cross
        if not cross:
            raise RuntimeError("no cross-attention was captured: no capture layer ran")
        mean = torch.stack(list(cross.values())).mean(0)
        b, n, t = mean.shape
        h, w = self.cross_grid
        return mean.transpose(1, 2).reshape(b, t, h, w)

    def self_map(self) -> torch.Tensor:
        """Layer- and head-mean self-attention (b_inst, N, N), float32, no graph."""
        self._fold()
        if self._self_sum is None:
            raise RuntimeError("no self-attention was captured (capture_self is off or no self layer ran)")
        return self._self_sum / self._self_count

    def stored_bytes(self) -> int:
        """Bytes of the attention maps this controller holds (cross head-means + self sum)."""
        total = sum(t.numel() * t.element_size() for t in self.cross.values())
        if self._self_sum is not None:
            total += self._self_sum.numel() * self._self_sum.element_size()
        return total


# ----------------------------------------------------------------------------- map math

#: DisenDiff's 1-D smoothing weights: exp(-((x-mu)/(2 sigma))^2), sigma 0.5, x in {0,1,2}, normalised.
GAUSS_SIGMA = 0.5


def gaussian_kernel_1d(sigma: float = GAUSS_SIGMA) -> torch.Tensor:
    """DisenDiff's non-standard 3-tap kernel: [0.2119, 0.5761, 0.2119] for sigma 0.5."""
    x = torch.arange(3, dtype=torch.float64)
    g = torch.exp(-(((x - 1.0) / (2 * sigma)) ** 2))
    return (g / g.sum()).float()


def gaussian_kernel_2d(sigma: float = GAUSS_SIGMA) -> torch.Tensor:
    g = gaussian_kernel_1d(sigma)
    return torch.outer(g, g)


def minmax(x: torch.Tensor, dims: tuple[int, ...] = (-2, -1), eps: float = 1e-8) -> torch.Tensor:
    """(x - min) / (max - min + eps) over `dims`."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def smooth(x: torch.Tensor, sigma: float = GAUSS_SIGMA) -> torch.Tensor:
    """DisenDiff's G: reflect-pad 1, 3x3 depthwise convolution; x is (..., h, w)."""
    lead = x.shape[:-2]
    y = x.reshape(-1, 1, *x.shape[-2:])
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    y = F.conv2d(y, gaussian_kernel_2d(sigma).to(y)[None, None])
    return y.reshape(*lead, *x.shape[-2:])


def soft_iou(x: torch.Tensor, y: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """(sum XY + s) / (sum X + sum Y - sum XY + s) over the last two dims."""
    inter = (x * y).sum((-2, -1))
    return (inter + smoothing) / (x.sum((-2, -1)) + y.sum((-2, -1)) - inter + smoothing)


def disendiff_maps(cross: torch.Tensor, modifier_idx: list[int], class_idx: list[int],
                   sigma: float = GAUSS_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """M_i = G(minmax(A_mod_i)) and C_i = G(minmax(A_cls_i))**2 of one row; cross is (T, h, w)."""
    m = smooth(minmax(cross[modifier_idx]), sigma)
    c = smooth(minmax(cross[class_idx]), sigma) ** 2
    return m, c


def disendiff_attention_loss(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - IoU(sg(C_i), M_i)) + L_s&s, with L_s&s the mean pairwise IoU(C_i, C_j)."""
    bind = (1 - soft_iou(c.detach(), m)).sum()
    n = c.shape[0]
    pairs = [soft_iou(c[i], c[j]) for i in range(n) for j in range(i + 1, n)]
    separate = torch.stack(pairs).mean() if pairs else c.new_zeros(())
    return bind + separate


def jsd(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-16) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) of distributions over the last dim."""
    m = 0.5 * (p + q)
    kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(-1)
    kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def upsample(x: torch.Tensor, grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """(..., h, w) -> (..., *grid)."""
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]).float(), size=tuple(grid), mode=mode, align_corners=False)
    return y.reshape(*lead, *grid)


def attencraft_loss_maps(cross: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """C_k: cross maps (K, h, w) bicubic-upsampled to the mask grid, then min-max (keeps the graph)."""
    return minmax(upsample(cross, grid))


def attencraft_masks(cross: torch.Tensor, self_attn: torch.Tensor, grid: tuple[int, int],
                     tau: float = 0.1) -> tuple[torch.Tensor, list[int] | None, torch.Tensor]:
    """AttenCraft's masks from one instance row.

    cross: (K, h, w) cross maps of the K tokens (concepts first, SoT last); self_attn: (N, N)
    with N = grid cells.  Returns (binary masks (K, *grid) float, assignment or None if two
    masks claim the same token, refined maps M (K, *grid)).  Mask j comes from label j; its
    assigned token is ``assignment[j]``.
    """
    with torch.no_grad():
        p = minmax(upsample(cross.float(), grid) ** 2)  # squared before min-max: the mask map
        s = minmax(self_attn.float(), dims=(-2, -1))
        a = s @ s
        a = minmax(a @ a, dims=(-2, -1))  # minmax(S^4), two squarings
        k = p.shape[0]
        m = (p.reshape(k, -1) @ a.T).reshape(k, *grid)  # M_k = A . vec(P_k)
        m = minmax(m)
        masks = torch.zeros_like(m)
        for i in range(k):
            others = [j for j in range(k) if j != i]
            masks[i] = ((m[i] - m[others]) > tau).all(0).float()
        scores = (masks[:, None] * m[None]).sum((-2, -1))  # [mask, token]
        assignment = scores.argmax(1).tolist()
        if len(set(assignment)) != k or any(masks[i].sum() == 0 for i in range(k)):
            return masks, None, m
        return masks, assignment, m


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, data_range: float = 1.0) -> float:
    """Mean SSIM of two (h, w) images with a uniform window (as scikit-image's default: sample
    covariance, borders of window//2 cropped); the window shrinks (odd) for grids below 7."""
    window = min(window, x.shape[-1], x.shape[-2])
    window -= 1 - window % 2
    x = x.double()[None, None]
    y = y.double()[None, None]
    n = window * window
    cov_norm = n / (n - 1) if n > 1 else 1.0

    def filt(z):
        return F.avg_pool2d(z, window, stride=1)

    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def accept_refresh(old: torch.Tensor | None, new: torch.Tensor, assignment: list[int] | None,
                   n_objects: int, threshold: float = 0.8) -> bool:
    """AttenCraft's gate: distinct assignments and SSIM(new, old) >= threshold for every object mask."""
    if assignment is None:
        return False
    if old is None:
        return True
    return all(ssim(new[i], old[i]) >= threshold for i in range(n_objects))


def union_mask(masks: torch.Tensor, token_to_mask: dict[int, int], tokens: list[int],
               latent_hw: tuple[int, int]) -> torch.Tensor:
    """U: union of the masks of `tokens`, bicubic-upsampled to the latent grid, clamped to [0, 1]."""
    union = torch.stack([masks[token_to_mask[t]] for t in tokens]).amax(0)
    return upsample(union, latent_hw).clamp(0, 1)

