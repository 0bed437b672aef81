"""The model registry (pipelines/models.py) and the offline tokenizers (pipelines/tokenizers.py).

Everything runs on CPU without network: tiny models are built in code, and every failure path
must answer with a one-sentence UserInputError quickly.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines import models
from pipelines.errors import UserInputError
from pipelines.tokenizers import clip_tokenizer, t5_tokenizer

FAMILIES = {
    "tiny": "sd",
    "tiny-sdxl": "sdxl",
    "tiny-pixart": "pixart",
    "tiny-sd3": "sd3",
    "tiny-flux": "flux",
}


def generate(pipe, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=height,
        width=width,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
        **models.backbone(pipe).call_defaults(pipe),
    ).images


def assert_one_sentence(error: BaseException) -> None:
    message = str(error)
    assert message and "\n" not in message
    assert message.rstrip().endswith(".")


# ---------------------------------------------------------------------------------- tokenizers


def test_clip_tokenizer_matches_stable_diffusion_ids():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # The real tokenizer lower-cases and collapses whitespace before BPE.
    assert tokenizer("A  Photo of a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_tokenizer_pads_to_77():
    padded = clip_tokenizer()("a photo of a cat", padding="max_length", truncation=True)
    assert len(padded.input_ids) == 77
    assert padded.input_ids[7:] == [49407] * 70
    # SDXL's tokenizer_2 pads with "!" (id 0).
    padded_2 = clip_tokenizer(pad_token="!")("a photo of a cat", padding="max_length")
    assert padded_2.input_ids[7:] == [0] * 70
    long = clip_tokenizer()(" ".join(["cat"] * 100), padding="max_length", truncation=True)
    assert len(long.input_ids) == 77 and long.input_ids[-1] == 49407


def test_tokenizers_are_fresh_objects():
    # Personalization adds tokens to a pipeline's tokenizer: that must not leak elsewhere.
    assert clip_tokenizer() is not clip_tokenizer()
    assert t5_tokenizer() is not t5_tokenizer()


def test_t5_tokenizer_prefers_whole_words_and_maps_offsets():
    tokenizer = t5_tokenizer()
    text = "a red circle left of a blue square"
    encoded = tokenizer(text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens == ["▁a", "▁red", "▁circle", "▁left", "▁of", "▁a", "▁blue", "▁square", "</s>"]
    assert [text[start:end] for start, end in encoded.offset_mapping[:-1]] == text.split()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)


def test_t5_tokenizer_handles_any_text():
    tokenizer = t5_tokenizer()
    ids = tokenizer("Zebra-42 eats €").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # Unknown words fall back to letters; characters outside the vocabulary become <unk>.
    assert tokens[:3] == ["▁Z", "e", "b"]
    assert "<unk>" in tokens and tokens[-1] == "</s>"


def test_t5_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a photo of a dog, Zebra 42 €"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded(text, return_offsets_mapping=True).offset_mapping == tokenizer(
        text, return_offsets_mapping=True
    ).offset_mapping


# ------------------------------------------------------------------------------- tiny families


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_tiny_generates_finite_images(tiny_pipe, name):
    pipe = tiny_pipe(name)
    assert models.family(pipe) == FAMILIES[name]
    square = generate(pipe)
    assert square.shape == (1, 64, 64, 3)
    assert np.isfinite(square).all()
    # 96 = 6 x 16: FLUX, SD3 and PixArt patchify 2x2 latents, so they need multiples of 16 px;
    # the UNets take multiples of 8.  One size that suits all keeps the test uniform.
    wide = generate(pipe, height=64, width=96)
    assert wide.shape == (1, 64, 96, 3)
    assert np.isfinite(wide).all()


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_tiny_weights_are_deterministic(tiny_pipe, name):
    pipe = tiny_pipe(name)
    rebuilt = models.build_tiny(name)
    state = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).state_dict()
    rebuilt_state = (rebuilt.unet if hasattr(rebuilt, "unet") else rebuilt.transformer).state_dict()
    assert all(torch.equal(state[key], rebuilt_state[key]) for key in state)


def test_building_does_not_touch_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.build_tiny("tiny-pixart")
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture(scope="session")
def saved_tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: models.save_tiny(name, root / name) for name in models.TINY_MODELS}


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_save_pretrained_then_load_folder_gives_same_images(tiny_pipe, saved_tiny_models, name):
    folder = saved_tiny_models[name]
    assert list(folder.rglob("*.safetensors")), "weights must be saved as safetensors"
    assert not list(folder.rglob("*.bin"))
    reloaded = models.load(str(folder), device="cpu")
    assert type(reloaded) is type(tiny_pipe(name))
    assert models.describe(str(folder)) == models.backbone(tiny_pipe(name)).label
    # Bit-identical for most families; loaded weights are not 64-byte aligned in memory, which
    # makes CPU BLAS take other kernels for some matmuls (seen as ~1e-6 on FLUX).
    np.testing.assert_allclose(generate(reloaded), generate(tiny_pipe(name)), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- attention layer names


def processor_names(pipe) -> list[str]:
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return [key.removesuffix(".processor") for key in denoiser.attn_processors]


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_unet_attention_layer_names(tiny_pipe, name):
    names = processor_names(tiny_pipe(name))
    for prefix in ("down_blocks", "mid_block", "up_blocks"):
        assert any(n.startswith(prefix) and n.endswith("attn1") for n in names)
        assert any(n.startswith(prefix) and n.endswith("attn2") for n in names)
    if name == "tiny":
        # Cross-attention at two resolutions on the way down (and up).
        assert {n.split(".")[1] for n in names if n.startswith("down_blocks")} == {"0", "1"}
    else:
        assert any(".transformer_blocks.1.attn2" in n for n in names)


def test_pixart_attention_layer_names(tiny_pipe):
    names = processor_names(tiny_pipe("tiny-pixart"))
    assert {"transformer_blocks.0.attn1", "transformer_blocks.0.attn2"} <= set(names)


def test_sd3_attention_layer_names(tiny_pipe):
    assert processor_names(tiny_pipe("tiny-sd3")) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


def test_flux_attention_layer_names(tiny_pipe):
    names = processor_names(tiny_pipe("tiny-flux"))
    assert "transformer_blocks.0.attn" in names
    assert "single_transformer_blocks.0.attn" in names


# ----------------------------------------------------------------------------- registry behaviour


def test_load_is_cached_per_device_and_dtype(tiny_pipe):
    pipe = tiny_pipe("tiny")
    assert models.load("tiny", device="cpu") is pipe
    assert models.load("tiny", device=torch.device("cpu"), dtype=torch.float32) is pipe
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"


def test_other_dtype_is_a_separate_entry():
    half = models.load("tiny-pixart", device="cpu", dtype="bfloat16")
    assert half.transformer.dtype == torch.bfloat16
    assert half is not models.load("tiny-pixart", device="cpu")


def test_load_as_shares_weights(tiny_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    base = tiny_pipe("tiny")
    derived = models.load_as("tiny", StableDiffusionImg2ImgPipeline, device="cpu")
    assert isinstance(derived, StableDiffusionImg2ImgPipeline)
    assert derived.unet is base.unet and derived.vae is base.vae
    assert models.load_as("tiny", StableDiffusionImg2ImgPipeline, device="cpu") is derived
    assert models.family(derived) == "sd"


def test_clear_cache_forgets_pipelines():
    first = models.load("tiny-pixart", device="cpu")
    models.clear_cache()
    second = models.load("tiny-pixart", device="cpu")
    assert second is not first


def test_names_and_descriptions():
    assert models.TINY_MODELS == ("tiny", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux")
    assert set(models.TINY_MODELS) < set(models.BUILTIN_NAMES) and "builtin" in models.BUILTIN_NAMES
    assert models.is_tiny("tiny-flux") and not models.is_tiny("builtin")
    assert models.describe("tiny").startswith("SD 1.x/2.x UNet")
    assert models.describe("tiny-flux").startswith("FLUX MMDiT")


def test_default_device_and_dtype_on_this_machine():
    device = models.default_device()
    if device.type == "cpu":
        assert models.default_dtype() == torch.float32
    assert models.default_dtype("cpu") == torch.float32


@pytest.mark.parametrize(
    "name",
    ["no such model", "/no/such/folder", "./missing", "missing.safetensors", ""],
)
def test_bad_names_raise_one_sentence(name):
    with pytest.raises(UserInputError) as error:
        models.load(name, device="cpu")
    assert_one_sentence(error.value)


def test_a_missing_builtin_folder_is_one_sentence(monkeypatch, tmp_path):
    # A checkout without assets/builtin (e.g. a partial copy) must say so, not crash.
    monkeypatch.setattr(models, "BUILTIN_DIR", tmp_path / "builtin")
    models.clear_cache()
    with pytest.raises(UserInputError) as error:
        models.load("builtin", device="cpu")
    assert_one_sentence(error.value)


def test_unreachable_hub_id_fails_fast(monkeypatch):
    # Whether offline by setting or by lack of network, a hub id that is not cached must fail at
    # once.  Unset HF_HUB_OFFLINE so that the network probe path runs when there is no network.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_HUB_PROBE_TIMEOUT_S", 2.0)
    start = time.monotonic()
    try:
        models.load("tiny-owner/model-that-is-not-cached", device="cpu")
    except UserInputError as error:
        assert_one_sentence(error)
        message = str(error)
        assert "tiny-owner/model-that-is-not-cached" in message
    else:
        pytest.fail("an uncached hub id loaded without a hub")
    assert time.monotonic() - start < 15


def test_offline_setting_skips_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserInputError, match="huggingface-cli download owner/name"):
        models.load("owner/name", device="cpu")
    assert time.monotonic() - start < 1


def test_pickle_checkpoints_are_refused(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not loaded")
    with pytest.raises(UserInputError, match="pickle") as error:
        models.load(str(checkpoint), device="cpu")
    assert_one_sentence(error.value)


def test_single_file_without_cached_config_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Only the key names matter for the family guess; diffusers' own detection then names the
    # base model whose config is needed, which is not in this machine's HF cache.
    checkpoint = tmp_path / "sd15.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2),
        },
        str(checkpoint),
    )
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("stable-diffusion-v1-5/stable-diffusion-v1-5", "model_index.json"), str):
        pytest.skip("the SD 1.5 config is cached here, so this checkpoint would really load")
    start = time.monotonic()
    with pytest.raises(UserInputError, match="save_pretrained") as error:
        models.load(str(checkpoint), device="cpu")
    assert_one_sentence(error.value)
    assert time.monotonic() - start < 5


def test_unrecognised_single_file_is_refused(tmp_path):
    checkpoint = tmp_path / "weights.safetensors"
    save_file({"encoder.layer.weight": torch.zeros(2)}, str(checkpoint))
    with pytest.raises(UserInputError, match="not a recognised") as error:
        models.load(str(checkpoint), device="cpu")
    assert_one_sentence(error.value)


def test_single_file_family_guess_reads_key_names(tmp_path):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    cases = {
        "sdxl": ("conditioner.embedders.1.model.ln_final.weight", StableDiffusionXLPipeline),
        "sd3": ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", StableDiffusion3Pipeline),
    }
    for stem, (key, expected) in cases.items():
        path = tmp_path / f"{stem}.safetensors"
        save_file({key: torch.zeros(1)}, str(path))
        checkpoint = models._open_checkpoint(path)
        assert models._single_file_pipeline_class(checkpoint, path) is expected
