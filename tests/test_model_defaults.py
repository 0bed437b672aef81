"""A model's own measured defaults (`task_defaults.json` in its folder, `Settings.for_model`).

The paper's defaults stay the settings dataclasses' (one place); a model folder may replace
some of them for that model only.  Whatever the user gives (a keyword, a flag, a control, an
API value) wins; the Python API, the CLI, the tab and the endpoint agree on what is left out.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from pipelines import model_defaults
from pipelines.eraser_settings import PAPER, EraserSettings
from pipelines.grounding_settings import DEFAULTS, OTSU, GroundingSettings
from ui.cli_settings import add_settings_arguments, settings_from_args


def _folder(tmp_path, content) -> str:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / model_defaults.FILE_NAME).write_text(content if isinstance(content, str) else json.dumps(content))
    model_defaults._read.cache_clear()
    return str(folder)


def test_the_builtin_model_ships_measured_defaults_and_others_get_the_papers():
    builtin = json.loads((model_defaults.BUILTIN_FOLDERS["builtin"] / model_defaults.FILE_NAME).read_text())
    eraser = EraserSettings.for_model("builtin")
    assert {name: getattr(eraser, name) for name in builtin["eraser"]} == builtin["eraser"]
    assert eraser != PAPER  # measured to fail on this model (model card, "Limits, measured")
    grounding = GroundingSettings.for_model("builtin")
    assert {name: getattr(grounding, name) for name in builtin["grounding"]} == builtin["grounding"]
    for other in ("tiny", "stabilityai/stable-diffusion-2-1-base", "/no/such/folder", ""):
        assert EraserSettings.for_model(other) == PAPER and GroundingSettings.for_model(other) == DEFAULTS


def test_a_given_value_wins_over_the_models_default():
    assert EraserSettings.for_model("builtin", guidance=9.0, strength=None).guidance == 9.0
    assert EraserSettings.for_model("builtin", strength=None).resolved_strength() == PAPER.resolved_strength()
    assert GroundingSettings.for_model("builtin", threshold=OTSU).threshold == OTSU


def test_a_folder_file_that_is_bad_or_names_unknown_settings_changes_nothing_else(tmp_path):
    folder = _folder(tmp_path, {"eraser": {"steps": 20, "no_such_setting": 1}, "grounding": "not a table"})
    assert EraserSettings.for_model(folder) == PAPER.replace(steps=20)
    assert GroundingSettings.for_model(folder) == DEFAULTS
    for broken in ("{not json", "[1, 2]"):
        assert EraserSettings.for_model(_folder(tmp_path, broken)) == PAPER


def test_a_bad_value_in_a_model_folder_is_one_sentence_at_validation(tmp_path):
    from pipelines.errors import UserInputError

    folder = _folder(tmp_path, {"eraser": {"steps": 0}})
    with pytest.raises(UserInputError, match="^Steps must be between 1 and 200, not 0.$"):
        EraserSettings.for_model(folder).validated()


def test_the_cli_uses_the_models_defaults_for_flags_left_out_and_help_names_them():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, EraserSettings)
    builtin = EraserSettings.for_model("builtin")
    assert settings_from_args(parser.parse_args([]), EraserSettings, model="builtin") == builtin
    assert settings_from_args(parser.parse_args([]), EraserSettings, model="tiny") == PAPER
    given = settings_from_args(parser.parse_args(["--guidance", "9"]), EraserSettings, model="builtin")
    assert given == builtin.replace(guidance=9.0)
    helps = {action.dest: action.help for action in parser._actions}
    assert f"(default: 9.0; builtin: {builtin.guidance})" in helps["guidance"]
    assert f"(builtin: {builtin.strength})" in helps["strength"]
    assert f"(default: empty; builtin: {builtin.fill_prompt})" in helps["fill_prompt"]


def test_the_python_api_takes_the_models_defaults_when_no_settings_are_given(tmp_path):
    from pipelines import eraser, models

    folder = tmp_path / "tiny-with-defaults"
    models.save_tiny("tiny", folder)
    (folder / model_defaults.FILE_NAME).write_text(json.dumps({"eraser": {"strength": 1.0, "guidance": 2.0}}))
    model_defaults._read.cache_clear()
    pipe = models.load(str(folder), device="cpu")
    image, mask = np.full((64, 64, 3), 200, np.uint8), np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    own = eraser.erase(pipe, image, mask, seed=0, steps=2, progress=False).params
    assert (own["strength"], own["guidance"]) == (1.0, 2.0)
    paper = eraser.erase(pipe, image, mask, PAPER, seed=0, steps=2, progress=False).params
    assert (paper["strength"], paper["guidance"]) == (0.8, 9.0)


@pytest.fixture(scope="module")
def builtin_first_tabs():
    """The Remove and Segment tabs of an app whose menu starts with builtin, then tiny."""
    import gradio as gr

    from ui import eraser_tab, segment_tab
    from ui.common import AppContext

    ctx = AppContext(default_model="builtin", extra_models=("tiny",))
    with gr.Blocks() as demo:
        eraser_tab.build_tab(ctx)
        segment_tab.build_tab(ctx)
    return ctx, {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def test_the_tabs_controls_start_at_the_first_models_defaults(builtin_first_tabs):
    ctx, controls = builtin_first_tabs
    assert ctx.model_choices[0] == "builtin"
    builtin = EraserSettings.for_model("builtin")
    assert (controls["er-strength"].value, controls["er-guidance"].value) == (builtin.strength, builtin.guidance)
    assert "as measured on it" in controls["er-guidance"].info
    assert controls["er-fill"].value == builtin.fill_prompt and "the paper's: none" in controls["er-fill"].info
    grounding = GroundingSettings.for_model("builtin")
    assert controls["seg-threshold"].value == grounding.threshold and controls["seg-noise"].value == grounding.sigma
    assert "as measured on it" in controls["seg-threshold"].info


def test_another_model_moves_the_controls_left_at_a_default_and_keeps_the_users_values(builtin_first_tabs):
    from ui.eraser_tab import _control_value
    from ui.settings_controls import followed_fields, model_default_updates

    ctx, _ = builtin_first_tabs
    names = followed_fields(EraserSettings, ctx.model_choices)
    assert set(names) >= {"strength", "guidance"}
    builtin = [_control_value(EraserSettings.for_model("builtin"), name) for name in names]
    updates = model_default_updates(EraserSettings, names, "tiny", builtin, ctx.model_choices, _control_value)
    assert [u["value"] for u in updates] == [_control_value(PAPER, name) for name in names]
    touched = [7.5 if name == "guidance" else value for name, value in zip(names, builtin)]
    updates = model_default_updates(EraserSettings, names, "tiny", touched, ctx.model_choices, _control_value)
    assert "value" not in updates[names.index("guidance")]  # the user's 7.5 stays
    back = model_default_updates(EraserSettings, names, "builtin", [_control_value(PAPER, n) for n in names],
                                 ctx.model_choices, _control_value)
    assert [u["value"] for u in back] == builtin


def test_the_tabs_endpoints_use_the_models_defaults_for_values_left_out():
    from ui.segment_tab import tab_settings

    assert tab_settings("builtin") == GroundingSettings.for_model("builtin")  # smoothing too, which has no control
    assert tab_settings("tiny") == DEFAULTS
    assert tab_settings("builtin", threshold=0).threshold == OTSU  # the slider's 0 is still Otsu
