"""benchmarks/run.py eraser: Attentive Eraser against the plain diffusers img2img pipeline with CFG.

Both make the same model evaluations: int(steps * 0.8) steps of one UNet call on a batch of two
(the eraser's [normal, aas] rows; img2img's [uncond, cond] rows), one VAE encode and one decode
of the same image.  Variants (--breakdown):

- "eager": the eraser with explicit softmax attention in every attention layer, AAS and SS done on
  the probability matrices, as the reference code does it (MasaCtrl-style full attention
  everywhere);
- "no_ss": the eraser without similarity suppression (the cost of the second temperature).

    python benchmarks/run.py eraser --model sdxl-random --steps 10 --breakdown   # GPU, 1024 px
    python benchmarks/run.py eraser --model tiny --steps 4 --breakdown           # CPU, 64 px

Logged with each number (stderr): backbone, mode, defaults and seed.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

import pipelines.eraser as eraser
from attention_processors.attentive_eraser import AAS, AttentiveEraserAAS, is_aas_layer
from benchmarks.common import load_model
from pipelines import models
from pipelines.backbones.sd import NOISE_SCHEDULE as SD_NOISE_SCHEDULE

TASK = "eraser"
SEED = 0
STRENGTH = 0.8


def sdxl_random(device: torch.device, dtype: torch.dtype):
    """SDXL base 1.0's architecture (the public configs of its UNet, both text encoders and the
    VAE) with seeded random weights, built directly on `device`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    scheduler = EulerDiscreteScheduler(**SD_NOISE_SCHEDULE,
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return pipe.to(device=device, dtype=dtype)


FULL_SIZE = {"sdxl-random": sdxl_random}


def scene(size: int) -> tuple[Image.Image, np.ndarray]:
    """A smooth background with a disc "object"; the mask is the disc (about 11% of the image)."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.3 + 0.4 * x, 0.5 + 0.3 * np.sin(6 * y), 0.6 - 0.3 * x * y], -1)
    disc = (x - 0.55) ** 2 + (y - 0.5) ** 2 < 0.19 ** 2
    image[disc] = (0.9, 0.2, 0.1)
    return Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255)), disc


class EagerAAS(AttentiveEraserAAS):
    """The reference implementation's cost model: explicit softmax(QK^T) V in every attention
    layer (all of them, not only the edited ones), AAS bias and SS blend on the matrices."""

    def select(self, name: str) -> bool:
        return True

    def attend(self, call):
        q, k, v = call.query, call.key, call.value
        sim = (q @ k.transpose(-1, -2)) * call.scale
        if call.attn_mask is not None:
            sim = sim + call.attn_mask
        edited = is_aas_layer(call.name) and AAS in call.state.row_roles and self.aas_active(call.state.step)
        if not edited:
            return sim.softmax(-1) @ v
        rows = call.rows(AAS)
        gm = self.grid_masks(call.grid, rows.stop - rows.start, q.device)
        tokens = gm.tokens[:, None, None, :]
        aas = sim[rows].masked_fill(tokens, torch.finfo(sim.dtype).min)
        out_aas = aas.softmax(-1) @ v[rows]
        if self.ss_active(call.state.step):
            fg = (self.ss_scale * sim[rows]).masked_fill(tokens, torch.finfo(sim.dtype).min).softmax(-1) @ v[rows]
            out_aas = torch.where(gm.tokens[:, None, :, None], fg, out_aas)
        out = sim.softmax(-1) @ v
        out[rows] = out_aas
        return out


@contextmanager
def _policy(cls):
    saved = eraser.AttentiveEraserAAS
    eraser.AttentiveEraserAAS = cls
    try:
        yield
    finally:
        eraser.AttentiveEraserAAS = saved


def prepare(args):
    """Method: `pipelines.eraser.erase` (SIP, the defaults).  Baseline: diffusers img2img with CFG."""
    import diffusers

    pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    size = args.size = args.size or (1024 if args.model in FULL_SIZE else 64)
    image, mask = scene(size)
    backbone = models.backbone(pipe)
    # the eraser's own DDIM schedule on the baseline too, so both make int(steps * 0.8) UNet calls
    # (the tiny model's PNDM would add one)
    plain = getattr(diffusers, backbone.img2img_class).from_pipe(
        pipe, scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **eraser.DDIM_CONFIG))
    plain.set_progress_bar_config(disable=True)
    options = dict(seed=SEED, steps=args.steps, strength=STRENGTH, guidance=9.0, ss_steps=9, ss_scale=0.3,
                   mode="sip", crop="never", working_side=size, progress=False)
    print(json.dumps({"eraser_settings": {**options, "backbone": backbone.name, "size": size, "mask_fraction":
                      round(float(mask.mean()), 3), "baseline": type(plain).__name__, "baseline_guidance": 7.5}}),
          file=sys.stderr)

    def method():
        eraser.erase(pipe, image, mask, **options)

    def baseline():
        plain(prompt="", negative_prompt="", image=image, strength=STRENGTH, num_inference_steps=args.steps,
              guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED))

    def eager():
        with _policy(EagerAAS):
            method()

    def no_ss():
        eraser.erase(pipe, image, mask, **{**options, "ss_steps": -1})

    return method, baseline, {"eager": eager, "no_ss": no_ss}


def ops_probe(args, method, baseline, variants):
    """--breakdown: the eraser's extra operators per edited self-attention call, and the goal
    that the token masks (the bias, or the kept keys on the shared-mask path) are built once per
    step and layer grid: every call of `grid_masks` after the first of its (step, grid) within a
    step must run 0 operators."""
    from attention_processors.attentive_eraser import GridMasks
    from benchmarks.common import goal

    def where(controller, grid, n_rows, device):
        return (controller.state.step, tuple(grid))

    def report(method_ops, stock_ops, count):
        seen, first, later = set(), [], []
        for record in method_ops.of("grid_masks"):
            (first if record.info not in seen else later).append(record.ops)
            seen.add(record.info)
        bias = method_ops.of("bias_for")
        later_max = max(later, default=0)
        return {
            "mask_building": {
                "first_call_per_step_grid_ops": round(sum(first) / len(first), 2) if first else 0,
                "first_calls": len(first), "later_calls": len(later), "later_call_ops_max": later_max,
                "step_grids": sorted({f"{s}:{g[0]}x{g[1]}" for s, g in seen}),
                "bias_for_calls": len(bias), "bias_for_ops": sum(r.ops for r in bias),
            },
            "goals": [goal("mask/bias ops on 2nd+ call of a (step, grid)", later_max, 0)],
        }

    return {
        "scopes": {
            "grid_masks": (AttentiveEraserAAS, "grid_masks", where),
            "bias_for": (GridMasks, "bias_for", None),
        },
        "report": report,
    }
