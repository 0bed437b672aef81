"""The layer vocabulary (attention_processors/layers.py) and the policies' layer choices on it.

Every expected set below was recorded from the policies' own regular expressions before they were
replaced by the vocabulary (heatmaps, medsteer, personalize, refam, attentive_eraser): the
selections of every tiny model family and of `builtin` must not change.
"""

from __future__ import annotations

import pytest
import torch

from attention_processors import attention_layer_names, layers
from attention_processors.attentive_eraser import is_aas_layer
from attention_processors.heatmaps import text_attention_layers
from attention_processors.medsteer import cross_attention_layers
from attention_processors.personalize import personalization_layers
from attention_processors.refam import auto_unet_levels, choose_layers, self_attention_layers
from pipelines import models

FAMILIES = ("tiny", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux", "builtin")


def N(short: str) -> str:
    """Short names: 'd1.0.0.2' = down_blocks.1.attentions.0.transformer_blocks.0.attn2,
    'm.0.1.1' = mid_block.attentions.0.transformer_blocks.1.attn1, 't3.attn' and 's7.attn' =
    transformer_blocks.3.attn and single_transformer_blocks.7.attn."""
    if short[0] in "du":
        block, attention, tb, kind = short[1:].split(".")
        prefix = {"d": "down_blocks", "u": "up_blocks"}[short[0]]
        return f"{prefix}.{block}.attentions.{attention}.transformer_blocks.{tb}.attn{kind}"
    if short[0] == "m":
        _, attention, tb, kind = short.split(".")
        return f"mid_block.attentions.{attention}.transformer_blocks.{tb}.attn{kind}"
    block, kind = short[1:].split(".")
    return f"{'single_' if short[0] == 's' else ''}transformer_blocks.{block}.{kind}"


def Ns(shorts: str) -> list[str]:
    return [N(s) for s in shorts.split()]


def rebuild(layer: layers.Layer) -> str:
    """The name a parsed layer stands for, from its fields alone."""
    if layer.section in layers.TRANSFORMER:
        return f"{'single_' if layer.section == 'single' else ''}transformer_blocks.{layer.block}.{layer.kind}"
    head = "mid_block" if layer.section == "mid" else f"{layer.section}_blocks.{layer.block}"
    return f"{head}.attentions.{layer.attention}.transformer_blocks.{layer.transformer_block}.{layer.kind}"


@pytest.fixture(scope="module")
def model_layers(tiny_pipe):
    """family -> (attention layer names, number of UNet down blocks or None)."""
    result = {}
    for family in FAMILIES:
        denoiser = models.denoiser(tiny_pipe(family))
        depth = len(denoiser.down_blocks) if hasattr(denoiser, "down_blocks") else None
        result[family] = (attention_layer_names(denoiser), depth)
    return result


def _counts(parsed, field):
    counts = {}
    for layer in parsed:
        counts[getattr(layer, field)] = counts.get(getattr(layer, field), 0) + 1
    return counts


# ----------------------------------------------------------------------------- the parser

EXPECTED_SHAPE = {  # family: (sections, kinds) counts
    "tiny": ({"down": 4, "mid": 2, "up": 8}, {"attn1": 7, "attn2": 7}),
    "builtin": ({"down": 4, "mid": 2, "up": 8}, {"attn1": 7, "attn2": 7}),
    "tiny-sdxl": ({"down": 6, "mid": 4, "up": 12}, {"attn1": 11, "attn2": 11}),
    "tiny-pixart": ({"dit": 4}, {"attn1": 2, "attn2": 2}),
    "tiny-sd3": ({"dit": 2}, {"attn": 2}),
    "tiny-flux": ({"dit": 1, "single": 1}, {"attn": 2}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_parser_classifies_every_attention_layer(model_layers, family):
    names, _ = model_layers[family]
    parsed = [layers.parse(n) for n in names]
    assert None not in parsed
    assert [rebuild(layer) for layer in parsed] == names
    sections, kinds = EXPECTED_SHAPE[family]
    assert _counts(parsed, "section") == sections
    assert _counts(parsed, "kind") == kinds
    assert layers.parse_all(names) == parsed


def test_the_parser_on_sd_and_sdxl_layouts():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280))
        sdxl = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20))
    for unet, sections in ((sd15, {"down": 12, "mid": 2, "up": 18}), (sdxl, {"down": 48, "mid": 20, "up": 72})):
        names = attention_layer_names(unet)
        parsed = [layers.parse(n) for n in names]
        assert None not in parsed and [rebuild(layer) for layer in parsed] == names
        assert _counts(parsed, "section") == sections
    sdxl_names = attention_layer_names(sdxl)
    assert len(layers.decoder_self_attention(sdxl_names)) == 36  # up_blocks.0: 3 x 10, up_blocks.1: 3 x 2
    assert len(cross_attention_layers(sdxl_names)) == 70
    assert len(personalization_layers(attention_layer_names(sd15), 4, 4)["capture"]) == 5


def test_the_parser_leaves_other_names_out():
    for name in ("down_blocks.0.resnets.0", "mid_block.attentions.0", "transformer_blocks.0.ff", "foo.attn2",
                 "up_blocks.x.attentions.0.transformer_blocks.0.attn1", "single_transformer_blocks.1.attn.to_q",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn", "transformer_blocks.0.attn3", ""):
        assert layers.parse(name) is None, name
    assert layers.select(["foo.attn2", N("d0.0.0.2")], kind=layers.CROSS) == [N("d0.0.0.2")]


def test_layer_fields_and_levels():
    layer = layers.parse(N("u2.1.3.1"))
    assert (layer.section, layer.block, layer.attention, layer.transformer_block, layer.kind) == ("up", 2, 1, 3, "attn1")
    assert layer.unet and layer.level(4) == 1 and layer.level(3, 4) == 1 and layer.level(3) == 0
    assert layers.parse(N("d2.0.0.2")).level(4) == 2
    assert layers.parse(N("m.0.0.2")).level(4) == 3 and layers.parse(N("m.0.0.2")).block is None
    flux = layers.parse(N("s7.attn"))
    assert (flux.section, flux.block, flux.kind, flux.unet, flux.level(3)) == ("single", 7, "attn", False, None)
    with pytest.raises(ValueError):
        layers.select([N("d0.0.0.2")], level=0)  # a level needs the UNet depth


def test_execution_order():
    flux = Ns("s1.attn t1.attn s0.attn t0.attn")
    assert layers.execution_order(flux) == Ns("t0.attn t1.attn s0.attn s1.attn")
    assert layers.dit_blocks(flux) == [("dit", 0), ("dit", 1), ("single", 0), ("single", 1)]
    unet = Ns("u0.0.0.2 m.0.0.2 d1.0.0.2 d0.1.0.2 d0.0.0.2 u0.1.0.2")  # tiny's mid block is listed last
    assert layers.execution_order(unet) == Ns("d0.0.0.2 d0.1.0.2 d1.0.0.2 m.0.0.2 u0.0.0.2 u0.1.0.2")


# ----------------------------------------------------------------------------- the policies' sets per model

TINY_EXPECTED = {  # tiny and builtin share the layout (3 down blocks, the last without attention)
    "aas": "u1.0.0.1 u1.1.0.1 u2.0.0.1 u2.1.0.1",
    "cross": "d0.0.0.2 d1.0.0.2 u1.0.0.2 u1.1.0.2 u2.0.0.2 u2.1.0.2 m.0.0.2",
    "text/down": "d0.0.0.2 d1.0.0.2",
    "text/mid": "m.0.0.2",
    "text/up": "u1.0.0.2 u1.1.0.2 u2.0.0.2 u2.1.0.2",
    "capture": "d1.0.0.2 u1.0.0.2 u1.1.0.2",
    "self": "d0.0.0.1 u2.0.0.1 u2.1.0.1",
    "refine/0": "d0.0.0.1 u2.0.0.1 u2.1.0.1",
    "refine/1": "d1.0.0.1 u1.0.0.1 u1.1.0.1",
    "refine/2": "m.0.0.1",
    "refam/(1, 2)": "d1.0.0.2 m.0.0.2 u1.0.0.2 u1.1.0.2",
    "refam/(0, 1, 2)": "d0.0.0.2 d1.0.0.2 m.0.0.2 u1.0.0.2 u1.1.0.2 u2.0.0.2 u2.1.0.2",
}
SDXL_EXPECTED = {
    "aas": "u0.0.0.1 u0.0.1.1 u0.1.0.1 u0.1.1.1 u1.0.0.1 u1.1.0.1",
    "cross": "d1.0.0.2 d2.0.0.2 d2.0.1.2 u0.0.0.2 u0.0.1.2 u0.1.0.2 u0.1.1.2 u1.0.0.2 u1.1.0.2 m.0.0.2 m.0.1.2",
    "text/down": "d1.0.0.2 d2.0.0.2 d2.0.1.2",
    "text/mid": "m.0.0.2 m.0.1.2",
    "text/up": "u0.0.0.2 u0.0.1.2 u0.1.0.2 u0.1.1.2 u1.0.0.2 u1.1.0.2",
    "capture": "d1.0.0.2 u1.0.0.2 u1.1.0.2",
    "self": "",
    "refine/0": "",
    "refine/1": "d1.0.0.1 u1.0.0.1 u1.1.0.1",
    "refine/2": "d2.0.0.1 d2.0.1.1 u0.0.0.1 u0.0.1.1 u0.1.0.1 u0.1.1.1 m.0.0.1 m.0.1.1",
    "refam/(1, 2)": "d1.0.0.2 d2.0.0.2 d2.0.1.2 m.0.0.2 m.0.1.2 u0.0.0.2 u0.0.1.2 u0.1.0.2 u0.1.1.2 u1.0.0.2 u1.1.0.2",
    "refam/(0, 1, 2)": "d1.0.0.2 d2.0.0.2 d2.0.1.2 m.0.0.2 m.0.1.2 u0.0.0.2 u0.0.1.2 u0.1.0.2 u0.1.1.2 u1.0.0.2 u1.1.0.2",
}
UNET_AUTO_LEVELS = {  # latent side -> RefAM's automatic UNet levels
    "tiny": {8: (0,), 16: (0,), 32: (0, 1), 64: (1, 2), 128: (2,)},
    "tiny-sdxl": {8: (1,), 32: (1,), 64: (1, 2), 96: (1, 2), 128: (2,)},
}


@pytest.mark.parametrize("family", ("tiny", "builtin", "tiny-sdxl"))
def test_unet_layer_sets(model_layers, family):
    names, depth = model_layers[family]
    expected = {k: Ns(v) for k, v in (SDXL_EXPECTED if family == "tiny-sdxl" else TINY_EXPECTED).items()}
    assert depth == 3
    # AAS: the decoder self-attentions
    assert [n for n in names if is_aas_layer(n)] == expected["aas"] == layers.decoder_self_attention(names)
    # MedSteer and the personalization SOT detach: every cross-attention, in module order
    assert cross_attention_layers(names) == expected["cross"] == layers.cross_attention(names)
    assert cross_attention_layers(names, "up_blocks") == [n for n in expected["cross"] if n.startswith("up_blocks")]
    # heatmaps: the UNet's own blocks
    assert text_attention_layers(names) == set(expected["cross"])
    for where in ("down", "mid", "up"):
        assert text_attention_layers(names, where) == set(expected[f"text/{where}"])
    # DisenDiff / AttenCraft
    chosen = personalization_layers(names, depth, depth)
    assert chosen == {"attn2": expected["cross"], "capture": expected["capture"], "self": expected["self"]}
    # RefAM: attn2 at the chosen levels, depth = position among all cross-attentions in execution order
    ordered = layers.execution_order(expected["cross"])
    for levels in ((1, 2), (0, 1, 2)):
        for depth_range in ("first", "middle+last", "all"):  # a UNet has no depth thirds
            layer_depths = choose_layers(names, depth_range, "both", levels, depth)
            assert list(layer_depths) == expected[f"refam/{levels}"]
            assert all(d == ordered.index(n) / len(ordered) for n, d in layer_depths.items())
    for level in (0, 1, 2):
        assert self_attention_layers(names, level, depth) == expected[f"refine/{level}"]
    for side, levels in UNET_AUTO_LEVELS["tiny-sdxl" if family == "tiny-sdxl" else "tiny"].items():
        assert auto_unet_levels(names, side, depth) == levels
    assert layers.unet_levels(names, depth) == ((0, 1, 2) if family != "tiny-sdxl" else (1, 2))


def test_unet_depth_from_names(model_layers):
    # the tiny UNet's last down block has no attention: the names show 2 levels, the model has 3
    assert layers.unet_depth_from_names(model_layers["tiny"][0]) == 2
    assert layers.unet_depth_from_names(model_layers["tiny-sdxl"][0]) == 3
    assert layers.unet_depth_from_names(model_layers["tiny-flux"][0]) == 1
    tiny = model_layers["tiny"][0]
    assert choose_layers(tiny, unet_levels=(1, 2)) == {N("d1.0.0.2"): 1 / 7, N("m.0.0.2"): 2 / 7}


def test_transformer_layer_sets(model_layers):
    pixart, sd3, flux = (model_layers[f][0] for f in ("tiny-pixart", "tiny-sd3", "tiny-flux"))
    # PixArt: cross-attention attn2; two blocks cut by the heatmaps' partition (never empty)
    assert cross_attention_layers(pixart) == Ns("t0.attn2 t1.attn2")
    assert text_attention_layers(pixart) == set(Ns("t0.attn2 t1.attn2"))
    assert [text_attention_layers(pixart, w) for w in ("down", "mid", "up")] == [{N("t0.attn2")}, {N("t0.attn2")}, {N("t1.attn2")}]
    assert choose_layers(pixart, "all") == {}  # RefAM reads joint attention only
    # SD3 and FLUX: joint attention; heatmap groups by partition, RefAM ranges by depth
    for names, first, second in ((sd3, N("t0.attn"), N("t1.attn")), (flux, N("t0.attn"), N("s0.attn"))):
        assert cross_attention_layers(names) == [] and not any(map(is_aas_layer, names))
        assert [text_attention_layers(names, w) for w in ("all", "down", "mid", "up")] == [
            {first, second}, {first}, {first}, {second}]
        assert choose_layers(names, "first") == {first: 0.0}
        assert choose_layers(names, "middle") == {second: 0.5}
        assert choose_layers(names, "last") == {}
        assert choose_layers(names, "middle+last") == {second: 0.5}
        assert choose_layers(names, "all") == {first: 0.0, second: 0.5}
        assert self_attention_layers(names, 0) == [] and auto_unet_levels(names, 64) == ()
        with pytest.raises(ValueError):
            personalization_layers(names, 3, 3)
    assert choose_layers(flux, "all", "dual") == {N("t0.attn"): 0.0}
    assert choose_layers(flux, "all", "single") == {N("s0.attn"): 0.5}
    assert choose_layers(sd3, "all", "single") == {}


# ----------------------------------------------------------------------------- thirds by depth


def _old_refam_range(n, depth_range):
    """RefAM's split before the vocabulary: depth i/n in [lo, hi), epsilon-guarded."""
    lo, hi = {"first": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "last": (2 / 3, 1.0),
              "middle+last": (1 / 3, 1.0), "all": (0.0, 1.0)}[depth_range]
    return [i for i in range(n) if lo - 1e-9 <= i / n < hi - 1e-9 or (hi >= 1.0 and i / n >= lo - 1e-9)]


def _old_heatmap_group(n, third):
    """The heatmaps' split before the vocabulary: floor cuts, at least one block."""
    lo, hi = n * third // 3, n * (third + 1) // 3
    return list(range(n))[lo:max(hi, lo + 1)]


def test_third_reproduces_both_old_splits():
    for n in range(0, 121):
        for depth_range in layers.THIRDS:
            assert list(layers.third(n, depth_range, "depth")) == _old_refam_range(n, depth_range), (n, depth_range)
        for third, which in enumerate(("first", "middle", "last")):
            assert list(layers.third(n, which, "partition")) == _old_heatmap_group(n, third), (n, which)
        agree = all(layers.third(n, w, "depth") == layers.third(n, w, "partition") for w in ("first", "middle", "last"))
        assert agree == (n % 3 == 0), n  # the rules agree exactly on multiples of 3
    assert [len(layers.third(28, w, "depth")) for w in ("first", "middle", "last")] == [10, 9, 9]
    assert [len(layers.third(28, w, "partition")) for w in ("first", "middle", "last")] == [9, 9, 10]
    assert [list(layers.third(2, w, "depth")) for w in ("first", "middle", "last")] == [[0], [1], []]
    assert [list(layers.third(2, w, "partition")) for w in ("first", "middle", "last")] == [[0], [0], [1]]
    with pytest.raises(ValueError):
        layers.third(3, "second")
    with pytest.raises(ValueError):
        layers.third(3, "first", "round")


def _flux(dual=19, single=38):
    return [f"transformer_blocks.{i}.attn" for i in range(dual)] + [f"single_transformer_blocks.{i}.attn" for i in range(single)]


def test_thirds_on_flux_blocks():
    names = _flux()[::-1]  # any listing order: the split follows execution order
    dual = [f"transformer_blocks.{i}.attn" for i in range(19)]
    single = [f"single_transformer_blocks.{i}.attn" for i in range(38)]
    assert list(choose_layers(names, "first")) == dual
    assert list(choose_layers(names, "middle")) == single[:19]
    assert list(choose_layers(names, "last")) == single[19:]
    assert list(choose_layers(names, "middle+last")) == single
    assert choose_layers(names, "middle+last", "dual") == {}
    assert list(choose_layers(names, "all", "dual")) == dual
    assert choose_layers(names)[single[0]] == 19 / 57  # depth counts both families
    # 57 blocks: the heatmaps' partition gives the same thirds
    assert text_attention_layers(names, "down") == set(dual)
    assert text_attention_layers(names, "mid") == set(single[:19])
    assert text_attention_layers(names, "up") == set(single[19:])
    assert set(layers.in_third(names, "middle", "partition")) == set(layers.in_third(names, "middle", "depth"))


def test_thirds_on_sd3_blocks():
    names = [f"transformer_blocks.{i}.attn" for i in range(24)]
    blocks = [names[:8], names[8:16], names[16:]]
    for which, where, expected in zip(("first", "middle", "last"), ("down", "mid", "up"), blocks):
        assert list(choose_layers(names, which)) == expected
        assert text_attention_layers(names, where) == set(expected)
    assert list(choose_layers(names, "middle+last")) == names[8:]
    # SD3.5: the image-only attn2 of blocks 0..12 follows its block in the heatmaps, never in RefAM
    sd35 = names + [f"transformer_blocks.{i}.attn2" for i in range(13)]
    assert text_attention_layers(sd35, "down") == set(names[:8]) | {f"transformer_blocks.{i}.attn2" for i in range(8)}
    assert len(text_attention_layers(sd35, "mid")) == 13 and len(text_attention_layers(sd35, "up")) == 8
    assert list(choose_layers(sd35, "first")) == names[:8]
    assert len(cross_attention_layers(sd35)) == 13  # by name, as MedSteer always selected them


def test_thirds_on_pixart_blocks():
    names = [n for i in range(28) for n in (f"transformer_blocks.{i}.attn1", f"transformer_blocks.{i}.attn2")]
    cross = [f"transformer_blocks.{i}.attn2" for i in range(28)]
    # the heatmaps' partition of 28 blocks: 9, 9, 10
    assert text_attention_layers(names, "down") == set(cross[:9])
    assert text_attention_layers(names, "mid") == set(cross[9:18])
    assert text_attention_layers(names, "up") == set(cross[18:])
    # the depth rule: 10, 9, 9 (attn1 and attn2 of a block together)
    assert layers.in_third(names, "first") == names[:20]
    assert layers.in_third(cross, "last") == cross[19:]
    assert choose_layers(names, "all") == {}


def test_named_sets_compose():
    names = Ns("d0.0.0.1 d0.0.0.2 d1.0.1.1 d1.0.1.2 m.0.0.1 m.0.0.2 u0.0.0.1 u0.0.0.2 u1.0.0.1 u1.0.0.2")
    # "cross-attention at the 2nd level" (grid = latent / 2) of a 2-level UNet, first transformer block only
    assert layers.cross_attention(names, level=1, unet_depth=2) == Ns("d1.0.1.2 m.0.0.2 u0.0.0.2")
    assert layers.cross_attention(names, level=1, unet_depth=2, transformer_block=0) == Ns("m.0.0.2 u0.0.0.2")
    assert layers.self_attention(names, section=("down", "up"), level=0, unet_depth=2) == Ns("d0.0.0.1 u1.0.0.1")
    assert layers.text_attention(names + ["transformer_blocks.0.attn"]) == layers.cross_attention(names) + ["transformer_blocks.0.attn"]
    assert layers.joint_attention(_flux(1, 1), "single") == ["single_transformer_blocks.0.attn"]
    assert layers.matches(N("u0.0.0.1"), kind=layers.SELF, section="up")
    assert not layers.matches(N("u0.0.0.2"), kind=layers.SELF, section="up")
    with pytest.raises(ValueError):
        layers.joint_attention(names, "triple")
