"""Shared pytest fixtures: tiny models built in code, loaded once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests import the project's packages (pipelines/, attention_processors/) from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in tests/app_server.py


@pytest.fixture(scope="session")
def tiny_pipe():
    """Factory: `tiny_pipe("tiny-sdxl")` -> the cached pipeline from `pipelines.models.load` (CPU, fp32).

    The pipeline is shared by every test of the session: restore anything you change on it
    (attention processors, scheduler), or build your own with `pipelines.models.build_tiny`.
    """
    from pipelines import models

    def get(name: str = "tiny"):
        return models.load(name, device="cpu", dtype=None)

    return get


@pytest.fixture(scope="module")
def tiny_app():
    """`python app.py --model tiny` running for the module's tests (an `app_server.AppServer`)."""
    from app_server import launched_app

    with launched_app("--model", "tiny") as running:
        yield running


@pytest.fixture(scope="module")
def tiny_app_api(tiny_app):
    """The running tiny app's API description (`/gradio_api/info`)."""
    from app_server import api_info

    return api_info(tiny_app.url)


@pytest.fixture(scope="session")
def photo():
    """A 96x72 noise photo with a red square and a blue rectangle: two concepts to personalize."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    array = (rng.rand(72, 96, 3) * 255).astype(np.uint8)
    array[10:40, 10:40] = [230, 40, 40]
    array[35:65, 55:90] = [40, 40, 230]
    return Image.fromarray(array)
