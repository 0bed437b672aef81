"""The tiny models: seeded random-weight pipelines built in code, one per backbone family.

`build_tiny(name)` returns the same weights on every call and every machine (each component is
built right after seeding, without disturbing the caller's RNG), small enough that 2 steps at
64 px take well under a second on a CPU.  They exist for tests, CI and trying the UI without
downloads; their images are noise.  `tiny` (SD 1.x UNet), `tiny-sdxl`, `tiny-pixart` (PixArt-alpha
DiT), `tiny-sd3` (MMDiT), `tiny-flux` (dual + single stream); `tiny-sd2` (v-prediction, linear
projections) is built for tests but not offered in the UI.  `tiny-omnigen` is a real diffusers
`OmniGenPipeline` (the SaaS paper's backbone) for the Instruction edit task only, so it is not in
`TINY_MODELS`, whose names every text-to-image tab offers; nor is `tiny-flux-kontext`, a real
diffusers `FluxKontextPipeline` around `tiny-flux`'s parts (SaaS on FLUX Kontext, our
extrapolation, also for the Instruction edit task only).

Their text side: CLIP tokenizers rebuilt offline from OpenAI's BPE file (exact SD ids), our own
small T5-style vocabulary, and for `tiny-omnigen` our own small Llama-style BPE vocabulary with
Phi-3's BOS and chat-template special tokens (see pipelines/tokenizers.py; OmniGen's real Phi-3
tokenizer is not available offline).  `pipelines.models.load("tiny")` caches them like any other
model.

`tiny_motion_adapter()` is a seeded random-weight AnimateDiff `MotionAdapter` whose blocks fit
the `tiny` (and `tiny-sd2`) UNet, for Edit video's AnimateDiff backbone; `save_tiny_motion_adapter`
writes it as a folder (config.json and safetensors), what `--motion-adapter` takes.

`omnigen_v1_pipeline()` assembles a random-weight OmniGen of v1's full size (the tiny tokenizer and
VAE around the full transformer) for timing SaaS on a GPU, and `flux_kontext_dev_pipeline()` does the
same for FLUX.1 Kontext dev; the tests never build them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    MotionAdapter,
    OmniGenPipeline,
    OmniGenTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from pipelines import backbones
from pipelines.backbones.sd import NOISE_SCHEDULE as SD_NOISE_SCHEDULE
from pipelines.errors import UserInputError
from pipelines.tokenizers import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    OMNIGEN_TINY_VOCAB_LIMIT,
    clip_tokenizer,
    omnigen_tokenizer,
    t5_tokenizer,
    t5_vocab_size,
)

__all__ = ["TINY_MODELS", "TINY_BACKBONE", "build_tiny", "build_tiny_as", "clip_text_config", "flux_kontext_dev_config",
           "flux_kontext_dev_pipeline", "is_tiny", "omnigen_v1_config", "save_tiny_motion_adapter", "tiny_motion_adapter",
           "omnigen_v1_pipeline", "omnigen_v1_transformer", "save_tiny", "tiny_omnigen_transformer", "tiny_t5"]

TINY_MODELS: tuple[str, ...] = ("tiny", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux")
TINY_BACKBONE = {
    "tiny": backbones.SD,
    "tiny-sdxl": backbones.SDXL,
    "tiny-pixart": backbones.PIXART,
    "tiny-sd3": backbones.SD3,
    "tiny-flux": backbones.FLUX,
    "tiny-sd2": backbones.SD,
    "tiny-omnigen": backbones.OMNIGEN,
    "tiny-flux-kontext": backbones.FLUX_KONTEXT,
}

# Every tiny component is built right after seeding with this value, so the weights do not
# depend on what was built before or on the caller's RNG state.
_TINY_SEED = 0

# Small widths keep a 2-step 64 px run far below a second; the CLIP encoders keep the real
# vocabulary and 77 positions so the real tokenizers' ids are valid inputs.
_CLIP_HIDDEN = 32
_T5_HIDDEN = 64


class _seeded:
    """Seed torch's CPU RNG for one component without disturbing the caller's RNG."""

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(_TINY_SEED)

    def __exit__(self, *exc_info) -> None:
        self._fork.__exit__(*exc_info)


def _tiny_vae(latent_channels: int = 4, **scaling) -> AutoencoderKL:
    # Four blocks = three downsamplings = the real 8x VAE factor, so a 64 px image has the same
    # 8x8 latent grid geometry as a real model at 64 px (masks and token grids scale the same).
    with _seeded():
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=64,
            **scaling,
        )


def clip_text_config(hidden_size: int, num_layers: int, intermediate_size: int) -> CLIPTextConfig:
    """A small CLIP text encoder config with the real vocabulary, 77 positions and the real
    special-token ids (the pooled output is taken at the end-of-text token); used by the tiny
    models and by the built-in model's training script."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        projection_dim=hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _tiny_clip_text(with_projection: bool, hidden_size: int = _CLIP_HIDDEN):
    # SDXL reads hidden_states[-2]: keep at least two layers.
    config = clip_text_config(hidden_size, num_layers=2, intermediate_size=2 * hidden_size)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded():
        return model_class(config).eval()


def tiny_t5() -> T5EncoderModel:
    config = T5Config(
        vocab_size=t5_vocab_size(),
        d_model=_T5_HIDDEN,
        d_ff=2 * _T5_HIDDEN,
        d_kv=16,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded():
        return T5EncoderModel(config).eval()


def _sd_scheduler() -> PNDMScheduler:
    # The scheduler SD 1.5 ships with.
    return PNDMScheduler(
        **SD_NOISE_SCHEDULE,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def _build_tiny_sd() -> StableDiffusionPipeline:
    # Attention at two resolutions (8x8 and 4x4 tokens for a 64 px image) plus a mid block,
    # attn1 and attn2 everywhere there is a transformer: the layer names of real SD 1.x.
    with _seeded():
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            cross_attention_dim=_CLIP_HIDDEN,
        )
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_clip_text(with_projection=False),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_tiny_sd2() -> StableDiffusionPipeline:
    """SD 2.x-style: linear projections, per-level head widths, a text encoder of its own width
    (64 here; 1024 in SD 2.x) and SD 2.1's v-prediction DDIM scheduler.  Loadable by name
    ("tiny-sd2") but not listed in TINY_MODELS, which holds one model per family."""
    with _seeded():
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            cross_attention_dim=2 * _CLIP_HIDDEN,
        )
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_clip_text(with_projection=False, hidden_size=2 * _CLIP_HIDDEN),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(
            **SD_NOISE_SCHEDULE,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_tiny_sdxl() -> StableDiffusionXLPipeline:
    time_embed_dim = 8
    # SDXL: six micro-conditioning numbers (original size, crop, target size) plus the pooled
    # projection of the second text encoder feed the "text_time" added embedding.
    with _seeded():
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            # Two transformer blocks in the deepest level, like SDXL's stacked blocks, so layer
            # names with transformer_blocks.1 exist.
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=8,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            cross_attention_dim=2 * _CLIP_HIDDEN,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + _CLIP_HIDDEN,
        )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_clip_text(with_projection=False),
        text_encoder_2=_tiny_clip_text(with_projection=True),
        tokenizer=clip_tokenizer(),
        # The real SDXL tokenizer_2 pads with "!" (id 0).
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        # The scheduler SDXL base 1.0 ships with.
        scheduler=EulerDiscreteScheduler(
            **SD_NOISE_SCHEDULE,
            steps_offset=1,
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_tiny_pixart() -> PixArtAlphaPipeline:
    # sample_size=8 (a 64 px default) is none of PixArt's resolution-binning sizes (32/64/128):
    # call this tiny model with use_resolution_binning=False (its backbone's `call_defaults()` says so).
    with _seeded():
        transformer = PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=4,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=32,
            caption_channels=_T5_HIDDEN,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
    return PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_t5(),
        vae=_tiny_vae(),
        transformer=transformer,
        # PixArt-alpha ships the DPM-Solver++ multistep scheduler.
        scheduler=DPMSolverMultistepScheduler(
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            num_train_timesteps=1000,
        ),
    )


def _build_tiny_sd3() -> StableDiffusion3Pipeline:
    # SD3 concatenates both CLIP hidden states on the feature axis and zero-pads them to the T5
    # width, and its pooled input is both CLIP projections side by side.
    with _seeded():
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=_T5_HIDDEN,
            caption_projection_dim=32,
            pooled_projection_dim=2 * _CLIP_HIDDEN,
            # Positions for latents up to 64x64 (512 px); the pipeline crops this table.
            pos_embed_max_size=32,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        # The SD3 VAE's 16 latent channels and its latent shift and scale, read by the pipeline.
        vae=_tiny_vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_tiny_clip_text(with_projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_clip_text(with_projection=True),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=tiny_t5(),
        tokenizer_3=t5_tokenizer(),
    )


def _tiny_flux_components() -> dict:
    """The tiny FLUX parts (seeded): `tiny-flux`'s, and `tiny-flux-kontext`'s (the same weights)."""
    # FLUX packs 2x2 latent patches into 64 channels (16 latent channels x 4); rotary axes must
    # add up to the head dimension.  guidance_embeds=True gives FLUX.1-dev's distilled guidance
    # (no CFG batch), the variant docs/methods/grounding.md assumes (and FLUX.1 Kontext dev's).
    with _seeded():
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_T5_HIDDEN,
            pooled_projection_dim=_CLIP_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
    return dict(
        scheduler=_flux_scheduler(),
        vae=_flux_vae(),
        text_encoder=_tiny_clip_text(with_projection=False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5(),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1-dev's (and FLUX.1 Kontext dev's) scheduler: resolution-dependent shift.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _flux_vae() -> AutoencoderKL:
    # FLUX's VAE scaling and shift, 16 latent channels, no quant convs
    return _tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                     use_post_quant_conv=False)


def _build_tiny_flux() -> FluxPipeline:
    return FluxPipeline(**_tiny_flux_components())


#: `tiny-flux-kontext`'s native side: 64 px, like `tiny-omnigen` (FluxKontextPipeline's own default is
#: 1024 px, `default_sample_size` 128 latents)
_TINY_FLUX_KONTEXT_SAMPLE_SIZE = 8


def _build_tiny_flux_kontext() -> FluxKontextPipeline:
    # a real diffusers FluxKontextPipeline around `tiny-flux`'s parts: Kontext is FLUX.1's
    # architecture fine-tuned, so only the pipeline (the reference latents in the sequence) differs.
    # `default_sample_size` is a plain attribute, not saved: a saved copy has the 1024 px default again.
    pipe = FluxKontextPipeline(**_tiny_flux_components())
    pipe.default_sample_size = _TINY_FLUX_KONTEXT_SAMPLE_SIZE
    return pipe


def flux_kontext_dev_config() -> dict:
    """The architecture of ``black-forest-labs/FLUX.1-Kontext-dev``'s transformer (FLUX.1-dev's: 19
    dual-stream and 38 single-stream blocks, 24 heads x 128, T5 width 4096, CLIP pooled 768,
    guidance embedding), for speed measurements with random weights."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def flux_kontext_dev_pipeline(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> FluxKontextPipeline:
    """A `FluxKontextPipeline` around a random-weight transformer of FLUX.1 Kontext dev's full size
    (about 12 B parameters) for timing SaaS against the stock processors at 1024 px.  Its text
    encoders are one-layer random ones of the real widths (T5 4096 with the tiny vocabulary, CLIP
    768) and its VAE is the tiny one: beside 28 transformer steps their cost is small; its images
    are noise.  Never built by the tests."""
    config = flux_kontext_dev_config()
    with _seeded(), torch.device(device):
        transformer = FluxTransformer2DModel(**config).to(dtype=dtype).eval()
        t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab_size(), d_model=config["joint_attention_dim"], d_ff=1024,
                                     d_kv=64, num_layers=1, num_heads=8, feed_forward_proj="gated-gelu",
                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).to(dtype=dtype).eval()
        clip = CLIPTextModel(clip_text_config(config["pooled_projection_dim"], num_layers=1,
                                              intermediate_size=1024)).to(dtype=dtype).eval()
    return FluxKontextPipeline(scheduler=_flux_scheduler(), vae=_flux_vae().to(device=device, dtype=dtype),
                               text_encoder=clip, tokenizer=clip_tokenizer(), text_encoder_2=t5,
                               tokenizer_2=t5_tokenizer(), transformer=transformer)


def tiny_omnigen_transformer(num_layers: int = 4) -> OmniGenTransformer2DModel:
    """A seeded random-weight OmniGen transformer: Phi-3-style layers ``layers.{i}.self_attn`` with
    4 heads of 8, SuScaled RoPE (all-ones factors), patch 2, a 1,000-token vocabulary (room for the
    tiny tokenizer's ids); latents up to 32x32 (256 px).  The denoiser of `tiny-omnigen`, and on its
    own the SaaS attention tests' model (attention_processors/saas.py)."""
    head_dim = 8
    with _seeded():
        return OmniGenTransformer2DModel(
            in_channels=4,
            patch_size=2,
            hidden_size=4 * head_dim,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            num_layers=num_layers,
            pad_token_id=0,
            vocab_size=OMNIGEN_TINY_VOCAB_LIMIT,
            rope_scaling={"short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2)},
            pos_embed_max_size=16,
            time_step_dim=32,
        ).eval()


def _omnigen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # OmniGen v1's scheduler config is diffusers' defaults (1,000 training steps, shift 1); the
    # pipeline passes its own sigmas, linspace(1, 0) over the steps.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


#: `tiny-omnigen`'s native side: 64 px, like the other tiny models (OmniGenPipeline's own default
#: is 1024 px, `default_sample_size` 128 latents)
_TINY_OMNIGEN_SAMPLE_SIZE = 8


def _build_tiny_omnigen() -> OmniGenPipeline:
    # OmniGen v1's VAE is SDXL's (scaling 0.13025, 4 latent channels, /8).  `default_sample_size`
    # is a plain attribute of the pipeline, not saved with it: a saved and reloaded copy has
    # OmniGen's 1024 px default again.
    pipe = OmniGenPipeline(
        transformer=tiny_omnigen_transformer(),
        scheduler=_omnigen_scheduler(),
        vae=_tiny_vae(scaling_factor=0.13025),
        tokenizer=omnigen_tokenizer(),
    )
    pipe.default_sample_size = _TINY_OMNIGEN_SAMPLE_SIZE
    return pipe


def omnigen_v1_config() -> dict:
    """The architecture of ``Shitao/OmniGen-v1-diffusers``'s transformer (32 layers, 32 heads x 96
    = 3072, Phi-3 MLP 8192, vocabulary 32064), for speed benchmarks with random weights.  The
    SuScaled RoPE factors of the checkpoint are not available offline: all ones here (this changes
    the rotary frequencies, not the cost)."""
    head_dim = 96
    return dict(
        in_channels=4, patch_size=2, hidden_size=3072, rms_norm_eps=1e-5, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=8192, num_layers=32, pad_token_id=32000, vocab_size=32064,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rope_base=10000,
        rope_scaling={"short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2)},
        pos_embed_max_size=192, time_step_dim=256,
    )


def omnigen_v1_transformer(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> OmniGenTransformer2DModel:
    """A random-weight transformer of OmniGen v1's full size (about 3.8 B parameters) for timing
    SaaS against the stock processors; never built by the tests."""
    with _seeded(), torch.device(device):
        return OmniGenTransformer2DModel(**omnigen_v1_config()).to(dtype=dtype).eval()


def omnigen_v1_pipeline(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> OmniGenPipeline:
    """An `OmniGenPipeline` around `omnigen_v1_transformer()` for timing SaaS at the paper's 512 px
    (`pipelines.instruct.edit_by_instruction` runs on it).  Its tokenizer and VAE are the tiny
    ones: the tiny vocabulary's ids are valid inputs of v1's 32,064-entry table, and the VAE's cost
    is small beside 50 transformer steps; its images are noise.  Never built by the tests."""
    pipe = OmniGenPipeline(
        transformer=omnigen_v1_transformer(dtype, device),
        scheduler=_omnigen_scheduler(),
        vae=_tiny_vae(scaling_factor=0.13025).to(device=device, dtype=dtype),
        tokenizer=omnigen_tokenizer(),
    )
    return pipe


_TINY_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny": _build_tiny_sd,
    "tiny-sdxl": _build_tiny_sdxl,
    "tiny-pixart": _build_tiny_pixart,
    "tiny-sd3": _build_tiny_sd3,
    "tiny-flux": _build_tiny_flux,
    "tiny-sd2": _build_tiny_sd2,
    "tiny-omnigen": _build_tiny_omnigen,
    "tiny-flux-kontext": _build_tiny_flux_kontext,
}


def is_tiny(name: str) -> bool:
    """True for the seeded random-weight models built in code (`TINY_MODELS`)."""
    return name in _TINY_BUILDERS


def build_tiny(name: str) -> DiffusionPipeline:
    """A fresh (uncached) tiny pipeline on CPU in float32; same weights on every call."""
    if not is_tiny(name):
        raise UserInputError(f"'{name}' is not a tiny model; choose one of {', '.join(TINY_MODELS)}.")
    return _TINY_BUILDERS[name]()


def build_tiny_as(name: str, dtype: torch.dtype) -> DiffusionPipeline:
    pipe = build_tiny(name)
    # Built in float32; casting is skipped when not needed because diffusers warns on every cast.
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def save_tiny(name: str, folder: str | os.PathLike) -> Path:
    """Save a tiny model in diffusers `save_pretrained` layout (safetensors); returns the folder."""
    folder = Path(folder)
    build_tiny(name).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_motion_adapter(max_frames: int = 8) -> MotionAdapter:
    """A seeded random-weight AnimateDiff `MotionAdapter` that fits the `tiny` and `tiny-sd2` UNets
    (their block widths, one layer per block and GroupNorm groups; a mid-block motion module, as in
    AnimateDiff v2/v3).  `max_frames` is its `motion_max_seq_length` (AnimateDiff's is 32; 8 keeps
    a test of a too-long window cheap).  Its motion output projections are random, not zero, so its
    motion modules really mix the frames."""
    with _seeded():
        return MotionAdapter(block_out_channels=(32, 32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                             motion_num_attention_heads=2, motion_max_seq_length=max_frames,
                             use_motion_mid_block=True)


def save_tiny_motion_adapter(folder: str | os.PathLike, max_frames: int = 8) -> Path:
    """Save `tiny_motion_adapter(max_frames)` in diffusers layout (config.json and safetensors)."""
    folder = Path(folder)
    tiny_motion_adapter(max_frames).save_pretrained(folder, safe_serialization=True)
    return folder
