"""Segment by text's settings: GroundingSettings holds each default once; the `segment` CLI flags,
the tab's controls and the Python API's keyword overrides are made from it, and a bad value is
one sentence (pipelines/grounding_settings.py, ui/segment_cli.py, ui/segment_tab.py)."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_server import cli_in_process
from pipelines.errors import UserInputError
from pipelines.grounding_settings import DEFAULTS, GroundingSettings
from ui.cli_settings import settings_from_args
from ui.segment_cli import add_segment_args

ROOT = Path(__file__).resolve().parents[1]
SPECS = GroundingSettings.specs()
REQUIRED = ["--image", "in.png", "--text", "the red circle", "--output", "out.png"]
EXPRESSION = "the red circle on the left"
# flags that README, the tests or earlier releases use: they must keep working
KEPT_FLAGS = ["--size", "--sigma", "--timestep", "--depth", "--blocks", "--norm", "--gas", "--magnets", "--no-colour",
              "--target", "--threshold", "--refine", "--sam2", "--seed", "--batch-frames", "--max-frames", "--heatmap"]
# fields whose flag value is not simply their value in text: (flag argument, validated value)
SPECIAL_VALUES = {"threshold": ("0.4", 0.4), "unet_levels": ("1,2", (1, 2)), "sam2": ("my/sam2", "my/sam2"),
                  "renorm": ("on", True)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_segment_args(p)
    return p


def actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser()._actions}


def other_value(name: str):
    """(flag argument or None for a switch, the value it gives): a valid value other than the default."""
    if name in SPECIAL_VALUES:
        return SPECIAL_VALUES[name]
    f, spec, kind = SPECS[name]
    if kind is bool:
        return None, not f.default
    if spec.choices:
        choice = next(c for c in spec.choices if c != f.default)
        return choice, choice
    base = f.default if f.default is not None else spec.minimum
    step = spec.step or 1
    value = base + step if spec.maximum is None or base + step <= spec.maximum else base - step
    value = kind(value)
    return repr(value), value


def image(width=96, height=64, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), np.uint8))


# ------------------------------------------------------------------------------ the dataclass


def test_the_defaults_are_valid_and_unchanged():
    assert DEFAULTS.validated() == DEFAULTS == GroundingSettings()
    assert (DEFAULTS.depth, DEFAULTS.sigma, DEFAULTS.timestep, DEFAULTS.guidance, DEFAULTS.magnets,
            DEFAULTS.tau_mass, DEFAULTS.tau_cv, DEFAULTS.l_gas, DEFAULTS.threshold, DEFAULTS.renorm) == \
        ("middle+last", 0.3, 300, 3.5, 4, 4.0, 0.5, 0.5, "otsu", None)


def test_every_field_has_help_and_a_label():
    for name, (_, spec, _) in SPECS.items():
        assert spec.help and not spec.help.endswith("."), name
        assert GroundingSettings.label(name)


def test_the_choices_are_the_policys():
    from attention_processors import refam
    from pipelines import grounding, grounding_settings

    assert SPECS["depth"][1].choices == tuple(refam.DEPTH_RANGES)
    assert SPECS["blocks"][1].choices == refam.BLOCK_FAMILIES
    assert SPECS["norm"][1].choices == refam.NORMS
    assert SPECS["gas"][1].choices == refam.GAS_MODES
    assert grounding.MAGNET_WORDS is grounding_settings.MAGNET_WORDS
    assert SPECS["magnets"][1].maximum == len(grounding.MAGNET_WORDS)


def test_the_tabs_noise_slider_maps_the_default_sigma_to_the_default_timestep():
    from ui.segment_tab import unet_timestep

    assert unet_timestep(DEFAULTS.sigma) == DEFAULTS.timestep


@pytest.mark.parametrize("change, sentence", [
    (dict(sigma=1), "The noise level sigma must be above 0 and at most 0.99, not 1."),
    (dict(sigma=0), "The noise level sigma must be above 0 and at most 0.99, not 0."),
    (dict(timestep=1000), "The UNet timestep must be between 0 and 999, not 1000."),
    (dict(guidance=float("nan")), "FLUX guidance must be a finite number, not nan."),
    (dict(magnets=9), "Magnet words must be between 0 and 8, not 9."),
    (dict(magnets=2.5), "Magnet words must be a whole number, not 2.5."),
    (dict(depth="deep"), "Depth must be one of first, middle, last, middle+last, all, not 'deep'."),
    (dict(gas="ignore"), "The GAS mode must be one of none, exclude, suppress, redirect, not 'ignore'."),
    (dict(size=32), "The working size must be between 64 and 2048, not 32."),
    (dict(threshold=1.5), "The threshold must be 'otsu' or a number between 0 and 1, not 1.5."),
    (dict(threshold="half"), "The threshold must be 'otsu' or a number between 0 and 1, not 'half'."),
    (dict(unet_levels="1,x"), "UNet levels must be whole numbers of 0 or more, such as 1,2, not '1,x'."),
    (dict(unet_levels=()), "UNet levels must be whole numbers of 0 or more, such as 1,2, not ()."),
    (dict(renorm="maybe"), "Renormalisation must be on or off, not 'maybe'."),
    (dict(n_noise=0), "Noise draws must be between 1 and 16, not 0."),
    (dict(seed=-1), "The seed must be between 0 and 4294967295, not -1."),
    (dict(batch_frames=0), "The frame batch must be at least 1, not 0."),
    (dict(sigma=None), "The noise level sigma needs a value."),
])
def test_a_bad_value_is_one_sentence(change, sentence):
    with pytest.raises(UserInputError) as error:
        DEFAULTS.replace(**change).validated()
    assert str(error.value) == sentence


@pytest.mark.parametrize("name", [n for n, (_, s, k) in SPECS.items()
                                  if s.choices or (k in (int, float) and (s.maximum is not None or s.minimum is not None
                                                                          or s.above is not None))])
def test_every_limited_field_refuses_a_value_outside_its_limits_in_one_sentence(name):
    _, spec, kind = SPECS[name]
    if spec.choices:
        bad = "no such choice"
    elif spec.maximum is not None:
        bad = spec.maximum + 1
    else:
        bad = (spec.minimum if spec.minimum is not None else spec.above) - 1
    with pytest.raises(UserInputError) as error:
        DEFAULTS.replace(**{name: bad}).validated()
    message = str(error.value)
    assert message.startswith(GroundingSettings.label(name)) and message.endswith(".") and "\n" not in message


def test_validated_converts_ui_numbers_and_cli_text_to_the_fields_types():
    got = DEFAULTS.replace(magnets=2.0, size=512.0, timestep=250.0, threshold="0.25", unet_levels="0, 1").validated()
    assert (got.magnets, got.size, got.timestep, got.threshold, got.unet_levels) == (2, 512, 250, 0.25, (0, 1))
    assert isinstance(got.magnets, int) and isinstance(got.size, int)
    assert DEFAULTS.replace(unet_levels=[1, 2]).validated().unet_levels == (1, 2)  # hashable: a cache key


def test_an_unknown_setting_is_a_type_error_not_ignored():
    with pytest.raises(TypeError):
        DEFAULTS.replace(noise=0.3)


# ------------------------------------------------------------------------------ the CLI


def test_every_field_is_a_flag_and_no_flag_means_the_default():
    found = actions()
    for name, (f, spec, kind) in SPECS.items():
        assert name in found, f"no flag for {name}"
        if kind is not bool and not spec.optional:
            assert f"(default: {f.default}" in found[name].help, name  # then "; builtin: ..." where it differs
    args = parser().parse_args(REQUIRED)
    assert settings_from_args(args, GroundingSettings) == DEFAULTS
    assert settings_from_args(args, GroundingSettings).validated() == DEFAULTS


@pytest.mark.parametrize("name", list(SPECS))
def test_each_flag_changes_only_its_field(name):
    flag = actions()[name].option_strings[0]
    text, value = other_value(name)
    argv = REQUIRED + [flag] + ([] if text is None else [text])
    got = settings_from_args(parser().parse_args(argv), GroundingSettings).validated()
    assert got == DEFAULTS.replace(**{name: value}), argv


@pytest.mark.parametrize("flag", KEPT_FLAGS)
def test_the_flags_people_use_still_exist(flag):
    option_strings = {s for a in parser()._actions for s in a.option_strings}
    assert flag in option_strings


def test_help_shows_the_defaults_without_importing_torch():
    code = ("import argparse, sys\n"
            "from ui.segment_cli import add_segment_args\n"
            "p = argparse.ArgumentParser(); add_segment_args(p); text = p.format_help()\n"
            "assert '(default: 0.3)' in text and '(default: middle+last)' in text, text\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


cli = cli_in_process


@pytest.mark.parametrize("flags, fragment", [
    (["--threshold", "2"], "The threshold must be 'otsu' or a number between 0 and 1, not '2'."),
    (["--unet-levels", "one"], "UNet levels must be whole numbers of 0 or more, such as 1,2, not 'one'."),
    (["--sigma", "1"], "The noise level sigma must be above 0 and at most 0.99, not 1."),
    (["--magnets", "12"], "Magnet words must be between 0 and 8, not 12."),
])
def test_a_bad_flag_value_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, fragment):
    from pipelines import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "mask.png"
    code, err = cli(capsys, "segment", "--image", str(tmp_path / "in.png"), "--text", "the red circle",
                    "--output", str(out), "--model", "tiny-flux", *flags)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_flags_reach_the_result(tmp_path, capsys):
    source = tmp_path / "in.png"
    image().save(source)
    out = tmp_path / "mask.png"
    code, err = cli(capsys, "segment", "--image", str(source), "--text", "the red circle", "--output", str(out),
                    "--model", "tiny-flux", "--size", "64", "--magnets", "2", "--no-colour", "--threshold", "0.4",
                    "--gas", "none", "--renorm", "off")
    assert code == 0, err
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["size"], record["magnets"], record["colour"], record["gas"], record["renorm"]) == \
        (64, 2, False, "none", False)
    assert record["prompt"] == "the red circle and of"
    assert record["threshold"] == pytest.approx(102 / 255)  # 0.4 on the 0-255 scale of the heatmap


# ------------------------------------------------------------------------------ the tab


@pytest.fixture(scope="module")
def tab_controls():
    import gradio as gr

    from ui.common import AppContext
    from ui.segment_tab import build_tab

    with gr.Blocks() as demo:
        build_tab(AppContext(default_model="tiny"))
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


# control id: the field it sets
TAB = {"seg-size": "size", "seg-noise": "sigma", "seg-gas": "gas", "seg-norm": "norm", "seg-magnets": "magnets",
       "seg-threshold": "threshold", "seg-refine": "refine", "seg-seed": "seed"}


def tab_values(controls) -> dict:
    keys = {"size": "size", "sigma": "noise", "gas": "gas", "norm": "norm", "magnets": "magnets",
            "threshold": "threshold", "refine": "refine", "seed": "seed"}
    return {keys[field]: controls[elem_id].value for elem_id, field in TAB.items()}


def test_the_tabs_controls_start_at_the_settings_defaults(tab_controls):
    from ui.segment_tab import tab_settings

    assert tab_settings("tiny", **tab_values(tab_controls)) == DEFAULTS
    for elem_id, name in TAB.items():  # the encodings: 0 = the model's size / Otsu
        value = tab_controls[elem_id].value
        assert value == {"size": 0, "threshold": 0}.get(name, getattr(DEFAULTS, name)), elem_id


def test_the_tabs_controls_stay_inside_the_settings_limits(tab_controls):
    for elem_id, name in TAB.items():
        control, (_, spec, _) = tab_controls[elem_id], SPECS[name]
        if spec.choices:
            assert [value for _, value in control.choices] == list(spec.choices), elem_id
        if getattr(control, "maximum", None) is not None and spec.maximum is not None:
            assert control.maximum <= spec.maximum, elem_id
        if name in ("sigma", "magnets"):
            low = spec.minimum if spec.minimum is not None else spec.above
            assert control.minimum >= low and (spec.above is None or control.minimum > spec.above), elem_id


def test_the_endpoints_defaults_are_the_models_and_the_controls_start_there(tab_controls):
    from ui.common import AppContext
    from ui.segment_tab import make_handler, tab_settings

    # an API call that leaves a setting out gets the model's default (None: `for_model`), which
    # is where the tab's controls start for the menu's first model
    parameters = inspect.signature(make_handler(AppContext(default_model="tiny"))).parameters
    for keyword in tab_values(tab_controls):
        assert parameters[keyword].default in (None, 0), keyword  # 0: the size box's "the model's"
    assert tab_settings("tiny") == tab_settings("tiny", **tab_values(tab_controls))


def test_the_tab_refuses_a_bad_value_in_one_sentence():
    from ui.segment_tab import tab_settings

    with pytest.raises(UserInputError, match="^The noise level sigma must be above 0"):
        tab_settings("tiny", noise=1.5)
    assert tab_settings("tiny", noise=0.5).timestep == 500 and tab_settings("tiny", threshold=0.3).threshold == 0.3
    assert tab_settings("tiny", size=256.0).size == 256


# ------------------------------------------------------------------------------ the Python API


def test_the_api_applies_overrides_on_top_of_the_settings(tiny_pipe):
    from pipelines.grounding import segment_image

    pipe = tiny_pipe("tiny-flux")
    by_keyword = segment_image(pipe, image(), EXPRESSION, size=64, gas="none", magnets=2.0)
    by_settings = segment_image(pipe, image(), EXPRESSION, GroundingSettings(size=64, gas="none", magnets=2))
    both = segment_image(pipe, image(), EXPRESSION, GroundingSettings(size=64, gas="none"), magnets=2)
    for result in (by_keyword, by_settings, both):
        assert (result.params["size"], result.params["gas"], result.params["magnets"]) == (64, "none", 2)
        assert isinstance(result.params["magnets"], int)
        assert result.params["prompt"] == EXPRESSION + " and of green"
    assert np.array_equal(by_keyword.heatmap, by_settings.heatmap) and np.array_equal(both.heatmap, by_settings.heatmap)
    assert by_keyword.params["tau_mass"] == DEFAULTS.tau_mass  # the rest: the defaults


def test_the_api_checks_the_settings_before_any_work(tiny_pipe):
    from pipelines.grounding import segment_image, segment_video

    pipe = tiny_pipe("tiny-flux")
    with pytest.raises(UserInputError) as error:
        segment_image(pipe, None, EXPRESSION, size=64, threshold=1.5)  # no image needed to find out
    assert str(error.value) == "The threshold must be 'otsu' or a number between 0 and 1, not 1.5."
    with pytest.raises(UserInputError, match="^The frame batch must be at least 1"):
        segment_video(pipe, [], EXPRESSION, batch_frames=0)
    with pytest.raises(TypeError):
        segment_image(pipe, image(), EXPRESSION, noise=0.3)


def test_the_video_api_applies_overrides(tiny_pipe):
    from pipelines.grounding import segment_video

    result = segment_video(tiny_pipe("tiny-flux"), [image(seed=s) for s in range(3)], EXPRESSION,
                           GroundingSettings(size=64), batch_frames=2, temporal_window=1)
    assert result.masks.shape == (3, 64, 96)
    assert (result.params["batch_frames"], result.params["temporal_window"], result.params["size"]) == (2, 1, 64)
