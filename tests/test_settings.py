"""Task settings: one dataclass holds each default; the CLI flags and the tab's controls are made from it."""

import argparse
import dataclasses

import pytest

from pipelines.eraser_settings import PAPER, EraserSettings
from pipelines.errors import UserInputError
from ui.cli_settings import add_settings_arguments, settings_from_args


def parser():
    p = argparse.ArgumentParser()
    add_settings_arguments(p, EraserSettings)
    return p


def test_the_eraser_defaults_are_the_papers():
    assert (PAPER.mode, PAPER.steps, PAPER.guidance, PAPER.ss_steps, PAPER.ss_scale) == ("sip", 50, 9.0, 9, 0.3)
    assert PAPER.resolved_strength() == 0.8 and PAPER.replace(mode="dip").resolved_strength() == 1.0


def test_every_field_is_a_flag_and_help_shows_its_default():
    actions = {a.dest: a for a in parser()._actions}
    for name, (f, spec, kind) in EraserSettings.specs().items():
        assert name in actions, name
        if kind is not bool and not spec.optional:
            assert f"(default: {f.default}" in actions[name].help  # then "; builtin: ..." where it differs


def test_no_flag_means_the_default_and_flags_change_only_their_field():
    assert settings_from_args(parser().parse_args([]), EraserSettings) == PAPER
    args = parser().parse_args(["--steps", "20", "--mode", "dip", "--no-composite", "--freeu", "on", "--no-aas"])
    got = settings_from_args(args, EraserSettings)
    assert got == dataclasses.replace(PAPER, steps=20, mode="dip", composite=False, freeu=True, aas=False)


@pytest.mark.parametrize("change, sentence", [
    (dict(steps=0), "Steps must be between 1 and 200, not 0."),
    (dict(steps=2.5), "Steps must be a whole number, not 2.5."),
    (dict(steps=float("nan")), "Steps must be a finite number, not nan."),
    (dict(strength=0), "Strength must be above 0 and at most 1, not 0."),
    (dict(mode="ddpm"), "Mode must be one of sip, dip, not 'ddpm'."),
    (dict(guidance="x"), "The removal guidance scale must be a number, not 'x'."),
    (dict(steps=2, strength=0.3), "With 2 steps at strength 0.3 no step would run; raise the steps or the strength."),
])
def test_a_bad_value_is_one_sentence(change, sentence):
    with pytest.raises(UserInputError) as error:
        PAPER.replace(**change).validated()
    assert str(error.value) == sentence


def test_an_unknown_setting_is_a_type_error_not_ignored():
    with pytest.raises(TypeError):
        PAPER.replace(rm_guidance_scale=9)


def test_validated_converts_slider_floats_to_the_fields_types():
    got = PAPER.replace(steps=20.0, num_images=2.0, grow=-3.0).validated()
    assert (got.steps, got.num_images, got.grow) == (20, 2, -3) and isinstance(got.steps, int)


def test_tab_controls_take_range_and_default_from_the_settings():
    from ui.settings_controls import slider

    steps = slider(EraserSettings, "steps")
    assert (steps.minimum, steps.maximum, steps.value, steps.step) == (1, 200, 50, 1)
    scale = slider(EraserSettings, "ss_scale")  # above 0: starts one step above
    assert (scale.minimum, scale.maximum, scale.value) == (0.05, 1, 0.3)


def test_a_number_box_of_a_field_decided_elsewhere_starts_at_unset_and_reads_back_none():
    """A browser shows and sends an empty number box as 0: a None-default field's box starts at
    UNSET (0), admits it below the field's minimum, and `unset` turns it back into None."""
    from pipelines.steering_settings import DirectionSettings
    from ui.settings_controls import UNSET, number, unset

    box = number(EraserSettings, "strength")  # None: 0.8 for SIP, 1.0 for DIP
    assert box.value == UNSET and (box.minimum is None or box.minimum <= UNSET)
    width = number(DirectionSettings, "width")  # None: the model's; the field's minimum is 64
    assert width.value == UNSET and width.minimum == UNSET
    assert number(EraserSettings, "steps").value == PAPER.steps  # a real default is shown as it is
    assert [unset(v) for v in (None, UNSET, 0.0, 7.5, 64)] == [None, None, None, 7.5, 64]
