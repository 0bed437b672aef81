"""Bad numbers, seeds and prompts through the API: one clear sentence each, and the server goes on.

Every endpoint and parameter is found in the API description (`/gradio_api/info`), so a new
tab's Number and Slider inputs are covered without editing this file.  Values are sent through
raw HTTP (JSON allows NaN and Infinity literals, and Gradio's own range checks let NaN through:
every comparison with it is false).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import FILE_META, assert_one_clean_sentence, call_raw, error_message, upload  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# plausible values for the text inputs, so that the one bad value is what a call is judged on
TEXT_VALUES = {"prompt": "a red circle", "positive": "a red circle", "negative": "a blue circle",
               "expression": "the circle", "class_words": "cat,dog",
               "instruction": "make the circle blue, and make the square red"}


@pytest.fixture(scope="module")
def uploaded_image(tiny_app, tmp_path_factory):
    """A 64 px PNG uploaded to the server, as a file reference the guard accepts."""
    path = tmp_path_factory.mktemp("upload") / "scene.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    return {"path": upload(tiny_app.url, path), "orig_name": "scene.png", "meta": FILE_META}


def plausible_arguments(endpoint: dict, image: dict) -> list:
    values = []
    for parameter in endpoint["parameters"]:
        name = parameter["parameter_name"]
        value = parameter.get("parameter_default") if parameter.get("parameter_has_default") else None
        if name == "model":
            value = "tiny"
        elif name in TEXT_VALUES:
            value = TEXT_VALUES[name]
        elif parameter.get("component") == "Image":
            value = image
        elif parameter.get("component") == "Imageeditor":
            value = {"background": image, "layers": [], "composite": image, "id": None}
        values.append(value)
    return values


def numeric_parameters(api: dict):
    for name, endpoint in api["named_endpoints"].items():
        for index, parameter in enumerate(endpoint["parameters"]):
            if parameter.get("component") in ("Number", "Slider"):
                yield name, index, parameter


def test_nan_and_infinity_are_refused_for_every_numeric_input(tiny_app, tiny_app_api, uploaded_image):
    checked = 0
    for name, index, parameter in numeric_parameters(tiny_app_api):
        for value in (float("nan"), float("inf"), float("-inf")):
            data = plausible_arguments(tiny_app_api["named_endpoints"][name], uploaded_image)
            data[index] = value
            kind, result = call_raw(tiny_app.url, name, data)
            assert kind == "error", (name, parameter["parameter_name"], value, result)
            assert_one_clean_sentence(error_message(result), "finite number")
            checked += 1
    assert checked >= 3 * 20, checked  # about 30 numeric inputs today


def test_huge_or_fractional_seeds_are_one_sentence_on_every_endpoint(tiny_app, tiny_app_api, uploaded_image):
    seeded = [(name, index) for name, endpoint in tiny_app_api["named_endpoints"].items()
              for index, parameter in enumerate(endpoint["parameters"]) if parameter["parameter_name"] == "seed"]
    assert len(seeded) >= 5, seeded
    for name, index in seeded:
        for value in (2**70, 2**40):  # fractions are rounded by the Number field itself
            data = plausible_arguments(tiny_app_api["named_endpoints"][name], uploaded_image)
            data[index] = value
            kind, result = call_raw(tiny_app.url, name, data)
            assert kind == "error", (name, value, result)
            assert_one_clean_sentence(error_message(result), "seed")


@pytest.mark.parametrize("endpoint, parameter", [("/attention_maps", "prompt"), ("/attention_maps", "negative_prompt"),
                                                 ("/steer_directions", "positive"), ("/steer_pair", "prompt")])
def test_an_over_long_prompt_is_refused_not_cut(tiny_app, tiny_app_api, uploaded_image, endpoint, parameter):
    spec = tiny_app_api["named_endpoints"][endpoint]
    data = plausible_arguments(spec, uploaded_image)
    data[[p["parameter_name"] for p in spec["parameters"]].index(parameter)] = " ".join(["circle"] * 2000)
    kind, result = call_raw(tiny_app.url, endpoint, data)
    assert kind == "error", result
    assert_one_clean_sentence(error_message(result), "tokens long", "shorten it")


def test_the_server_still_answers_after_the_corpus(tiny_app, tiny_app_api, uploaded_image):
    data = plausible_arguments(tiny_app_api["named_endpoints"]["/attention_maps"], uploaded_image)
    names = [p["parameter_name"] for p in tiny_app_api["named_endpoints"]["/attention_maps"]["parameters"]]
    for key, value in {"steps": 1, "width": 64, "height": 64, "seed": 3}.items():
        data[names.index(key)] = value
    kind, result = call_raw(tiny_app.url, "/attention_maps", data)
    assert kind == "complete", result
    assert json.loads(result)[2] == 3  # the seed used comes back


def test_seed_rule():
    from pipelines.errors import UserInputError
    from pipelines.seeds import MAX_SEED, resolve_seed

    assert resolve_seed(0) == 0 and resolve_seed(7.0) == 7 and resolve_seed(MAX_SEED) == MAX_SEED
    assert 0 <= resolve_seed(-1) < 2**31 and 0 <= resolve_seed(None) < 2**31 and 0 <= resolve_seed(5, True) < 2**31
    for bad in (MAX_SEED + 1, 2**70, 1.5, float("nan"), float("inf"), "seven", True):
        with pytest.raises(UserInputError):
            resolve_seed(bad)


@pytest.mark.parametrize("args, fragment", [
    (("--seed", str(2**70)), "seed"),
    (("--prompt", " ".join(["cat"] * 100)), "tokens long"),
])
def test_the_command_line_says_the_same_sentence(tmp_path, args, fragment):
    from app_server import assert_user_error, run_app

    base = {"--model": "tiny", "--prompt": "a cat", "--steps": "1", "--output": str(tmp_path / "out.png")}
    base.update(dict(zip(args[::2], args[1::2])))
    proc = run_app("generate", *[item for pair in base.items() for item in pair])
    assert_user_error(proc, fragment)
    assert not (tmp_path / "out.png").exists()
