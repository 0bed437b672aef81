"""benchmarks/run.py grounding: one RefAM grounding pass vs one plain forward of the same denoiser.

Method: `segment_image` with the default settings (VAE encode, one noisy forward with the capture
on the middle + last thirds of the layers and the early exit after the last one, heatmap, Otsu
mask, per-token maps).  The text encoding is cached per expression, so after the warm-up it is
not in the timed region.  Baseline: the same VAE encode and one full forward of the same denoiser
with its stock processors, on the same latents, text and size.  Both at `--size` (default: 64 px
on the tiny models, 1024 px on the full-size architectures).

Variants (--breakdown): "no_early_exit" (the capture, full forward), "full_row" (the chunked
joint normaliser instead of text_softmax), "gas_suppress" (observe pass + suppressed pass).

Full-size architectures with seeded random weights (nothing downloaded):
- `flux-random`: the FLUX.1-dev transformer (19 dual-stream + 38 single-stream blocks, 24 heads
  of 128, joint dim 4096, guidance embedding) and the FLUX VAE architecture; the text encoders
  are one-layer stand-ins with the real output widths (T5: 4096 per token over 512 tokens; CLIP
  pooled: 768) instead of T5-XXL and CLIP-L, because the text encoding is cached and outside
  the timed region.
- `flux-random-small`: the same with 5 dual + 10 single blocks, for cards with less memory.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from benchmarks.common import load_model
from pipelines import grounding, models

TASK = "grounding"
EXPRESSION = "the dog on the left"


def _flux_random(device, dtype, dual: int, single: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from pipelines.tokenizers import clip_tokenizer, t5_tokenizer, t5_vocab_size

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        # build in the target dtype on the target device: no float32 copy of 12B weights
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        with torch.device(device):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=dual, num_single_layers=single,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
            )
            t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab_size(), d_model=4096, d_ff=1024, d_kv=64,
                                         num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=1024,
                                                num_hidden_layers=1, num_attention_heads=12,
                                                max_position_embeddings=77, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=49407))
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer(), transformer=transformer)
    return pipe  # already built on `device` in `dtype`


def flux_random(device, dtype):
    return _flux_random(device, dtype, 19, 38)


def flux_random_small(device, dtype):
    return _flux_random(device, dtype, 5, 10)


FULL_SIZE = {"flux-random": flux_random, "flux-random-small": flux_random_small}


class _Plain:
    """A controller stand-in for `grounding._forward` without processors: nothing stops early."""

    def reset_forward(self):
        pass


def prepare(args):
    pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    size = args.size = args.size or (1024 if args.model in FULL_SIZE else 64)
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 255, (size, size, 3), np.uint8))
    settings = grounding.GroundingSettings(size=size)
    backbone = grounding._check_backbone(pipe)
    stopwords = grounding.load_stopwords()

    def method(**overrides):
        grounding.segment_image(pipe, image, EXPRESSION, settings, **overrides)

    # the baseline's inputs: the same prompt (with magnets), text encoding and pixels
    prompt, spans = grounding.build_prompt(EXPRESSION, settings.magnets, settings.colour)
    device = models.denoiser(pipe).device
    text = grounding._encode(pipe, backbone, prompt, len(EXPRESSION), spans, stopwords, settings, device)
    multiple = backbone.grid_multiple(pipe)
    content, padded = grounding._working_size(image, size, multiple)

    def baseline():
        pixels = grounding._pixels([image], content, padded, device, pipe.vae.dtype)
        grounding._forward(pipe, backbone, pixels, text, settings, _Plain(), torch.Generator().manual_seed(0))

    variants = {
        "no_early_exit": lambda: method(early_exit=False),
        "full_row": lambda: method(norm="full_row"),
        "gas_suppress": lambda: method(gas="suppress"),
    }
    return method, baseline, variants


def ops_probe(args, method, baseline, variants):
    """--breakdown: RefAM's capture of the image-query x text-key slice (`text_probs`, goal <= 6
    operators per captured call), the whole capture hook, and the early exit: operators run in
    the denoiser forward after the last captured layer (goal 0; the no-early-exit variant is
    counted for comparison)."""
    from attention_processors import AttentionCall
    from attention_processors.refam import RefAMCapture
    from benchmarks.common import goal, ops_after_last_controlled, scope_stats

    def report(method_ops, stock_ops, count):
        after = ops_after_last_controlled(method_ops)
        full = ops_after_last_controlled(count(variants["no_early_exit"], with_scopes=False))
        slice_ops = scope_stats(method_ops, "text_probs")
        return {
            "text_probs": slice_ops,
            "capture_hook": scope_stats(method_ops, "capture"),
            "ops_after_last_captured": after,
            "ops_after_last_captured_no_early_exit": full,
            "goals": [goal("text_probs ops/call <= 6", slice_ops["ops_per_call"], 6),
                      goal("ops after the last captured layer", max(after, default=0), 0)],
        }

    return {
        "scopes": {
            "text_probs": (AttentionCall, "text_probs", None),
            "capture": (RefAMCapture, "capture", None),
        },
        "report": report,
    }
