"""benchmarks/run.py generate: heatmap capture on every text-attention layer vs the plain call."""

from __future__ import annotations

import torch

from attention_processors import AttentionController, ControlState, attach, attention_layer_names
from attention_processors.heatmaps import CrossAttentionHeatmaps, text_attention_layers
from benchmarks.common import load_model
from pipelines import models
from pipelines.backbones.sd import NOISE_SCHEDULE as SD_NOISE_SCHEDULE
from pipelines.attention_maps import generate_with_attention_maps

TASK = "generate"
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def sd15_random(device: torch.device, dtype: torch.dtype):
    """The SD 1.5 architecture with seeded random weights (configs of the public checkpoint)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    scheduler = PNDMScheduler(**SD_NOISE_SCHEDULE,
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


FULL_SIZE = {"sd15-random": sd15_random}


def prepare(args):
    """Method: the Attention maps task.  Baseline: the same pipeline call without processors.

    Variants (--breakdown): the controlled processors installed on the same layers with a
    controller that does nothing ("processors"), and the heatmap capture without the final word
    maps ("capture").
    """
    pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    size = args.size = args.size or (512 if args.model in FULL_SIZE else 64)
    extra = models.backbone(pipe).call_defaults(pipe, exact_size=True, raw_prompt=True)  # as the task calls it
    denoiser = models.denoiser(pipe)
    layers = text_attention_layers(attention_layer_names(denoiser))

    def method():
        generate_with_attention_maps(pipe, PROMPT, seed=0, steps=args.steps, guidance=7.5, height=size, width=size)

    def baseline():
        pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size,
             generator=torch.Generator().manual_seed(0), **extra)

    class Passive(AttentionController):
        def select(self, name):
            return name in layers

    def with_controller(make):
        def run():
            with attach(denoiser, make()):
                baseline()
        return run

    roles = ("uncond", "cond")
    variants = {
        "processors": with_controller(lambda: Passive(ControlState(roles))),
        "capture": with_controller(lambda: CrossAttentionHeatmaps(layers, keep=12, state=ControlState(roles))),
    }
    return method, baseline, variants


def ops_probe(args, method, baseline, variants):
    """--breakdown: the heatmap capture is the whole method, so its extra operators per captured
    call (explicit cross-attention probabilities instead of SDPA, plus the capture) are held to
    the capture goal (<= 6); `text_probs` (the image-query x text-key slice) is reported too."""
    from attention_processors import AttentionCall
    from benchmarks.common import goal, op_summary, scope_stats

    def report(method_ops, stock_ops, count):
        extra = op_summary(method_ops, stock_ops)["extra_ops_per_call"]
        return {
            "text_probs": scope_stats(method_ops, "text_probs"),
            "capture_hook": scope_stats(method_ops, "capture"),
            "goals": [goal("capture extra ops/call <= 6", extra, 6)],
        }

    return {
        "scopes": {
            "text_probs": (AttentionCall, "text_probs", None),
            "capture": (CrossAttentionHeatmaps, "capture", None),
        },
        "report": report,
    }

