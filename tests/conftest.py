"""Shared pytest fixtures: tiny models built in code, loaded once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests import the project's packages (pipelines/, attention_processors/) from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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
