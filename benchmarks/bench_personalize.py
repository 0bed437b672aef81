"""benchmarks/run.py personalize: one DisenDiff training step vs one plain Custom Diffusion step.

Both arms run one optimiser step (forward, losses, backward, AdamW) on the same fixed batch of
two rows at the same size, training the same tensors (every attn2 K/V + the new token rows);
the baseline has no attention capture and no attention loss (``attention_losses=False``: SOT
detach only, as Custom Diffusion).  `--breakdown` adds, against the same baseline:

- ``attencraft``: an ordinary AttenCraft step ([instance, prior] batch, JSD loss);
- ``attencraft_refresh``: an AttenCraft mask-refresh step (+ no-grad 32x32 self-attention
  capture, random-walk masks and SSIM gate; ~1 in 20 steps);
- ``custom_attencraft_batch``: Custom Diffusion on AttenCraft's batch (should equal the baseline).

One extra JSON line (before run.py's) reports the settings and the attention-map bytes held by
the controller: ``stored_map_bytes`` of a DisenDiff step and of an AttenCraft refresh step (the
our goal (docs/methods/personalize.md): at most 0.2 GB at 512 px on SD 2.1; the reference keeps about 3 GB).  peak memory
is run.py's peak_mem_ratio.  Goal: ratio <= 1.10.

Training needs float32 weights: with --dtype float16/bfloat16 the model is built in float32 and
the step runs under accelerate's autocast in that precision.

`--model sd21-random`: the SD 2.1-base architecture (UNet 865 M params, OpenCLIP-H text encoder
of 23 layers x 1024, SD VAE) from its public configs with seeded random weights; 512 px.
"""

from __future__ import annotations

import json

import torch

from benchmarks.common import load_model
from pipelines import models
from pipelines.backbones.sd import NOISE_SCHEDULE as SD_NOISE_SCHEDULE
from pipelines.errors import UserInputError

TASK = "personalize"


def sd21_random(device: torch.device, dtype: torch.dtype):
    """stabilityai/stable-diffusion-2-1-base's architecture with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, cross_attention_dim=1024,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDIMScheduler(**SD_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(pad_token="!"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.register_to_config(_name_or_path="sd21-random")
    return pipe


FULL_SIZE = {"sd21-random": sd21_random}


def _photo(size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    array = (rng.rand(size, size, 3) * 255).astype(np.uint8)
    array[size // 8: size // 2, size // 8: size // 2] = [230, 40, 40]
    array[size // 2: 7 * size // 8, size // 2: 7 * size // 8] = [40, 40, 230]
    return Image.fromarray(array)


def _attencraft_ready(trainer) -> None:
    """Start AttenCraft; on random weights the masks may not separate: plant masks (speed only)."""
    try:
        trainer.start()
    except UserInputError:
        grid = trainer.last_controller.self_grid
        masks = torch.zeros(3, *grid)
        h, w = grid
        masks[0, : h // 2, : w // 2] = 1
        masks[1, h // 2:, w // 2:] = 1
        masks[2] = 1 - masks[0] - masks[1]
        trainer.masks, trainer.assignment, trainer._started = masks, [0, 1, 2], True


def prepare(args):
    full = args.model in FULL_SIZE
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(args.dtype, "no")
    args.dtype = torch.float32  # trainable weights stay float32; autocast gives the precision
    pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    size = args.size = args.size or (512 if full else models.default_size(pipe)[0])
    photo = _photo(size)
    common = dict(size=size, mixed_precision=precision, prior_images=1, prior_steps=1, seed=0)

    def trainer(method, losses=True, **extra):
        from pipelines.personalize import Trainer

        t = Trainer(pipe, photo, "cat,dog", method, None, attention_losses=losses, **common, **extra)
        if method == "attencraft" and losses:
            _attencraft_ready(t)
        else:
            t.start()
        return t

    disendiff = trainer("disendiff", batch_size=2, grad_accum=1, augment=False)
    custom = trainer("disendiff", losses=False, batch_size=2, grad_accum=1, augment=False)
    batch_d = disendiff.make_batch(1)
    batch_d["roles"] = ("instance", "instance")  # both rows the target: the attention loss runs on both
    batch_d["captions"] = [disendiff.instance_caption()] * 2
    attencraft = trainer("attencraft", tau=0.05)
    custom_a = trainer("attencraft", losses=False, tau=0.05)
    batch_a = attencraft.make_batch(1)
    batch_a_full = attencraft.make_batch(0)

    def step(t, batch, refresh=False):
        return lambda: t.optimizer_step([batch], refresh=refresh)

    # stored maps of the controller after one step of each kind
    step(disendiff, batch_d)()
    disendiff_bytes = disendiff.last_controller.stored_bytes()
    step(attencraft, batch_a_full, refresh=True)()
    refresh_bytes = attencraft.last_controller.stored_bytes()
    print(json.dumps({"personalize_settings": {
        "backbone": models.family(pipe), "size": size, "rows_per_step": 2, "mixed_precision": precision,
        "capture_layers": len(disendiff.capture_layers), "self_layers": len(disendiff.self_layers),
        "trainable_params": sum(p.numel() for p in disendiff.trainable),
        "stored_map_bytes_disendiff": disendiff_bytes, "stored_map_bytes_attencraft_refresh": refresh_bytes,
    }}))
    variants = {
        "attencraft": step(attencraft, batch_a),
        "attencraft_refresh": step(attencraft, batch_a_full, refresh=True),
        "custom_attencraft_batch": step(custom_a, batch_a),
    }
    return step(disendiff, batch_d), step(custom, batch_d), variants


def ops_probe(args, method, baseline, variants):
    """--breakdown: DisenDiff's extra forward operators per controlled attention call against
    Custom Diffusion's (whose attn2 layers are controlled too: SOT detach; the backward pass
    runs outside the layer calls and is in total_ops only).  No goal."""
    return {"scopes": {}, "report": None}
