"""Train the built-in model (`builtin`) on the shapes world.

    python -m pipelines.builtin.train --work runs/builtin --output assets/builtin

A Stable-Diffusion-architecture latent diffusion model, small enough to train on two CPU cores
in about an hour and to ship in the repository (< 25 MB):

- **VAE**: `AutoencoderKL`, three levels (32, 64, 64 channels), downsampling factor 4, four
  latent channels: a 64 px image becomes a 16x16x4 latent.  Trained first, alone, with an L1 +
  MSE reconstruction loss in which object pixels weigh 10 times more than background pixels
  (unweighted, 600 steps left small shapes blurred and purple turned red), and a small KL term; its `scaling_factor` is then set to 1/std of the
  latents, as SD's 0.18215 was.
- **Text encoder**: `CLIPTextModel` with the real CLIP tokenizer and vocabulary (49,408 ids,
  77 positions), 4 layers of width 64.  Version 2 (shipped): pre-trained by
  `pipelines.builtin.text_tower` and passed as `--text-encoder`, frozen, as SD conditions on a
  frozen CLIP; version 1 trained it from scratch jointly with the UNet (still the default
  without `--text-encoder`), and its token states collapsed (see the model card).  Version 2
  also reused version 1's VAE (`--vae`) and started from its UNet (`--init-unet`):

      python -m pipelines.builtin.text_tower --work runs/builtin --steps 1500
      python -m pipelines.builtin.train --work runs/builtin --vae assets/builtin/vae \
          --text-encoder runs/builtin/text_encoder --init-unet assets/builtin/unet
- **UNet**: `UNet2DConditionModel`, levels of 64/96/128 channels; cross-attention at 16x16 and
  8x8 (down and up), a cross-attention mid block at 4x4, self-attention (`attn1`) in every
  transformer block, so `up_blocks.*.attn1` exists for the eraser.  Layer names follow SD 1.x.
- **Objective**: epsilon prediction on SD's `scaled_linear` schedule (0.00085 -> 0.012, 1000
  steps), with Min-SNR-5 loss weighting (Hang et al. 2023; converges faster at this budget),
  10 % empty captions for classifier-free guidance, AdamW with warm-up and cosine decay, an EMA
  of the weights (the EMA is what ships).
- **Library pieces** (diffusers', not hand-written):
  `diffusers.optimization.get_cosine_schedule_with_warmup` for both stages' learning rate
  (linear warm-up from 0 over `--warmup` steps, 50 for the VAE, then a half cosine to 0 at the
  last step; stepped once per optimizer step, so step k, counted from 0, trains at
  peak * k / warmup, then at peak * (1 + cos(pi * (k - warmup) / (steps - warmup))) / 2);
  `diffusers.training_utils.compute_snr` for the Min-SNR-gamma weights min(SNR, gamma) / SNR, as
  diffusers' example training scripts compute them; `diffusers.training_utils.EMAModel`, one
  per module, with its default decay schedule (not `use_ema_warmup`): its first update copies
  the weights, its n-th (n counted from 1) uses min(`--ema`, n / (n + 9)), which reaches 0.998
  only at update 4,491, so over 3,000 steps the schedule, not the cap, sets the decay.
  The model in assets/builtin/ was trained by the hand-written versions these replaced, which
  differed in three details: the cosine ended at 10 % of the peak, not at 0 (0.1 peak rather
  than ~0 at the last step; the denoiser's mean rate was 0.547 peak, now 0.500); the warm-up
  trained step k at peak * (k + 1) / warmup (one step ahead: the first step now has rate 0); the
  EMA decay at the n-th update was min(`--ema`, (n + 1) / (n + 10)), also one step ahead
  (0.1818 at step 1, 0.9970100 at step 3000; now 0 and 0.9970090), and so weighed the random
  initial weights in (2/11 at step 1, 1.8e-25 of the shipped weights at step 3000).  The SNR
  weights are the old ones to float32 rounding (2.4e-7 at most).
- **Data**: fresh world scenes every step (seeds below `world.TEST_SEED_START`; never the
  benchmark seeds), captions drawn from every phrasing the world has.

The run is seeded and resumable: the full training state (weights, optimizer, and the learning-rate
schedule and the EMAs through their own `state_dict()`) is checkpointed atomically (temporary
file + rename) every `--checkpoint-every` steps into `--work`; rerunning the same command
continues from the last checkpoint with the same data and noise it would have drawn.  The data,
noise and timesteps of step k depend only on (seed, k), so an interrupted and resumed run
trains on exactly what an uninterrupted one does.

The shipped weights are stored in float16 (the registry loads them in the dtype asked for,
float32 on CPU); the model card `assets/builtin/README.md` records data, config, steps, loss,
time and the quality figures measured by `benchmarks/quality.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.backbones.sd import NOISE_SCHEDULE as SD_NOISE_SCHEDULE
from pipelines.builtin import world

IMAGE_SIZE = 64
VAE_BLOCKS = (32, 64, 64)
UNET_BLOCKS = (64, 96, 128)
TEXT_WIDTH = 64
TEXT_LAYERS = 4
EMPTY_CAPTION_RATE = 0.1
# World v2: this share of the scenes are backgrounds alone ("an empty striped background"), so
# the model has a prior for what a hole left by a removed object looks like.
EMPTY_SCENE_RATE = 0.1
MIN_SNR_GAMMA = 5.0
VAE_WARMUP = 50  # warm-up steps of the VAE's learning rate
OBJECT_WEIGHT = 10.0  # VAE loss weight of object pixels relative to background pixels

# Defaults for the built-in model (used by `python app.py generate --model builtin`): a sweep of
# guidance 2 to 7.5 on 48 test scenes changed no figure beyond noise, so SD's 7.5 is kept.
INFERENCE_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 7.5}


# --------------------------------------------------------------------------------------------
# Architecture


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder():
    from transformers import CLIPTextModel

    from pipelines.models import clip_text_config

    return CLIPTextModel(clip_text_config(TEXT_WIDTH, num_layers=TEXT_LAYERS, intermediate_size=4 * TEXT_WIDTH))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(VAE_BLOCKS) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_BLOCKS,
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        cross_attention_dim=TEXT_WIDTH,
    )


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        **SD_NOISE_SCHEDULE
    )


def inference_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SD_NOISE_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# --------------------------------------------------------------------------------------------
# Data


def scene_batch(step: int, batch_size: int, seed: int, stage: str, with_masks: bool = False):
    """Images (B,3,64,64 in [-1,1]) and captions of step `step`: a function of (seed, step).

    with_masks=True also returns (B,1,64,64) float masks of all objects (for the VAE's loss)."""
    rng = random.Random(f"{seed}-{stage}-{step}")
    images, texts, masks = [], [], []
    for _ in range(batch_size):
        scene_seed = rng.randrange(world.TEST_SEED_START)
        empty = rng.random() < EMPTY_SCENE_RATE
        scene = world.make_empty_scene(scene_seed) if empty else world.make_scene(scene_seed)
        images.append(scene.render(IMAGE_SIZE))
        if with_masks:
            masks.append(np.any(scene.masks(IMAGE_SIZE), axis=0) if scene.objects
                         else np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool))
        if rng.random() < EMPTY_CAPTION_RATE:
            texts.append("")
        else:
            texts.append(rng.choice(scene.captions()))
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    if not with_masks:
        return images, texts
    return images, texts, torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_atomic(state: dict, path: Path) -> None:
    """The checkpoint replaces the previous one only once it is completely written."""
    from pipelines.io import save_torch

    save_torch(state, path, "the training checkpoint")


def load_checkpoint(path: Path):
    if not path.is_file():
        return None
    # Our own checkpoint of plain tensors, dicts and numbers (written by save_atomic).
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpointed(state: dict, key: str, path: Path):
    """`state[key]`, or a clear refusal for checkpoints of the script before it used diffusers' pieces."""
    if key not in state:
        raise SystemExit(f"{path} has no {key!r}: it was written by an older version of this script "
                         "(hand-written EMA and learning-rate schedule); train into a fresh --work")
    return state[key]


# --------------------------------------------------------------------------------------------
# Optimisation pieces (diffusers' own; see the module docstring for how they count)


def lr_schedule(optimizer, total: int, warmup: int):
    """Linear warm-up from 0 to the optimizer's lr over `warmup` steps, then a half cosine to 0 at
    step `total`; call its `step()` after every `optimizer.step()`."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)


def make_ema(module: torch.nn.Module, decay: float):
    """An EMA of `module`'s parameters (the whole state_dict of our UNet and text encoder, which
    have no persistent buffers): its first `step()` copies the weights, its n-th uses the decay
    min(`decay`, n / (n + 9))."""
    from diffusers.training_utils import EMAModel

    return EMAModel(module.parameters(), decay=decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False)


def restore_ema(module: torch.nn.Module, state: dict, decay: float):
    """The EMA of `module` saved as `state` (an `EMAModel.state_dict()`)."""
    if "shadow_params" not in state:  # load_state_dict would keep the fresh copy of `module`
        raise SystemExit("the checkpoint's EMA is not an EMAModel state_dict: it was written by an older "
                         "version of this script; train into a fresh --work")
    ema = make_ema(module, decay)
    ema.load_state_dict(state)
    if [p.shape for p in ema.shadow_params] != [p.shape for p in module.parameters()]:
        raise ValueError(f"the saved EMA does not fit {type(module).__name__}")
    return ema


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction, min(SNR, gamma) / SNR, as in diffusers'
    example training scripts."""
    from diffusers.training_utils import compute_snr

    if scheduler.config.prediction_type != "epsilon":
        raise ValueError("these are the weights of epsilon prediction")
    snr = compute_snr(scheduler, timesteps)
    return torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr


def log(message: str, log_file: Path | None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if log_file is not None:
        with open(log_file, "a") as handle:
            handle.write(line + "\n")


# --------------------------------------------------------------------------------------------
# Stage 1: the VAE


def train_vae(args, work: Path, log_file: Path):
    torch.manual_seed(args.seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    # Made before the optimizer's state is loaded: a new schedule sets the optimizer's lr.
    lr_scheduler = lr_schedule(optimizer, args.vae_steps, VAE_WARMUP)
    path = work / "vae.pt"
    state = load_checkpoint(path)
    step = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        log(f"vae: resumed at step {step}", log_file)
    if step >= args.vae_steps:
        return vae, state.get("loss", float("nan"))
    if state is not None:
        lr_scheduler.load_state_dict(checkpointed(state, "lr_scheduler", path))
    vae.train()
    started, running = time.time(), None
    while step < args.vae_steps:
        torch.manual_seed(args.seed * 7919 + step)
        images, _, objects = scene_batch(step, args.vae_batch, args.seed, "vae", with_masks=True)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # Objects cover a few percent of the pixels but are what every method is judged on:
        # their pixels weigh OBJECT_WEIGHT times more than the background's.
        weights = 1.0 + (OBJECT_WEIGHT - 1.0) * objects
        error = reconstruction - images
        recon = ((error.abs() + error.square()) * weights).mean() / weights.mean()
        kl = posterior.kl().mean() / images[0].numel()
        loss = recon + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.vae_steps:
            log(f"vae step {step}/{args.vae_steps} loss {running:.4f} ({time.time() - started:.0f}s)", log_file)
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            save_atomic({"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(), "step": step, "loss": running}, path)
    return vae, running


@torch.no_grad()
def latent_scale(vae, seed: int, count: int = 512) -> float:
    """1 / std of the VAE's latents over `count` training scenes (SD's 0.18215 came the same way)."""
    vae.eval()
    latents = []
    for step in range(0, count, 64):
        images, _ = scene_batch(10_000 + step, min(64, count - step), seed, "scale")
        latents.append(vae.encode(images).latent_dist.mean)
    return float(1.0 / torch.cat(latents).std())


# --------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder


def encode_text(tokenizer, text_encoder, texts):
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def load_frozen_text_encoder(folder: Path):
    """A pre-trained text encoder (`text_tower.py`'s output), frozen, as SD conditions on a frozen CLIP."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(folder)
    if encoder.config.to_dict()["hidden_size"] != TEXT_WIDTH:
        raise SystemExit(f"{folder}: the text encoder's width is not {TEXT_WIDTH}")
    return encoder.float().eval().requires_grad_(False)


def train_denoiser(args, vae, work: Path, log_file: Path):
    from pipelines.tokenizers import clip_tokenizer

    torch.manual_seed(args.seed)
    unet, text_encoder = build_unet(), build_text_encoder()
    if args.init_unet:  # warm start (built-in v2 continued v1's UNet; see the model card)
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.init_unet).float().state_dict())
    frozen_text = args.text_encoder is not None
    if frozen_text:
        text_encoder = load_frozen_text_encoder(args.text_encoder)
    tokenizer = clip_tokenizer()
    scheduler = train_scheduler()
    modules = {"unet": unet} if frozen_text else {"unet": unet, "text_encoder": text_encoder}
    params = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    # Made before the optimizer's state is loaded: a new schedule sets the optimizer's lr.
    lr_scheduler = lr_schedule(optimizer, args.steps, args.warmup)
    ema = {name: make_ema(module, args.ema) for name, module in modules.items()}
    path = work / "denoiser.pt"
    state = load_checkpoint(path)
    step, running, history = 0, None, []
    if state is not None:
        unet.load_state_dict(state["unet"])
        if not frozen_text:
            text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(checkpointed(state, "lr_scheduler", path))
        ema = {name: restore_ema(module, checkpointed(state, "ema", path)[name], args.ema)
               for name, module in modules.items()}
        step, running, history = state["step"], state["loss"], state["history"]
        log(f"denoiser: resumed at step {step}", log_file)
    vae.eval().requires_grad_(False)
    scale = vae.config.scaling_factor
    unet.train()
    if not frozen_text:
        text_encoder.train()
    started = time.time()
    while step < args.steps:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        images, texts = scene_batch(step, args.batch, args.seed, "denoiser")
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        lr = optimizer.param_groups[0]["lr"]  # this step's, set by lr_scheduler
        with torch.set_grad_enabled(not frozen_text):
            text_states = encode_text(tokenizer, text_encoder, texts)
        prediction = unet(noisy, timesteps, text_states).sample
        weights = min_snr_weights(scheduler, timesteps)
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        for name, module in modules.items():
            ema[name].step(module.parameters())
        step += 1
        plain = per_sample.mean().item()
        running = plain if running is None else 0.99 * running + 0.01 * plain
        if step % 50 == 0 or step == args.steps:
            rate = (time.time() - started) / max(1, step - (state["step"] if state else 0))
            log(f"denoiser step {step}/{args.steps} mse {running:.4f} lr {lr:.2e} "
                f"({rate:.2f} s/step)", log_file)
            history.append((step, running))
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_atomic({"unet": unet.state_dict(), **({} if frozen_text else {"text_encoder": text_encoder.state_dict()}),
                         "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                         "ema": {name: e.state_dict() for name, e in ema.items()}, "step": step,
                         "loss": running, "history": history}, path)
    if frozen_text:
        ema["text_encoder"] = text_encoder  # shipped as it is
    return ema, running, history


# --------------------------------------------------------------------------------------------
# Export


def export(vae, ema: dict, output: Path, card: dict) -> None:
    """Write the EMA weights (`ema`: the `EMAModel` of "unet" and of "text_encoder") as a float16
    diffusers folder, atomically (temp folder + rename)."""
    from diffusers import StableDiffusionPipeline

    from pipelines.tokenizers import clip_tokenizer

    unet, text_encoder = build_unet(), build_text_encoder()
    ema["unet"].copy_to(unet.parameters())
    if isinstance(ema["text_encoder"], torch.nn.Module):  # a frozen, pre-trained text encoder
        text_encoder = ema["text_encoder"]
    else:
        ema["text_encoder"].copy_to(text_encoder.parameters())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    ).to(dtype=torch.float16)
    save_model_folder(pipe, output, card)


def save_model_folder(pipe, output: Path, card: dict) -> None:
    """Write `pipe` (as safetensors, in its dtype) and `training.json` (`card`) to the folder `output`,
    atomically (temp folder + rename); the hand-written model card `README.md` of an earlier
    export survives.  Both built-in models' exports end here."""
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # The CLIP tokenizer is rebuilt from assets/ by the registry; its files are small and keep
    # the folder loadable by plain diffusers too.
    (tmp / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    card_file = output / "README.md"  # the model card is written by hand: it survives a re-export
    if card_file.is_file():
        shutil.copy2(card_file, tmp / "README.md")
    for path in tmp.rglob("*"):  # save_pretrained writes owner-only files; the repo wants 644
        path.chmod(0o755 if path.is_dir() else 0o644)
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)


def load_vae(folder: Path):
    """A trained VAE folder (`--vae`), kept with its own latent scaling factor: stage 1 is skipped."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder).float().eval().requires_grad_(False)


def export_snapshot(args) -> int:
    """Export the EMA weights of the latest checkpoints without training further."""
    vae_state, denoiser_state = load_checkpoint(args.work / "vae.pt"), load_checkpoint(args.work / "denoiser.pt")
    if (vae_state is None and not args.vae) or denoiser_state is None:
        print(f"No VAE and denoiser checkpoints in {args.work} yet.", file=sys.stderr)
        return 1
    if args.vae:
        vae = load_vae(args.vae)
    else:
        vae = build_vae()
        vae.load_state_dict(vae_state["model"])
        vae.register_to_config(scaling_factor=latent_scale(vae, args.seed, args.scale_images))
    path = args.work / "denoiser.pt"
    saved = checkpointed(denoiser_state, "ema", path)
    ema = {"unet": restore_ema(build_unet(), saved["unet"], args.ema)}
    ema["text_encoder"] = (load_frozen_text_encoder(args.text_encoder) if args.text_encoder
                           else restore_ema(build_text_encoder(), saved["text_encoder"], args.ema))
    export(vae, ema, args.output, {"snapshot_of_step": denoiser_state["step"], "mse": denoiser_state["loss"],
                                   "inference_defaults": INFERENCE_DEFAULTS})
    print(f"wrote {args.output} from step {denoiser_state['step']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/builtin"), help="checkpoints and log")
    parser.add_argument("--output", type=Path, default=Path("assets/builtin"), help="diffusers folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--vae", type=Path, default=None,
                        help="a trained VAE folder to use instead of training one (stage 1 skipped)")
    parser.add_argument("--text-encoder", type=Path, default=None,
                        help="a pre-trained text encoder folder (python -m pipelines.builtin.text_tower), "
                             "kept frozen; without it the text encoder trains jointly with the UNet")
    parser.add_argument("--init-unet", type=Path, default=None,
                        help="a UNet folder to start from instead of random weights")
    parser.add_argument("--scale-images", type=int, default=512, help="scenes to measure the latent scale on")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--export-only", action="store_true",
                        help="write --output from the latest checkpoints in --work (a snapshot of a run in progress)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = args.work / "train.log"
    log(f"arguments: {vars(args)}", log_file)
    started = time.time()
    if args.export_only:
        return export_snapshot(args)
    if args.vae:
        vae, vae_loss = load_vae(args.vae), float("nan")
        scale = vae.config.scaling_factor
        log(f"vae: {args.vae} (latent scaling factor {scale:.4f}; 1/std on this world "
            f"{latent_scale(vae, args.seed, args.scale_images):.4f})", log_file)
    else:
        vae, vae_loss = train_vae(args, args.work, log_file)
        scale = latent_scale(vae, args.seed, args.scale_images)
        vae.register_to_config(scaling_factor=scale)
        log(f"vae done: loss {vae_loss:.4f}, latent scaling factor {scale:.4f}", log_file)
    ema, loss, history = train_denoiser(args, vae, args.work, log_file)
    elapsed = time.time() - started
    card = {
        "seed": args.seed,
        "world": "v2 (10 % empty, background-only scenes)",
        "vae_from": str(args.vae) if args.vae else None,
        "text_encoder_from": str(args.text_encoder) if args.text_encoder else None,
        "text_encoder_trained": "frozen, pre-trained by pipelines.builtin.text_tower" if args.text_encoder
                                else "jointly with the UNet",
        "unet_initialised_from": str(args.init_unet) if args.init_unet else None,
        "vae_steps": 0 if args.vae else args.vae_steps, "vae_batch": args.vae_batch,
        "vae_final_loss": None if args.vae else round(vae_loss, 5),
        "latent_scaling_factor": round(scale, 5),
        "vae_lr": args.vae_lr, "vae_warmup": VAE_WARMUP,
        "denoiser_steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "lr_schedule": "linear warm-up from 0, then a half cosine to 0 at the last step "
                       "(diffusers get_cosine_schedule_with_warmup)",
        "final_mse": round(loss, 5), "loss_history": [(s, round(v, 5)) for s, v in history],
        "wall_seconds_this_run": round(elapsed), "torch_threads": torch.get_num_threads(),
        "inference_defaults": INFERENCE_DEFAULTS,
    }
    export(vae, ema, args.output, card)
    log(f"wrote {args.output} ({sum(f.stat().st_size for f in args.output.rglob('*') if f.is_file()) / 1e6:.1f} MB)",
        log_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
