"""--max-steps bounds the denoising steps a request leaves to a default as much as typed ones.

`Limits.check_settings` sees the step counts a request gives before the model loads; a count left
out (Attention maps' and Instruction edit's empty Steps, Personalize's empty sampling steps, the
steer pair's steps, which are an uploaded directions file's) is known only once the model or the
file is loaded.  Each tab then checks the count the pipeline will use (`Limits.check_default_steps`)
before the first denoising step: these tests stand in a sentinel for the pipeline's entry point,
so a request refused never reaches it and one within the limit does.  Tiny offline models; the
tab handlers are called directly, without a server.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import assert_one_clean_sentence  # noqa: E402

from pipelines.errors import UserInputError  # noqa: E402
from ui.limits import Limits  # noqa: E402

pytestmark = pytest.mark.timeout(300)

LIMIT = 10  # under every default here: the SD-style 25, OmniGen's 50, the personalization methods' 50
LIMITS = Limits(max_steps=LIMIT)


def quiet(*_, **__):
    """A stand-in for gr.Progress."""


class Reached(Exception):
    """Raised by the stand-in for a pipeline's entry point: the request got past every check."""


def reached(*_, **__):
    raise Reached


def context(tmp_path, default_model: str = "tiny"):
    from ui.common import AppContext, OutputStore

    return AppContext(default_model=default_model, outputs=OutputStore(tmp_path / "outputs"), limits=LIMITS)


def refused(call, *fragments: str) -> str:
    """The one sentence `call()` is refused with (a gr.Error, as the visitor sees it)."""
    with pytest.raises(gr.Error) as caught:
        call()
    message = str(caught.value)
    assert_one_clean_sentence(message, "--max-steps", str(LIMIT), *fragments)
    return message


# --------------------------------------------------------------------------- the helper


def test_check_default_steps_names_the_flag_and_the_default():
    LIMITS.check_default_steps(None, LIMIT)  # at the limit: fine
    LIMITS.check_default_steps(0, LIMIT)
    with pytest.raises(UserInputError) as caught:
        LIMITS.check_default_steps(None, 50)
    assert str(caught.value) == ("Steps were left to the model's default, 50, but this server takes at most 10 "
                                 "(--max-steps); set Steps to 10 or fewer.")
    with pytest.raises(UserInputError, match="the learned method's default, 25.*set Sampling steps to 10"):
        LIMITS.check_default_steps(0, 25, "Sampling steps", "the learned method's default")
    with pytest.raises(UserInputError, match="; use fewer"):
        LIMITS.check_default_steps(None, 11, source="the file's", fix="use fewer")
    # a given count is checked as it was given (check_steps' sentence), whatever the default
    with pytest.raises(UserInputError, match="Steps must be at most 10 on this server"):
        LIMITS.check_default_steps(11, 5)
    LIMITS.check_default_steps(5, 500)
    # not a count (a damaged file's): left to the pipeline, which refuses it in its own words
    LIMITS.check_default_steps(None, "many")
    LIMITS.check_default_steps(None, None)


# --------------------------------------------------------------------------- Attention maps


def test_attention_maps_bounds_the_models_default_steps(tmp_path, monkeypatch):
    from pipelines import attention_maps
    from ui.attention_maps_tab import make_handler

    monkeypatch.setattr(attention_maps, "generate_with_attention_maps", reached)
    handler = make_handler(context(tmp_path))

    def run(steps):
        return handler("tiny", "a red circle", steps=steps, progress=quiet)

    for empty in (0, None):  # the box's 0 and an API client's None: the model's 25
        refused(lambda: run(empty), "the model's default, 25")
    with pytest.raises(Reached):
        run(LIMIT)  # typed, within the limit
    refused(lambda: run(LIMIT + 1), "Steps must be at most")  # typed, over it: before the model loads


# --------------------------------------------------------------------------- Instruction edit


def test_instruct_bounds_omnigens_default_steps(tmp_path, monkeypatch):
    from pipelines import instruct
    from ui.instruct_tab import make_handler

    monkeypatch.setattr(instruct, "edit_by_instruction", reached)
    handler = make_handler(context(tmp_path))
    source = Image.new("RGB", (64, 64), (200, 30, 30))

    def run(steps):
        return handler("tiny-omnigen", source, "make the circle blue", steps=steps, progress=quiet)

    refused(lambda: run(0), "the model's default, 50")  # OmniGen's: the paper's 50
    refused(lambda: run(None), "the model's default, 50")
    with pytest.raises(Reached):
        run(LIMIT)


def test_instruct_bounds_the_default_steps_of_a_prompt_of_parts(tmp_path, monkeypatch):
    from pipelines import instruct
    from ui.instruct_tab import make_handler

    monkeypatch.setattr(instruct, "generate_by_parts", reached)
    handler = make_handler(context(tmp_path, "builtin"))  # a text-to-image model draws the parts

    def run(steps):
        return handler("builtin", None, "a red circle and a blue square", steps=steps, progress=quiet)

    refused(lambda: run(0), "the model's default, 25")  # builtin's training.json
    with pytest.raises(Reached):
        run(LIMIT)


# --------------------------------------------------------------------------- Steer


def _directions(path: Path, vector_steps: int, meta_steps: int | None) -> str:
    import torch

    from pipelines.steering import Directions

    meta = {"model": "tiny", "positive": "a red circle", "negative": "a blue circle", "samples": 1}
    if meta_steps is not None:
        meta["steps"] = meta_steps
    return str(Directions({"layer": torch.zeros(vector_steps, 8)}, meta).save(path))


def test_steer_pair_bounds_an_uploaded_directions_files_steps(tmp_path, monkeypatch):
    from pipelines import steering
    from ui.steer_tab import make_handlers

    monkeypatch.setattr(steering, "counterfactual_pair", reached)
    _, steer_pair = make_handlers(context(tmp_path))

    def run(file):
        return steer_pair("tiny", "", "", directions_file=file, prompt="a red circle", progress=quiet)

    # the pair runs the steps the file records (else as many as its vectors): the file's 60
    message = refused(lambda: run(_directions(tmp_path / "a.safetensors", 60, 60)), "the directions file's step count, 60")
    assert "use directions estimated with 10 steps or fewer" in message
    refused(lambda: run(_directions(tmp_path / "b.safetensors", 60, None)), "the directions file's step count, 60")
    refused(lambda: run(_directions(tmp_path / "c.safetensors", 4, 60)), "the directions file's step count, 60")
    with pytest.raises(Reached):
        run(_directions(tmp_path / "d.safetensors", 4, 4))


# --------------------------------------------------------------------------- Personalize


def test_personalize_generate_bounds_the_learned_methods_default_steps(tmp_path, monkeypatch):
    import torch

    import pipelines.personalize as personalize
    from pipelines.personalize import DEFAULT_METHOD, METHODS, Learned
    from ui.personalize_tab import make_handlers

    monkeypatch.setattr(personalize, "generate", reached)
    _, generate, _ = make_handlers(context(tmp_path))
    learned = Learned(method=DEFAULT_METHOD, base_model="tiny", tokens=["<new1>"], class_words=["cat"], steps=1,
                      token_rows=torch.zeros(1, 32)).save(tmp_path / "learned.safetensors")
    default = METHODS[DEFAULT_METHOD].settings.default("sample_steps")
    assert default > LIMIT

    def run(steps):
        return generate("tiny", str(learned), None, "a <new1> cat", 0, steps, None, progress=quiet)

    refused(lambda: run(0), f"the learned method's default, {default}")
    refused(lambda: run(None), f"the learned method's default, {default}")
    with pytest.raises(Reached):
        run(LIMIT)
