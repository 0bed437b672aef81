"""Personalize's settings: one dataclass per method holds each default; the CLI flags and the tab's
controls are made from them; a bad value is one sentence, from the settings, wherever it is sent."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from app_server import built_tab
from pipelines import personalize
from pipelines.errors import UserInputError
from pipelines.personalize import (
    METHODS,
    PAPER_DEFAULTS,
    SAMPLING,
    AttenCraftSettings,
    DisenDiffSettings,
    PersonalizeSettings,
)
from ui.cli_settings import variant_settings_from_args

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {name: kind.settings for name, kind in METHODS.items()}
TRAIN_FIELDS = [(method, name) for method, cls in SETTINGS.items() for name in cls.specs() if name not in SAMPLING]
SAMPLE_FIELDS = [(method, name) for method, cls in SETTINGS.items() for name in SAMPLING]


def parser(step: str) -> argparse.ArgumentParser:
    from ui.personalize_cli import add_personalize_args

    p = argparse.ArgumentParser()
    add_personalize_args(p)
    return p._subparsers._group_actions[0].choices[step]


def train_args(*argv: str) -> argparse.Namespace:
    return parser("train").parse_args(["--image", "photo.png", "--concepts", "cat,dog", "--output", "run", *argv])


def one_sentence(text: str) -> None:
    assert "\n" not in text and text.endswith(".") and text[0].isupper(), text


# ------------------------------------------------------------------------------ the dataclasses


def test_the_paper_defaults_are_those_the_module_named():
    """The values the old PAPER_DEFAULTS dicts held, now in one dataclass per method."""
    d, a = DisenDiffSettings(), AttenCraftSettings()
    assert (d.steps, d.lr, d.batch_size, d.grad_accum, d.max_grad_norm, d.alpha, d.augment, d.checkpoint_every) == \
        (250, 8e-5, 2, 4, None, 0.01, True, 50)
    assert (d.sample_steps, d.sample_guidance, DisenDiffSettings.SAMPLE_ETA, DisenDiffSettings.SAMPLE_SCHEDULER) == \
        (50, 6.0, 1.0, "ddim")
    assert (a.steps, a.lr, a.batch_size, a.grad_accum, a.max_grad_norm, a.tau, a.refresh_every, a.full_prompt_every,
            a.ssim_threshold, a.init_t_max, a.init_retries, a.jsd_weight, a.jsd_temperature, a.prior_weight,
            a.prior_prompt, a.augment, a.checkpoint_every) == \
        (500, 1e-4, 1, 1, 1.0, 0.1, 20, 20, 0.8, 300, 5, 1.0, 1.0, 1.0, "a photo at the beach", False, 100)
    assert (a.sample_steps, a.sample_guidance, AttenCraftSettings.SAMPLE_ETA, AttenCraftSettings.SAMPLE_SCHEDULER) == \
        (50, 7.5, 0.0, None)
    for s in (d, a):
        assert (s.prior_images, s.prior_steps, s.prior_guidance, s.weight_decay, s.adam_eps, s.loss_norm) == \
            (200, 50, 7.5, 0.01, 1e-8, "paper")
        assert (s.seed, s.lora_rank, s.attention_losses, s.size, s.crop, s.mixed_precision) == \
            (0, 0, True, None, "center", "no")
    assert (DisenDiffSettings.MAX_CONCEPTS, AttenCraftSettings.MAX_CONCEPTS) == (3, 2)
    assert DisenDiffSettings.INIT_IDS == (47629, 42170, 43514) and AttenCraftSettings.INIT_IDS == (42170, 47629, 43514)
    assert PersonalizeSettings.ADAM_BETAS == (0.9, 0.999)


def test_paper_defaults_is_a_read_only_view_of_the_dataclasses():
    old_keys = {"base", "lr", "steps", "batch_size", "grad_accum", "betas", "weight_decay", "adam_eps",
                "max_grad_norm", "loss_norm", "init_ids", "prior_images", "augment", "max_concepts", "sample_steps",
                "sample_guidance", "sample_eta", "sample_scheduler", "checkpoint_every"}
    for method, cls in SETTINGS.items():
        view = PAPER_DEFAULTS[method]
        assert old_keys <= set(view), method
        assert {k: view[k] for k in cls.specs()} == dataclasses.asdict(cls())
        with pytest.raises(TypeError):
            view["steps"] = 1
    assert PAPER_DEFAULTS["disendiff"]["alpha"] == 0.01 and PAPER_DEFAULTS["attencraft"]["tau"] == 0.1
    with pytest.raises(TypeError):
        PAPER_DEFAULTS["dreambooth"] = {}


def test_every_method_is_in_the_one_registry():
    assert list(METHODS) == ["disendiff", "attencraft"] and personalize.DEFAULT_METHOD in METHODS
    for name, kind in METHODS.items():
        assert issubclass(kind.settings, PersonalizeSettings) and personalize.method_of(kind.settings()) == (name, kind)
        assert personalize.method_named(name.upper()) == (name, kind)


def test_no_method_is_switched_on_by_its_name_outside_the_registry():
    names = "|".join(METHODS)
    pattern = f"== ?[\"'](?:{names})[\"']|[\"'](?:{names})[\"'] ?(?:==|!=|in )"
    import re

    for path in [*sorted((ROOT / "pipelines" / "personalize").glob("*.py")), ROOT / "ui" / "personalize_cli.py",
                 ROOT / "ui" / "personalize_tab.py"]:
        hits = [line for line in path.read_text().splitlines() if re.search(pattern, line)]
        assert not hits, (path.name, hits)


def test_the_settings_load_without_torch():
    """The command line builds its flags and the tab its controls without importing torch."""
    code = ("import sys; import pipelines.personalize, ui.personalize_cli; "
            "from pipelines.personalize import DisenDiffSettings, AttenCraftSettings, PAPER_DEFAULTS; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize("method,name", TRAIN_FIELDS + SAMPLE_FIELDS)
def test_every_field_is_a_flag_whose_help_shows_the_dataclass_default(method, name):
    cls = SETTINGS[method]
    f, spec, kind = cls.specs()[name]
    step = "generate" if name in SAMPLING else "train"
    actions = {a.dest: a for a in parser(step)._actions}
    assert name in actions, name
    if f.default is not None and kind is not bool:
        assert str(f.default) in actions[name].help, (name, actions[name].help)
    if len([m for m in SETTINGS.values() if name in m.specs()]) < len(SETTINGS):
        assert f"{method} only" in actions[name].help
    if step == "train":  # no flag: the method's default
        assert getattr(variant_settings_from_args(train_args("--method", method), SETTINGS, method, "--method",
                                                  skip=SAMPLING), name) == f.default


def test_no_flag_means_the_methods_defaults():
    for method, cls in SETTINGS.items():
        args = train_args("--method", method)
        assert variant_settings_from_args(args, SETTINGS, method, "--method", skip=SAMPLING) == cls()


@pytest.mark.parametrize("method,argv,changes", [
    ("disendiff", ["--steps", "20", "--prior-images", "0", "--lora-rank", "4"],
     dict(steps=20, prior_images=0, lora_rank=4)),
    ("disendiff", ["--augment", "off", "--no-attention-loss", "--alpha", "0.02", "--max-grad-norm", "2"],
     dict(augment=False, attention_losses=False, alpha=0.02, max_grad_norm=2.0)),
    ("attencraft", ["--tau", "0.05", "--augment", "on", "--mixed-precision", "bf16", "--seed", "7"],
     dict(tau=0.05, augment=True, mixed_precision="bf16", seed=7)),
    ("attencraft", ["--prior-prompt", "a photo of a room", "--crop", "squash", "--size", "128"],
     dict(prior_prompt="a photo of a room", crop="squash", size=128)),
])
def test_a_flag_changes_only_its_field(method, argv, changes):
    got = variant_settings_from_args(train_args("--method", method, *argv), SETTINGS, method, "--method",
                                     skip=SAMPLING)
    assert got == SETTINGS[method]().replace(**changes)


def test_a_flag_of_the_other_method_is_one_sentence():
    with pytest.raises(UserInputError) as caught:
        variant_settings_from_args(train_args("--tau", "0.05"), SETTINGS, "disendiff", "--method", skip=SAMPLING)
    assert str(caught.value) == "--tau is a setting of attencraft only; drop it or use --method attencraft."
    with pytest.raises(UserInputError, match="--alpha is a setting of disendiff only"):
        variant_settings_from_args(train_args("--method", "attencraft", "--alpha", "1"), SETTINGS, "attencraft",
                                   "--method", skip=SAMPLING)


def test_generate_takes_the_sampling_fields_as_steps_and_guidance():
    args = parser("generate").parse_args(["--concept", "x.safetensors", "--prompt", "a <new1> cat", "--output", "o.png",
                                          "--steps", "7", "--guidance", "3.5"])
    assert (args.sample_steps, args.sample_guidance, args.seed) == (7, 3.5, personalize.GENERATE_SEED)
    helps = {a.dest: a.help for a in parser("generate")._actions}
    assert "6.0 for disendiff, 7.5 for attencraft" in helps["sample_guidance"]


# ------------------------------------------------------------------------------ one sentence per bad value


@pytest.mark.parametrize("method,change,sentence", [
    ("disendiff", dict(steps=0), "Steps must be between 1 and 100000, not 0."),
    ("attencraft", dict(steps=2.5), "Steps must be a whole number, not 2.5."),
    ("disendiff", dict(lr=0), "The learning rate must be above 0 and at most 1, not 0."),
    ("disendiff", dict(batch_size=0), "The batch size must be between 1 and 64, not 0."),
    ("disendiff", dict(grad_accum=float("nan")), "Gradient accumulation must be a finite number, not nan."),
    ("disendiff", dict(prior_images=-1), "The number of prior images must be between 0 and 10000, not -1."),
    ("attencraft", dict(prior_images=0),
     "AttenCraft needs prior-preservation images; set the number of prior images to 1 or more."),
    ("attencraft", dict(tau=1.0), "The margin tau must be between 0 and 0.99, not 1."),
    ("attencraft", dict(ssim_threshold=2), "The SSIM threshold must be between 0 and 1, not 2."),
    ("disendiff", dict(lora_rank=2000), "The LoRA rank must be between 0 and 1024, not 2000."),
    ("disendiff", dict(seed=-1), "The training seed must be between 0 and 4294967295, not -1."),
    ("disendiff", dict(crop="fit"), "Crop must be one of center, squash, not 'fit'."),
    ("attencraft", dict(mixed_precision="fp8"), "Mixed precision must be one of no, fp16, bf16, not 'fp8'."),
    ("disendiff", dict(loss_norm="sum"), "The loss normalisation must be one of paper, mean, not 'sum'."),
    ("disendiff", dict(size=32), "The training size must be between 64 and 2048, not 32."),
    ("disendiff", dict(sample_steps=600), "Sampling steps must be between 1 and 500, not 600."),
    ("attencraft", dict(sample_guidance=-1), "Guidance must be between 0 and 30, not -1."),
    ("disendiff", dict(attention_losses="yes"), "Attention losses must be on or off, not 'yes'."),
])
def test_a_bad_value_is_one_sentence(method, change, sentence):
    with pytest.raises(UserInputError) as caught:
        SETTINGS[method]().replace(**change).validated()
    assert str(caught.value) == sentence
    one_sentence(sentence)


def test_an_unknown_setting_is_a_type_error_not_ignored():
    with pytest.raises(TypeError):
        DisenDiffSettings().replace(tau=0.1)  # AttenCraft's


def test_the_trainer_validates_with_the_settings(tiny_pipe, tmp_path):
    from PIL import Image

    pipe = tiny_pipe("tiny")
    photo = Image.new("RGB", (64, 64), (200, 40, 40))
    for method, change, fragment in (("attencraft", dict(tau=1.0), "The margin tau must be between"),
                                     ("attencraft", dict(prior_images=0), "AttenCraft needs prior-preservation"),
                                     ("disendiff", dict(batch_size=0), "The batch size must be between")):
        with pytest.raises(UserInputError, match=fragment):
            personalize.Trainer(pipe, photo, "cat,dog", method, None, **change)
    with pytest.raises(TypeError, match="unknown option"):
        personalize.Trainer(pipe, photo, "cat,dog", "disendiff", None, tau=0.1)
    # settings alone name the method; a method that disagrees with them is a mistake
    trainer = personalize.Trainer(pipe, photo, "cat,dog", settings=AttenCraftSettings(steps=3, prior_images=1))
    assert trainer.method == "attencraft" and trainer.settings.steps == 3 and trainer.total_steps == 3
    with pytest.raises(TypeError):
        personalize.Trainer(pipe, photo, "cat,dog", "disendiff", settings=AttenCraftSettings())


# ------------------------------------------------------------------------------ the tab


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    from ui.personalize_tab import build_tab, make_handlers

    controls, ctx = built_tab(build_tab, tmp_path_factory.mktemp("outputs"))
    return controls, make_handlers(ctx)


# control id: (the handler and its parameter, the settings class the control is made from, the field,
# the named UI constant when the tab starts elsewhere on purpose)
TAB = {
    "pz-steps": (0, "steps", DisenDiffSettings, "steps", None),
    "pz-prior": (0, "prior_images", DisenDiffSettings, "prior_images", "UI_DEFAULT_PRIOR"),
    "pz-tau": (0, "tau", AttenCraftSettings, "tau", None),
    "pz-train-seed": (0, "seed", DisenDiffSettings, "seed", None),
    "pz-gen-steps": (1, "steps", DisenDiffSettings, "sample_steps", None),
    "pz-guidance": (1, "guidance", DisenDiffSettings, "sample_guidance", "UI_METHOD_GUIDANCE"),
}


@pytest.mark.parametrize("elem_id", list(TAB))
def test_the_tab_starts_at_the_dataclass_defaults_unless_a_ui_constant_says_otherwise(tab, elem_id):
    import ui.personalize_tab as tab_module

    controls, handlers = tab
    which, parameter, cls, name, constant = TAB[elem_id]
    control = controls[elem_id]
    f, spec, _ = cls.specs()[name]
    expected = getattr(tab_module, constant) if constant else f.default
    assert control.value == expected, (elem_id, control.value)
    if constant:
        assert expected != f.default  # a deliberate UI choice, named
    if spec.maximum is not None and elem_id != "pz-train-seed":
        assert (control.minimum, control.maximum) == (spec.minimum, spec.maximum), elem_id
    default = inspect.signature(handlers[which]).parameters[parameter].default
    if elem_id != "pz-guidance":  # the endpoint's guidance None and the box's 0 both mean the method's
        assert default == expected, (elem_id, default)


def test_the_tab_offers_every_method_and_starts_at_the_default(tab):
    controls, _ = tab
    method = controls["pz-method"]
    assert [value for _, value in method.choices] == list(METHODS) and method.value == personalize.DEFAULT_METHOD


def test_the_tab_refuses_a_bad_value_with_the_settings_sentence_before_loading_the_model(tab, monkeypatch):
    import gradio as gr
    from PIL import Image

    from pipelines import models

    controls, (train, _, _) = tab
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    photo = Image.new("RGB", (64, 64))
    for kwargs, sentence in ((dict(method="attencraft", prior_images=0),
                              "AttenCraft needs prior-preservation images; set the number of prior images to 1 or more."),
                             (dict(method="attencraft", tau=1.0), "The margin tau must be between 0 and 0.99, not 1."),
                             (dict(steps=0), "Steps must be between 1 and 100000, not 0."),
                             (dict(method="dreambooth"), "The method must be one of disendiff, attencraft, not 'dreambooth'.")):
        with pytest.raises(gr.Error) as caught:
            next(train("tiny", photo, "cat,dog", **kwargs))
        assert caught.value.message == sentence
