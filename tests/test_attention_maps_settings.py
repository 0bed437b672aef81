"""Attention maps' settings: AttentionMapSettings holds each default once; the `generate` flags,
the tab's controls and the Python API's keyword overrides are made from it (offline, tiny model)."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app_server import built_tab
from pipelines.attention_maps_settings import DEFAULTS, LAYER_GROUPS, AttentionMapSettings
from pipelines.errors import UserInputError
from ui.settings_controls import UNSET
from ui.cli_settings import settings_from_args

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, height=64, width=64)

#: the tab's control of every field (its elem_id); a new field needs a control and a row here
TAB_CONTROLS = {
    "negative_prompt": "am-negative",
    "steps": "am-steps",
    "guidance": "am-guidance",
    "height": "am-height",
    "width": "am-width",
    "layers": "am-layers",
    "overlay_alpha": "am-overlay-alpha",
}


def parser() -> argparse.ArgumentParser:
    from ui.attention_maps_cli import add_generate_args

    p = argparse.ArgumentParser()
    add_generate_args(p)
    return p


def flags_of(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in p._actions for option in action.option_strings}


# ------------------------------------------------------------------------------ the settings


def test_the_defaults():
    assert DEFAULTS == AttentionMapSettings()
    assert (DEFAULTS.negative_prompt, DEFAULTS.layers, DEFAULTS.overlay_alpha) == ("", "all", 0.5)
    # decided per model (models.generation_defaults, models.default_size)
    assert (DEFAULTS.steps, DEFAULTS.guidance, DEFAULTS.height, DEFAULTS.width) == (None, None, None, None)
    assert DEFAULTS.validated() == DEFAULTS


def test_the_layer_groups_are_the_capture_ones():
    from attention_processors.heatmaps import LAYER_GROUPS as CAPTURE_GROUPS
    from pipelines.attention_maps import LAYER_CHOICES

    assert LAYER_GROUPS == tuple(CAPTURE_GROUPS) == tuple(LAYER_CHOICES)


def test_the_settings_and_the_flags_import_without_torch():
    code = ("import sys; import pipelines.attention_maps_settings, ui.attention_maps_cli; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("change, sentence", [
    (dict(steps=0), "Steps must be between 1 and 200, not 0."),
    (dict(steps=2.5), "Steps must be a whole number, not 2.5."),
    (dict(steps=float("nan")), "Steps must be a finite number, not nan."),
    (dict(guidance=31), "Guidance must be between 0 and 30, not 31."),
    (dict(guidance=-1), "Guidance must be between 0 and 30, not -1."),
    (dict(guidance="x"), "Guidance must be a number, not 'x'."),
    (dict(height=32), "Height must be between 64 and 2048, not 32."),
    (dict(width=4096), "Width must be between 64 and 2048, not 4096."),
    (dict(width=float("inf")), "Width must be a finite number, not inf."),
    (dict(layers="middle"), "Layers must be one of all, down, mid, up, not 'middle'."),
    (dict(layers=None), "Layers needs a value."),
    (dict(overlay_alpha=1.5), "The heatmap opacity must be between 0 and 1, not 1.5."),
    (dict(negative_prompt=None), "The negative prompt needs a value."),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_a_bad_value_is_one_sentence(change, sentence):
    with pytest.raises(UserInputError) as error:
        DEFAULTS.replace(**change).validated()
    assert str(error.value) == sentence


def test_validated_converts_to_the_fields_types():
    got = DEFAULTS.replace(steps=20.0, guidance=4, height=64.0, width="128").validated()
    assert (got.steps, got.guidance, got.height, got.width) == (20, 4.0, 64, 128)
    assert isinstance(got.steps, int) and isinstance(got.guidance, float) and isinstance(got.width, int)


def test_an_unknown_setting_is_a_type_error_not_ignored():
    with pytest.raises(TypeError):
        DEFAULTS.replace(guidance_scale=7.5)


# ------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize("name", list(AttentionMapSettings.specs()))
def test_every_field_is_a_flag_that_defaults_to_the_dataclass(name):
    f, spec, kind = AttentionMapSettings.specs()[name]
    p = parser()
    flag = spec.flag or "--" + name.replace("_", "-")
    action = flags_of(p)[flag]
    assert action.dest == name
    assert action.default is None  # "not given": the dataclass default applies
    assert getattr(settings_from_args(p.parse_args(["--prompt", "x"]), AttentionMapSettings), name) == f.default
    if spec.choices:
        assert tuple(action.choices) == spec.choices
    if not spec.optional:
        shown = f.default if f.default != "" else "empty"
        assert f"(default: {shown})" in action.help
    else:
        assert "default: the model's" in action.help


def test_the_documented_flags_are_still_there():
    flags = flags_of(parser())
    for flag in ("--prompt", "--negative-prompt", "--seed", "--steps", "--guidance", "--width", "--height",
                 "--layers", "--output", "--heatmaps", "--model", "--device"):
        assert flag in flags, flag


@pytest.mark.parametrize("argv, changes", [
    ([], {}),
    (["--steps", "2"], dict(steps=2)),
    (["--guidance", "4.5"], dict(guidance=4.5)),
    (["--width", "96", "--height", "64"], dict(width=96, height=64)),
    (["--layers", "up"], dict(layers="up")),
    (["--negative-prompt", "a dog"], dict(negative_prompt="a dog")),
    (["--overlay-alpha", "0.25"], dict(overlay_alpha=0.25)),
])
def test_a_flag_changes_only_its_field(argv, changes):
    args = parser().parse_args(["--prompt", "a cat", *argv])
    assert settings_from_args(args, AttentionMapSettings) == DEFAULTS.replace(**changes)


# ------------------------------------------------------------------------------ the tab


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    """The built tab's controls by elem_id, and its handler (the /attention_maps endpoint)."""
    from ui.attention_maps_tab import build_tab, make_handler

    controls, ctx = built_tab(build_tab, tmp_path_factory.mktemp("outputs"))
    return controls, make_handler(ctx)


def test_every_field_has_a_tab_control():
    assert set(TAB_CONTROLS) == set(AttentionMapSettings.specs())


@pytest.mark.parametrize("name", list(AttentionMapSettings.specs()))
def test_the_tab_controls_start_at_the_dataclass_defaults(tab, name):
    controls, handler = tab
    f, spec, _ = AttentionMapSettings.specs()[name]
    control = controls[TAB_CONTROLS[name]]
    # "the model's own" (None) is 0 in the tab: a browser shows an empty number box as 0 and sends 0
    expected = UNSET if f.default is None else f.default
    assert control.value == expected, (name, control.value)
    if spec.maximum is not None:
        assert control.maximum == spec.maximum
    if spec.choices:
        assert [value for _, value in control.choices] == list(spec.choices)
    # the API endpoint's parameter of the same name has the same default
    assert inspect.signature(handler).parameters[name].default == expected


@pytest.mark.timeout(300)
def test_the_tabs_zero_means_the_models_steps_guidance_and_size(tab):
    """What a browser sends for untouched boxes (0) gives the model's defaults, not CFG 0."""
    _, handler = tab
    image, gallery, seed, files = handler("tiny", "a red cat", "", 3, False, 0, 0, 0, 0, "all", 0.5,
                                          progress=lambda *a, **k: None)
    [sidecar] = [f for f in files if f.endswith(".json")]
    params = json.loads(Path(sidecar).read_text())
    assert (params["steps"], params["guidance"], params["height"], params["width"]) == (25, 7.5, 64, 64)


def test_the_api_parameters_keep_their_order():
    from ui.attention_maps_tab import make_handler
    from ui.common import AppContext

    names = list(inspect.signature(make_handler(AppContext(default_model="tiny"))).parameters)
    assert names[:10] == ["model", "prompt", "negative_prompt", "seed", "randomize_seed", "steps", "guidance",
                          "width", "height", "layers"]


def test_the_tab_refuses_a_bad_value_before_loading_the_model(tab):
    import gradio as gr

    _, handler = tab
    with pytest.raises(gr.Error) as error:
        handler("no-such-model", "a cat", steps=201)
    assert "Steps must be between 1 and 200, not 201." in str(error.value)


@pytest.mark.timeout(300)
def test_the_tab_passes_its_values_through(tab):
    _, handler = tab
    image, gallery, seed, files = handler("tiny", "a red cat", "a dog", 4, False, 2, 3.0, 0, 64, "down", 0.25,
                                          progress=lambda *a, **k: None)
    assert seed == 4 and len(gallery) == 3
    [sidecar] = [f for f in files if f.endswith(".json")]
    record = json.loads(Path(sidecar).read_text())
    assert {k: record[k] for k in ("negative_prompt", "steps", "guidance", "height", "width", "layers")} == dict(
        negative_prompt="a dog", steps=2, guidance=3.0, height=64, width=64, layers="down")  # width 0: the model's
    assert record["overlay_alpha"] == 0.25


# ------------------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def pipe():
    from pipelines import models

    return models.load("tiny", device="cpu", dtype=None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("settings, overrides, expected", [
    (None, dict(FAST), dict(steps=2, guidance=7.5, layers="all", negative_prompt="")),  # tiny: SD's guidance
    (None, dict(FAST, guidance=3.0, layers="up", negative_prompt="a dog"),
     dict(steps=2, guidance=3.0, layers="up", negative_prompt="a dog")),
    (DEFAULTS.replace(steps=1, layers="down", height=64, width=64), dict(layers="mid"), dict(steps=1, layers="mid")),
    (DEFAULTS.replace(steps=1, height=64, width=64), dict(guidance=0), dict(steps=1, guidance=0.0, layers="all")),
], ids=["keywords", "every-override", "settings-then-override", "no-cfg"])
def test_overrides_reach_the_result_params(pipe, settings, overrides, expected):
    from pipelines.attention_maps import generate_with_attention_maps

    result = generate_with_attention_maps(pipe, "a red cat", settings, seed=1, progress=False, **overrides)
    assert {k: result.params[k] for k in expected} == expected
    assert (result.params["height"], result.params["width"]) == (64, 64) and result.seed == 1
    assert result.maps.shape == (3, 64, 64)


@pytest.mark.timeout(300)
def test_the_overlay_alpha_reaches_the_overlays_and_the_sidecar(pipe, tmp_path):
    from pipelines.attention_maps import generate_with_attention_maps

    result = generate_with_attention_maps(pipe, "a cat", seed=0, overlay_alpha=0.0, **FAST)
    assert result.overlay_alpha == 0.0
    assert result.overlays()[0][0].tobytes() == result.image.convert("RGB").tobytes()  # alpha 0: the image
    assert result.overlays(alpha=1.0)[0][0].tobytes() != result.image.convert("RGB").tobytes()
    result.save(tmp_path / "out.png", heatmap_dir=tmp_path / "maps")
    assert json.loads((tmp_path / "out.json").read_text())["overlay_alpha"] == 0.0


def test_a_bad_override_is_one_sentence_and_an_unknown_one_a_type_error(pipe):
    from pipelines.attention_maps import generate_with_attention_maps

    with pytest.raises(UserInputError) as error:
        generate_with_attention_maps(pipe, "a cat", seed=0, steps=0)
    assert str(error.value) == "Steps must be between 1 and 200, not 0."
    with pytest.raises(TypeError):
        generate_with_attention_maps(pipe, "a cat", seed=0, num_inference_steps=2)
    with pytest.raises(TypeError):  # the old positional negative prompt is no settings object
        generate_with_attention_maps(pipe, "a cat", "a dog")
