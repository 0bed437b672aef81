"""benchmarks/run.py steering: one steered generation (MedSteer on every attn2) vs the plain call.

Both arms get the same precomputed prompt embeddings, seed, steps and guidance; the method
installs the steering processors on every cross-attention layer with beta 2 and directions of
the run's step count (seeded random unit vectors: the speed does not depend on their values).
Goal: ratio <= 1.03.

`--model pixart-random`: the PixArt-alpha 512 transformer architecture (28 blocks, hidden 1152,
16 heads x 72, patch 2, 4 latent channels, cross-attention 1152 from 4096-dim T5 embeddings)
with seeded random weights, and the SD VAE architecture.  T5-XXL is not built: both arms are fed
the same precomputed random T5 embeddings (prompt_embeds + prompt_attention_mask, 120 tokens),
so text encoding is excluded from both timings (the task encodes each prompt once anyway).
"""

from __future__ import annotations

import torch

from attention_processors import ControlState, attention_layer_names
from attention_processors.medsteer import MedSteer, cross_attention_layers
from benchmarks.common import load_model
from pipelines import models, tiny_models
from pipelines.steering import _render, default_guidance, encode

TASK = "steering"
PROMPT = "An endoscopic image of dyed lifted polyps"


def pixart_random(device: torch.device, dtype: torch.dtype):
    """PixArt-XL-2-512x512's architecture with seeded random weights (public configs)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from pipelines.tokenizers import t5_tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
        in_channels=4, out_channels=8, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            num_train_timesteps=1000)
    # never called: the benchmark feeds precomputed T5 embeddings instead of building T5-XXL
    text_encoder = tiny_models.tiny_t5()
    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)
    return pipe.to(device=device, dtype=dtype)


FULL_SIZE = {"pixart-random": pixart_random}


def _random_t5_embeds(device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 120, 4096, generator=g).to(device, dtype)
    ne = torch.randn(1, 120, 4096, generator=g).to(device, dtype)
    mask = torch.zeros(1, 120, dtype=torch.long)
    mask[:, :12] = 1  # a 12-token prompt, as T5 pads to 120
    neg_mask = torch.zeros(1, 120, dtype=torch.long)
    neg_mask[:, :1] = 1
    return dict(prompt_embeds=pe, prompt_attention_mask=mask.to(device), negative_prompt_embeds=ne,
                negative_prompt_attention_mask=neg_mask.to(device))


def prepare(args):
    """Method: generation with steering.  Baseline: the same call without processors.

    Variants (--breakdown): steering processors installed with beta 0 ("processors": the cost
    of the controlled processor alone) and steering of the conditional half only ("cond_only").
    """
    pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    size = args.size = args.size or (512 if args.model in FULL_SIZE else 64)
    guidance = default_guidance(pipe)
    if args.model in FULL_SIZE:
        embeds = _random_t5_embeds(args.device, args.dtype)
    else:
        embeds = encode(pipe, PROMPT, "", guidance)
    denoiser = models.denoiser(pipe)
    layers = cross_attention_layers(attention_layer_names(denoiser))
    modules = dict(denoiser.named_modules())
    g = torch.Generator().manual_seed(1)
    directions = {}
    for name in layers:
        d = torch.randn(args.steps, modules[name].to_out[0].out_features, generator=g)
        directions[name] = d / d.norm(dim=-1, keepdim=True)
    roles = models.backbone(pipe).row_roles(pipe, guidance)

    def steered(beta=2.0, steer_roles=roles):
        def run():
            controller = MedSteer(layers, directions=directions, beta=beta, steer_roles=steer_roles,
                                  run_steps=args.steps, state=ControlState(row_roles=roles))
            _render(pipe, embeds, 0, args.steps, guidance, size, size, controller=controller)
        return run

    def baseline():
        _render(pipe, embeds, 0, args.steps, guidance, size, size)

    variants = {"processors": steered(beta=0.0), "cond_only": steered(steer_roles=("cond",))}
    return steered(), baseline, variants


def ops_probe(args, method, baseline, variants):
    """--breakdown: steering's extra operators per steered cross-attention call (goal <= 4),
    and the operators of the `post` hook itself."""
    from benchmarks.common import goal, op_summary, scope_stats

    def report(method_ops, stock_ops, count):
        extra = op_summary(method_ops, stock_ops)["extra_ops_per_call"]
        return {"post_hook": scope_stats(method_ops, "post"),
                "goals": [goal("steering extra ops/call <= 4", extra, 4)]}

    return {"scopes": {"post": (MedSteer, "post", None)}, "report": report}
