"""benchmarks/run.py instruct: one SaaS instruction edit vs the plain call of the same model.

Both arms edit the same image with the same 3-part instruction, seed, steps and guidance scales
through the task's own sampling call (`pipelines.instruct.edit_for(pipe).sample`): the method
with SaaS as the task runs it on that backbone (InstructPix2Pix: capture on the first 40 % of the
steps, rescale from step 1 on, in the cross-attention layers `attention_processors.saas.sd_layers`
picks; OmniGen and FLUX Kontext: the paper's layers and window), the baseline without.  Goal:
ratio <= 1.03 (the paper reports 1.074x on OmniGen).

Models: an instruction-edit model is needed.  `--model tiny` (run.py's default) is the tiny SD
stand-in with an 8-channel UNet of seeded random weights (`tiny_ip2p`); `--model builtin-edit`
is our trained edit model (64 px); `--model tiny-omnigen` and `--model tiny-flux-kontext` are the
tiny random-weight OmniGen and FLUX Kontext pipelines; `--model ip2p-random` is the SD 1.5
architecture with an 8-channel UNet (InstructPix2Pix's) and seeded random weights, at 512 px:
real-size speed without downloading anything.
"""

from __future__ import annotations

import torch
from PIL import Image

from benchmarks.bench_generate import sd15_random
from benchmarks.common import load_model

TASK = "instruct"
INSTRUCTION = "make the circle blue, and make the square red, and make the background beige"
SEED = 0


def ip2p_random(device: torch.device, dtype: torch.dtype):
    """SD 1.5's architecture with InstructPix2Pix's 8 input channels and seeded random weights."""
    return with_ip2p_unet(sd15_random(torch.device("cpu"), torch.float32)).to(device=device, dtype=dtype)


FULL_SIZE = {"ip2p-random": ip2p_random}


def tiny_ip2p(device, dtype):
    """The registry's `tiny` SD pipeline's components with an 8-channel UNet (seeded random
    weights): the tiny stand-in of an InstructPix2Pix model."""
    from pipelines import models

    base = models.load("tiny", device=device, dtype=dtype)
    return with_ip2p_unet(base).to(device=base.device, dtype=base.unet.dtype)


def with_ip2p_unet(base):
    """An InstructPix2Pix pipeline of `base`'s components with a seeded random 8-channel UNet of
    `base`'s UNet config."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**base.unet.config, "in_channels": 8})
    return StableDiffusionInstructPix2PixPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def prepare(args):
    """Method: the SaaS edit.  Baseline: the same `_sample` call without the controller."""
    from pipelines.builtin import world
    from pipelines.instruct import INSTRUCT, edit_for, edit_run, working_size

    if args.model == "tiny":
        pipe = tiny_ip2p(args.device, args.dtype)
        args.pipes = [*getattr(args, "pipes", []), pipe]  # run.py compiles / sets backends on these
    else:
        pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    size = args.size = args.size or (512 if args.model in FULL_SIZE else 64)
    width, height = working_size(pipe, size, size)
    source = Image.fromarray(world.make_scene(1_000_001).render(max(width, height))).resize((width, height))
    settings = INSTRUCT.replace(steps=args.steps).validated()
    edit = edit_for(pipe)
    run = edit_run(pipe, settings)
    call = edit.prepare(pipe, source, INSTRUCTION, run)

    def saas():
        edit.sample(pipe, call, SEED, run, settings)

    def baseline():
        edit.sample(pipe, call, SEED, run)

    return saas, baseline, {}
