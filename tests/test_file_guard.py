"""No request can make the server read a file it did not receive or write (ui/request_guard.py).

Every endpoint and every file parameter is found in the API description (`/gradio_api/info`),
so a new tab is covered without editing this file.  Each is sent, through raw HTTP and through
`gradio_client`, references to files on the server's disk that no visitor uploaded: a real PNG
(which an unguarded `gr.Image` opens and processes), a copy in the machine's shared Gradio folder
(as another Gradio process would leave it), and URLs.  Each call must end in one sentence that
names no server path, and no such file may be served by `/gradio_api/file=`.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import FILE_META, assert_one_clean_sentence, call_raw, error_message, upload  # noqa: E402

pytestmark = pytest.mark.timeout(600)



# --------------------------------------------------------------------------- helpers


def _resolve(schema: dict, defs: dict) -> dict:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _holds_file(schema: dict, defs: dict) -> bool:
    schema = _resolve(schema, defs)
    if "path" in schema.get("properties", {}):
        return True
    children = list(schema.get("properties", {}).values()) + schema.get("anyOf", [])
    if "items" in schema:
        children.append(schema["items"])
    return any(_holds_file(child, defs) for child in children)


def _fill(schema: dict, defs: dict, file_value):
    """A value of `schema` whose every file slot holds `file_value` (other slots None)."""
    schema = _resolve(schema, defs)
    if "path" in schema.get("properties", {}):
        return file_value
    for option in schema.get("anyOf", []):
        if _holds_file(option, defs):
            return _fill(option, defs, file_value)
    if schema.get("type") == "array" and "items" in schema:
        return [_fill(schema["items"], defs, file_value)]
    if "properties" in schema:
        return {key: (_fill(sub, defs, file_value) if _holds_file(sub, defs) else None)
                for key, sub in schema["properties"].items()}
    return None


def file_parameters(api: dict):
    """(endpoint, parameter index, parameter) for every parameter that takes a file."""
    for name, endpoint in api["named_endpoints"].items():
        for index, parameter in enumerate(endpoint["parameters"]):
            schema = parameter.get("type", {})
            if isinstance(schema, dict) and _holds_file(schema, schema.get("$defs", {})):
                yield name, index, parameter


def base_arguments(endpoint: dict) -> list:
    values = []
    for parameter in endpoint["parameters"]:
        value = parameter.get("parameter_default") if parameter.get("parameter_has_default") else None
        if parameter["parameter_name"] == "model":
            value = "tiny"
        values.append(value)
    return values


def write_png(path: Path, value: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def server_files(tmp_path_factory):
    """Images on the server's disk that no visitor uploaded: one anywhere, one as another Gradio
    process (sharing the machine's default Gradio folder) would have left it."""
    secret = write_png(tmp_path_factory.mktemp("server-only") / "secret.png")
    shared = write_png(Path("/tmp/gradio") / uuid.uuid4().hex / "left-by-another-process.png", 100)
    yield {"secret": secret, "shared": shared}
    shared.unlink(missing_ok=True)
    shared.parent.rmdir()


# --------------------------------------------------------------------------- tests


def test_the_api_description_lists_the_file_parameters(tiny_app_api):
    found = {(name, parameter["parameter_name"]) for name, _, parameter in file_parameters(tiny_app_api)}
    # the ones that exist today; a new tab only adds to this set
    assert {("/erase", "image"), ("/erase", "mask"), ("/segment", "image"), ("/segment", "video"),
            ("/steer_pair", "directions_file"), ("/personalize_train", "image"),
            ("/personalize_generate", "learned_file")} <= found, found


def test_server_files_sent_as_payloads_never_reach_a_handler(tiny_app, tiny_app_api, server_files):
    secret, shared = str(server_files["secret"]), str(server_files["shared"])
    payloads = {
        "path without meta (what gr.Image alone lets through)": {"path": secret},
        "path with meta": {"path": secret, "meta": FILE_META},
        "path with a file= url": {"path": secret, "url": f"{tiny_app.url}/gradio_api/file={secret}",
                                  "meta": FILE_META},
        "copy in the machine's shared Gradio folder": {"path": shared, "meta": FILE_META},
        "same, without meta": {"path": shared},
        "an http URL as path": {"path": f"{tiny_app.url}/gradio_api/info", "meta": FILE_META},
        "an http URL and no path": {"url": f"{tiny_app.url}/gradio_api/info", "meta": FILE_META},
    }
    checked = 0
    for name, index, parameter in file_parameters(tiny_app_api):
        endpoint = tiny_app_api["named_endpoints"][name]
        schema = parameter["type"]
        for label, payload in payloads.items():
            data = base_arguments(endpoint)
            data[index] = _fill(schema, schema.get("$defs", {}), payload)
            kind, result = call_raw(tiny_app.url, name, data)
            assert kind == "error", (name, parameter["parameter_name"], label, result)
            assert_one_clean_sentence(error_message(result), "uploaded through this app")
            checked += 1
    assert checked >= 7 * len(payloads)


def test_a_plain_string_path_is_refused_for_every_file_parameter(tiny_app, tiny_app_api, server_files):
    for name, index, parameter in file_parameters(tiny_app_api):
        data = base_arguments(tiny_app_api["named_endpoints"][name])
        data[index] = str(server_files["secret"])
        kind, result = call_raw(tiny_app.url, name, data)
        assert kind == "error", (name, parameter["parameter_name"], result)
        assert_one_clean_sentence(error_message(result))


def test_gradio_client_cannot_pass_a_server_path_either(tiny_app, tiny_app_api, server_files):
    """`gradio_client` uploads (its own copy of) a file only when the reference carries meta;
    without meta it forwards the path as is: the hole's client-side form."""
    from gradio_client import Client

    client = Client(tiny_app.url, verbose=False)
    for name, index, parameter in file_parameters(tiny_app_api):
        endpoint = tiny_app_api["named_endpoints"][name]
        schema = parameter["type"]
        data = base_arguments(endpoint)
        data[index] = _fill(schema, schema.get("$defs", {}), {"path": str(server_files["secret"])})
        with pytest.raises(Exception) as caught:
            client.predict(*data, api_name=name)
        assert_one_clean_sentence(str(caught.value), "uploaded through this app")


def test_files_this_app_received_still_pass_and_bad_ones_get_a_sentence(tiny_app, tiny_app_api, tmp_path):
    """The guard is no blanket refusal: an upload gets past it (here a text file, so each input
    then fails to read it, in one sentence that names no server path, and nothing runs)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image, a video or a safetensors file")
    uploaded = upload(tiny_app.url, notes)
    for name, index, parameter in file_parameters(tiny_app_api):
        endpoint = tiny_app_api["named_endpoints"][name]
        schema = parameter["type"]
        data = base_arguments(endpoint)
        data[index] = _fill(schema, schema.get("$defs", {}),
                            {"path": uploaded, "orig_name": "notes.txt", "meta": FILE_META})
        kind, result = call_raw(tiny_app.url, name, data)
        assert kind == "error", (name, parameter["parameter_name"], result)
        message = error_message(result)
        assert "uploaded through this app" not in message, (name, message)
        assert_one_clean_sentence(message)


def test_file_route_serves_neither_server_files_nor_other_processes_copies(tiny_app, server_files):
    for path in (server_files["secret"], server_files["shared"], Path("/etc/hostname")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{tiny_app.url}/gradio_api/file={path}", timeout=30)
        assert caught.value.code in (403, 404), (path, caught.value.code)


def test_run_folders_are_named_not_given_as_server_paths(tiny_app, tmp_path):
    """A personalize run is referred to by its folder's name: a server path (even one holding a
    learned.safetensors) is never read."""
    from gradio_client import Client

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "learned.safetensors").write_bytes(b"not read")
    client = Client(tiny_app.url, verbose=False)
    for run_folder in (str(planted), "../" * 8 + str(planted), "personalize-20260101-000000-" + "0" * 32):
        with pytest.raises(Exception) as caught:
            client.predict(model="tiny", learned_file=None, run_folder=run_folder, prompt="a <new1> cat",
                           seed=0, steps=2, guidance=0, api_name="/personalize_generate")
        assert_one_clean_sentence(str(caught.value), "Train first")


def test_results_name_the_model_not_its_folder(tiny_app):
    """The built-in model is recorded as 'builtin', never as the checkout's folder."""
    from gradio_client import Client

    client = Client(tiny_app.url, verbose=False)
    _, _, _, files = client.predict(model="builtin", prompt="a red circle", negative_prompt="", seed=0,
                                    randomize_seed=False, steps=2, guidance=7.5, width=64, height=64,
                                    layers="all", api_name="/attention_maps")
    [params] = [f for f in files if f.endswith(".json")]
    text = Path(params).read_text()
    assert json.loads(text)["model"] == "builtin"
    assert str(Path(__file__).resolve().parents[1]) not in text


def test_messages_lose_their_server_paths():
    from ui.request_guard import without_server_paths

    assert without_server_paths("cannot identify image file '/tmp/gradio/ab12/cat.png'") == \
        "cannot identify image file 'cat.png'"
    assert without_server_paths("see /work/main/assets/builtin/ and C:\\Users\\me\\x.txt") == \
        "see a server folder and x.txt"
    # ratios, relative names and URLs' own paths are not server paths
    for text in ("64/128 px", "ui/eraser_tab.py", "http://127.0.0.1:7860/gradio_api/info"):
        assert without_server_paths(text) == text


def test_run_dir_named_accepts_only_this_stores_run_names(tmp_path):
    from ui.common import OutputStore

    store = OutputStore(tmp_path / "outputs")
    run = store.new_run_dir("personalize")
    assert store.run_dir_named(run.name, "personalize") == run
    outside = tmp_path / run.name
    outside.mkdir()
    for name in (str(run), str(outside), f"../{run.name}", run.name + "/..", "", None,
                 "personalize-20260101-000000-" + "0" * 32):
        assert store.run_dir_named(name, "personalize") is None, name
    assert store.run_dir_named(run.name, "eraser") is None
