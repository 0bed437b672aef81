"""Backbones: every family fact lives in pipelines/backbones/, and each tiny model finds its own."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import backbones, models

ROOT = Path(__file__).resolve().parent.parent
FAMILY_NAMES = {"sd", "sdxl", "pixart", "sd3", "flux"}
TINY_BACKBONE = {"tiny": backbones.SD, "tiny-sdxl": backbones.SDXL, "tiny-pixart": backbones.PIXART,
                 "tiny-sd3": backbones.SD3, "tiny-flux": backbones.FLUX}


def product_files():
    for folder in ("ui", "pipelines", "attention_processors", "benchmarks"):
        yield from (p for p in (ROOT / folder).rglob("*.py") if "backbones" not in p.relative_to(ROOT).parts)
    yield ROOT / "app.py"


def family_literals(source: str) -> list[int]:
    """Line numbers of string constants that are exactly a family name (comments and prose in
    docstrings are not constants of that value; a name in any expression is)."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in FAMILY_NAMES]


def test_the_family_check_finds_a_family_name_wherever_code_compares_one():
    assert family_literals('if backbone.name == "flux":\n    pass') == [1]
    assert family_literals('x = {"SDXL": 1}\n# "flux" in a comment\n"""A "flux" docstring."""') == [1]


def test_no_code_outside_the_backbone_package_names_a_family():
    hits = [f"{path.relative_to(ROOT)}:{n}" for path in product_files() for n in family_literals(path.read_text())]
    assert not hits, "family names outside pipelines/backbones/:\n" + "\n".join(hits)


@pytest.mark.parametrize("name", sorted(TINY_BACKBONE))
def test_each_tiny_model_is_recognised_as_its_family(tiny_pipe, name):
    pipe = tiny_pipe(name)
    assert backbones.of(pipe) is TINY_BACKBONE[name]
    assert models.family(pipe) == TINY_BACKBONE[name].name


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_text_segments_add_up_to_the_text_keys_the_denoiser_gets(tiny_pipe, name):
    """SD and SDXL: 77 CLIP keys; SD3: 77 CLIP then the T5 keys; FLUX: the T5 keys only (CLIP is pooled)."""
    pipe = tiny_pipe(name)
    backbone = backbones.of(pipe)
    lengths = {segment.name: length for segment, _, length in backbone.text_layout(pipe).segments}
    lengths = {k: (9 if k == "t5" else v) for k, v in lengths.items()}  # T5 trimmed to 9 tokens
    encoded = backbone.encode_text(pipe, "a red circle", "cpu", lengths)
    assert encoded.embeds.shape[1] == sum(lengths.values())


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl", "tiny-pixart"])
def test_prompt_embeds_make_the_same_image_as_the_prompt(tiny_pipe, name):
    pipe = tiny_pipe(name)
    backbone = backbones.of(pipe)
    call = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np",
                **backbone.call_defaults(pipe, exact_size=True, raw_prompt=True))
    embeds = backbone.prompt_embeds(pipe, "a red circle", "blurry", True, "cpu", clean_caption=False)
    from_prompt = pipe("a red circle", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **call)
    from_embeds = pipe(**embeds, generator=torch.Generator().manual_seed(0), **call)
    np.testing.assert_allclose(from_embeds.images, from_prompt.images, atol=1e-6, rtol=0)


def test_a_pipeline_of_no_known_family_is_refused_in_one_sentence(tiny_pipe):
    class Unknown:
        components = {"unet": object()}

    assert backbones.of(Unknown()) is backbones.OTHER
    with pytest.raises(Exception, match=r"^Remove object works with SD 1.x/2.x and SDXL models, not with this diffusers pipeline\.$"):
        backbones.require(Unknown(), (backbones.SD, backbones.SDXL), "Remove object")


def test_flux_packing_is_row_major_2x2_patches():
    from pipelines.backbones.flux import latent_image_ids, pack_latents

    latents = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    packed = pack_latents(latents)
    assert packed.shape == (1, 4, 8)
    # token 1 is the patch at rows 0-1, columns 2-3: channel 0 then channel 1, each row-major
    assert packed[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    ids = latent_image_ids(2, 2, "cpu", torch.float32)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
