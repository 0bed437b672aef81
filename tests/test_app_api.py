"""The launched app, scripted through `gradio_client` (offline, tiny model)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

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
