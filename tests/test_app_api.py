"""The launched app, scripted through `gradio_client` (offline, tiny model)."""

from __future__ import annotations

import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import listening_addresses  # noqa: E402

pytestmark = pytest.mark.timeout(600)

FAST = dict(model="tiny", negative_prompt="", seed=0, randomize_seed=False, steps=2,
            guidance=7.5, width=64, height=64, layers="all")


@pytest.fixture(scope="module")
def server(tiny_app):
    return tiny_app


@pytest.fixture(scope="module")
def client(tiny_app):
    return Client(tiny_app.url, verbose=False)


def test_listens_on_localhost_only_by_default(server):
    addresses = listening_addresses(server.port)
    assert addresses == {"127.0.0.1"}, addresses


def test_attention_maps_endpoint_returns_image_heatmaps_seed_and_files(client):
    image, gallery, seed, files = client.predict(prompt="a photo of a cat", **FAST,
                                                 api_name="/attention_maps")
    with Image.open(image) as img:
        assert img.size == (64, 64)
    assert [item["caption"] for item in gallery] == ["0: a", "1: photo", "2: of", "3: a", "4: cat"]
    for item in gallery:
        assert Path(item["image"]).is_file()
    assert seed == 0
    names = sorted(Path(f).name for f in files)
    assert names == ["heatmaps.zip", "image.json", "image.png"], names
    zipped = next(f for f in files if f.endswith(".zip"))
    with zipfile.ZipFile(zipped) as archive:
        assert len(archive.namelist()) == 5


def test_random_seed_is_reported_and_reproducible(client):
    args = dict(FAST, randomize_seed=True)
    first = client.predict(prompt="a cat", **args, api_name="/attention_maps")
    used = int(first[2])
    assert used >= 0
    again = client.predict(prompt="a cat", **dict(FAST, seed=used), api_name="/attention_maps")
    assert int(again[2]) == used
    assert Image.open(first[0]).tobytes() == Image.open(again[0]).tobytes()


def test_user_mistake_comes_back_as_a_sentence(client):
    with pytest.raises(Exception) as caught:
        client.predict(prompt="a photo of a cat", **dict(FAST, width=65), api_name="/attention_maps")
    message = str(caught.value)
    assert "65" in message and "Traceback" not in message, message
    with pytest.raises(Exception) as caught:
        client.predict(prompt="   ", **FAST, api_name="/attention_maps")
    assert "prompt" in str(caught.value).lower()


def test_api_lists_the_named_endpoint(client):
    assert "/attention_maps" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_api_cannot_make_the_server_load_other_models_or_paths(client, tmp_path):
    """Only the models the server was started with (and the built-in ones) can be chosen."""
    for name in (str(tmp_path), "/etc/passwd", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        with pytest.raises(Exception) as caught:
            client.predict(prompt="a cat", **dict(FAST, model=name), api_name="/attention_maps")
        assert "Traceback" not in str(caught.value)
    assert "tiny-flux" in str(client.view_api(print_info=False, return_format="dict"))


# --------------------------------------------------------------------------- Stop

STOP_WAIT_S = 60  # a stop is answered within one step: measured 0.01-0.3 s on 2 busy cores


def _stop_when_running(client, stop_endpoint: str, timeout: float = 120) -> float:
    """Call the tab's stop endpoint until it finds this client's request running; returns when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Stopping" in client.predict(api_name=stop_endpoint):
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"{stop_endpoint} never found the request running")


def _stopped_step(job) -> tuple[int, str]:
    with pytest.raises(Exception) as caught:
        job.result(timeout=STOP_WAIT_S)
    message = str(caught.value)
    found = re.search(r"Stopped at step (\d+)", message)
    assert found and "Traceback" not in message, message
    return int(found.group(1)), message


def test_stop_ends_a_generation_within_a_step_and_the_server_goes_on(client, server):
    job = client.submit(prompt="a photo of a cat", **dict(FAST, steps=100, width=256, height=256),
                        api_name="/attention_maps")
    asked = _stop_when_running(client, "/attention_maps_stop")
    step, message = _stopped_step(job)
    latency = time.monotonic() - asked
    assert step < 100 and "of 100" in message, message
    assert latency < STOP_WAIT_S, latency
    # another client's stop never reaches this client's run, and the server goes on serving
    other = Client(server.url, verbose=False)
    assert "Nothing of yours" in other.predict(api_name="/attention_maps_stop")
    image, _, seed, _ = client.predict(prompt="a cat", **FAST, api_name="/attention_maps")
    assert seed == 0 and Path(image).is_file()


def test_stop_ends_a_removal_within_a_step(client, tmp_path):
    from gradio_client import handle_file

    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(256, 256, 3) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((256, 256), np.uint8)
    mask[64:160, 64:160] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    photo = handle_file(str(tmp_path / "photo.png"))
    job = client.submit(model="tiny", image={"background": photo, "layers": [], "composite": photo},
                        mask=handle_file(str(tmp_path / "mask.png")), grow=0, seed=0, randomize_seed=False, steps=100,
                        strength=1.0, guidance=9.0, ss_steps=1, ss_scale=0.3, mode="sip", num_images=4,
                        api_name="/erase")
    asked = _stop_when_running(client, "/erase_stop")
    step, message = _stopped_step(job)
    assert step < 100, message
    assert time.monotonic() - asked < STOP_WAIT_S


def test_stop_ends_a_direction_estimate_and_nothing_is_cached(client):
    kwargs = dict(model="tiny", positive="a red circle", negative="a blue circle", samples=400, steps=20,
                  guidance=0, width=64, height=64)
    job = client.submit(**kwargs, api_name="/steer_directions")
    _stop_when_running(client, "/steer_stop")
    step, message = _stopped_step(job)
    assert step < 2 * 100 * 20, message
    # the stopped estimate was not cached as if it were complete: a small one is estimated anew
    status, _ = client.predict(**dict(kwargs, samples=1, steps=2), api_name="/steer_directions")
    assert "estimated now" in status, status


def test_sigterm_stops_the_running_task_keeps_the_results_and_removes_the_temporary_folders(tmp_path):
    """systemd and docker stop a server with SIGTERM: the running task stops at a step, the
    process exits 0, the results folder keeps every finished run complete (no half-written
    file), and its temporary folder (uploads, copies sent to browsers) is removed, not left behind.
    The results folder lies outside the working and the temp folder, as the user's data
    directory does: results are still returned (ui/gradio_fixes.allow_results_from)."""
    import os
    import signal

    from app_server import launched_app

    results, temp = tmp_path / "results", tmp_path / "tmp"
    temp.mkdir()
    with launched_app("--model", "tiny", "--output-dir", str(results), env={"TMPDIR": str(temp)}) as running:
        client = Client(running.url, verbose=False)
        first = client.predict(prompt="a cat", **dict(FAST, steps=1), api_name="/attention_maps")  # the model is loaded
        assert Path(first[3][0]).name == "image.png" and Path(first[3][0]).is_file()
        kept = next(results.glob("attention_maps-*/image.png"))  # the results folder itself is never served
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{running.url}/gradio_api/file={kept}", timeout=30)
        assert refused.value.code in (403, 404), refused.value.code
        job = client.submit(prompt="a photo of a cat", **dict(FAST, steps=100, width=256, height=256),
                            api_name="/attention_maps")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the denoising loop reports its progress
            progress = job.status().progress_data or []
            if any((unit.unit or "").startswith("step") for unit in progress):
                break
            time.sleep(0.1)
        assert not job.done(), "the generation ended before the signal could be sent"
        ours = list(temp.glob("attention-app-*"))  # (torch may make its own cache folder there)
        assert [folder.name.startswith("attention-app-gradio-") for folder in ours] == [True], ours
        started = time.monotonic()
        os.killpg(running.process.pid, signal.SIGTERM)
        code = running.process.wait(timeout=STOP_WAIT_S)
        assert code == 0, running.log()[-3000:]
        assert time.monotonic() - started < STOP_WAIT_S
        log = running.log()
    assert not list(temp.glob("attention-app-*")), list(temp.rglob("*"))[:10]
    runs = [folder for folder in results.iterdir() if folder.name.startswith("attention_maps-")]
    assert len(runs) == 1, list(results.iterdir())  # the finished run; the stopped one saved nothing
    kept = {path.name for path in runs[0].rglob("*")}
    assert {"run.json", "image.png", "image.json"} <= kept, kept
    assert not [name for name in kept if name.startswith(".")], kept  # no temporary file
    assert "SIGTERM: shutting down; stopping 1 running task" in log, log[-3000:]
    assert "stopped in attention_maps: Stopped at step" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
