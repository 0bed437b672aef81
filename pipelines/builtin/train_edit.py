"""Train the built-in instruction-edit model (`builtin-edit`) on the shapes world's exact edits.

    python -m pipelines.builtin.train_edit --work runs/builtin-edit --output assets/builtin-edit

An InstructPix2Pix-architecture model (Brooks et al. 2023) fine-tuned from `builtin`, as
InstructPix2Pix was fine-tuned from Stable Diffusion:

- **Architecture**: `builtin`'s UNet with 8 input channels: the noisy latents and the source
  image's latents side by side.  The 4 new input channels of `conv_in` start at zero, so the
  model starts as `builtin` ignoring the image (InstructPix2Pix's initialisation).  VAE and text
  encoder are `builtin`'s, frozen.  The source image enters as `vae.encode(image).latent_dist.mode()`
  without the scaling factor, exactly as diffusers' `StableDiffusionInstructPix2PixPipeline`
  prepares it at inference.
- **Data**: `world.make_edit` triples from training seeds (below `world.TEST_SEED_START`): a
  scene, an instruction of 1 to 3 parts ("make the circle blue, and make the background
  beige") and the exact edited scene; fresh ones every step, a function of (seed, step).
- **Objective**: epsilon prediction on SD's schedule with Min-SNR-5 weights, and
  InstructPix2Pix's conditioning dropout (5 % no instruction, 5 % no image, 5 % neither) so that
  both guidance scales work at inference.  AdamW, warm-up and cosine decay, EMA: the same
  diffusers pieces as `train.py` (`lr_schedule`, `make_ema`, `min_snr_weights`).

Seeded and resumable like `train.py`: the whole training state is written atomically to
`--work/edit.pt` every `--checkpoint-every` steps and a rerun continues from it with the data
it would have drawn.  The export is a float16 `StableDiffusionInstructPix2PixPipeline` folder
(the registry loads it by name as `builtin-edit`) with `training.json`; the hand-written model
card `README.md` survives a re-export.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.builtin import world
from pipelines.builtin.train import (
    IMAGE_SIZE,
    checkpointed,
    encode_text,
    inference_scheduler,
    load_checkpoint,
    log,
    lr_schedule,
    make_ema,
    min_snr_weights,
    restore_ema,
    save_atomic,
    save_model_folder,
    train_scheduler,
)

BUILTIN = Path(__file__).resolve().parents[2] / "assets" / "builtin"
#: InstructPix2Pix's conditioning dropout: P(no instruction) = P(no image) = P(neither) = 0.05
DROP_RATE = 0.05
INFERENCE_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 7.5, "image_guidance_scale": 1.5}


def build_edit_unet(base_unet_folder: Path = BUILTIN / "unet"):
    """`builtin`'s UNet with 8 input channels, the 4 new ones zero (InstructPix2Pix's start)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_unet_folder).float()
    old = unet.conv_in
    new = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :4] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=8)
    return unet


def edit_batch(step: int, batch_size: int, seed: int):
    """Source images, target images (B,3,64,64 in [-1,1]) and instructions of step `step`."""
    rng = random.Random(f"{seed}-edit-{step}")
    sources, targets, texts = [], [], []
    while len(texts) < batch_size:
        try:
            edit = world.make_edit(rng.randrange(world.TEST_SEED_START))
        except ValueError:  # a scene whose objects cannot all be named: draw another
            continue
        sources.append(edit.source.render(IMAGE_SIZE))
        targets.append(edit.target.render(IMAGE_SIZE))
        texts.append(edit.instruction)

    def tensor(images):
        return torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()

    return tensor(sources), tensor(targets), texts


def train(args, log_file: Path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from pipelines.tokenizers import clip_tokenizer

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.base / "vae").float().eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(args.base / "text_encoder").float().eval().requires_grad_(False)
    unet = build_edit_unet(args.base / "unet")
    tokenizer = clip_tokenizer()
    scheduler = train_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    lr_scheduler = lr_schedule(optimizer, args.steps, args.warmup)
    ema = make_ema(unet, args.ema)
    path = args.work / "edit.pt"
    state = load_checkpoint(path)
    step, running, history = 0, None, []
    if state is not None:
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(checkpointed(state, "lr_scheduler", path))
        ema = restore_ema(unet, checkpointed(state, "ema", path), args.ema)
        step, running, history = state["step"], state["loss"], state["history"]
        log(f"edit model: resumed at step {step}", log_file)
    with torch.no_grad():
        empty_text = encode_text(tokenizer, text_encoder, [""])
    scale = vae.config.scaling_factor
    unet.train()
    started, first = time.time(), step
    while step < args.steps:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        sources, targets, texts = edit_batch(step, args.batch, args.seed)
        with torch.no_grad():
            latents = vae.encode(targets).latent_dist.sample(generator) * scale
            source_latents = vae.encode(sources).latent_dist.mode()
            text_states = encode_text(tokenizer, text_encoder, texts)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        # conditioning dropout: [0, p) no text, [p, 2p) no text and no image, [2p, 3p) no image
        draw = torch.rand(len(latents), generator=generator)
        no_text = draw < 2 * DROP_RATE
        no_image = (draw >= DROP_RATE) & (draw < 3 * DROP_RATE)
        text_states = torch.where(no_text[:, None, None], empty_text.expand_as(text_states), text_states)
        source_latents = source_latents * (~no_image).float()[:, None, None, None]
        lr = optimizer.param_groups[0]["lr"]
        prediction = unet(torch.cat([noisy, source_latents], dim=1), timesteps, text_states).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, timesteps)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema.step(unet.parameters())
        step += 1
        plain = per_sample.mean().item()
        running = plain if running is None else 0.99 * running + 0.01 * plain
        if step % 50 == 0 or step == args.steps:
            rate = (time.time() - started) / max(1, step - first)
            log(f"edit step {step}/{args.steps} mse {running:.4f} lr {lr:.2e} ({rate:.2f} s/step)", log_file)
            history.append((step, running))
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_atomic({"unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(), "ema": ema.state_dict(), "step": step,
                         "loss": running, "history": history}, path)
    return vae, text_encoder, unet, ema, running, history


def export(vae, text_encoder, unet, ema, output: Path, card: dict) -> None:
    """Write the EMA weights as a float16 InstructPix2Pix folder, atomically (temp folder + rename)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from pipelines.tokenizers import clip_tokenizer

    ema.copy_to(unet.parameters())
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=inference_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    ).to(dtype=torch.float16)
    save_model_folder(pipe, output, card)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/builtin-edit"), help="checkpoints and log")
    parser.add_argument("--output", type=Path, default=Path("assets/builtin-edit"), help="diffusers folder to write")
    parser.add_argument("--base", type=Path, default=BUILTIN, help="the text-to-image model to start from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--export-only", action="store_true",
                        help="export the EMA weights of the latest checkpoint in --work without training further")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = args.work / "train.log"
    started = time.time()
    if args.export_only:
        saved = load_checkpoint(args.work / "edit.pt")
        if saved is None:
            print(f"No checkpoint in {args.work} yet.", file=sys.stderr)
            return 1
        args.steps = saved["step"]  # nothing left to train: train() loads the checkpoint and returns
    vae, text_encoder, unet, ema, loss, history = train(args, log_file)
    minutes = (time.time() - started) / 60
    card = {"seed": args.seed, "base": "builtin (assets/builtin: UNet, VAE and frozen text encoder)",
            "conv_in": "8 input channels, the 4 image channels initialised to zero",
            "data": "world.make_edit triples, 1-3 parts, training seeds", "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "warmup": args.warmup, "ema": args.ema, "conditioning_dropout": DROP_RATE,
            "final_mse": round(float(loss), 5), "loss_history": history,
            "minutes_this_run": round(minutes, 1), "inference_defaults": INFERENCE_DEFAULTS}
    export(vae, text_encoder, unet, ema, args.output, card)
    log(f"wrote {args.output}", log_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
