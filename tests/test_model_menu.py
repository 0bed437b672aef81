"""The Model menu: what the server can use, each model's family, and a note before the user
presses the button when the tab cannot run the chosen model; `--models-from-hf-cache` offers the
diffusers pipelines already in the local Hugging Face cache (read only, nothing downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import backbones, models
from ui.common import model_label, model_note

ROOT = Path(__file__).resolve().parents[1]


def test_a_label_names_the_family_without_loading_the_model():
    assert model_label("builtin") == "builtin · SD 1.x/2.x UNet, built-in"
    assert model_label("tiny-flux").startswith("tiny-flux · FLUX")
    assert model_label("builtin-edit", backbones.TEXT_TO_IMAGE).endswith("(not for this tab)")
    # a single checkpoint file is only known once loaded: its name alone
    assert model_label("some/model.safetensors") == "some/model.safetensors"


def test_the_note_says_in_one_sentence_which_models_the_tab_needs():
    note = model_note("builtin", (backbones.INSTRUCT_PIX2PIX,), "Instruction edit")
    assert note.count(". ") == 0 and "InstructPix2Pix" in note and "`builtin`" in note and "pick another" in note
    assert model_note("builtin-edit", (backbones.INSTRUCT_PIX2PIX,), "Instruction edit") == ""
    assert model_note("builtin", None, "Attention maps") == ""
    assert model_note("owner/not-downloaded", (backbones.SD,), "Remove object") == ""  # unknown: no guess


def _fake_cache(root: Path) -> Path:
    """A Hugging Face hub cache with one diffusers pipeline and one transformers model."""
    for repo, file, content in (("models--acme--shapes-sd", "model_index.json", {"_class_name": "StableDiffusionPipeline"}),
                                ("models--acme--bert", "config.json", {"model_type": "bert"})):
        snapshot = root / repo / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True)
        (snapshot / file).write_text(json.dumps(content))
        (root / repo / "refs").mkdir()
        (root / repo / "refs" / "main").write_text("0123abcd")
    return root


@pytest.mark.timeout(120)
def test_the_hf_cache_offers_its_diffusers_pipelines_with_their_family(tmp_path):
    cache = _fake_cache(tmp_path / "hub")
    script = ("from pipelines import models; print(models.hf_cache_models()); "
              "print(models.backbone_without_loading('acme/shapes-sd').name)")
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=100,
                           env=dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
                                    PYTHONPATH=str(ROOT)))
    assert found.returncode == 0, found.stderr
    assert found.stdout.split("\n")[:2] == ["['acme/shapes-sd']", "sd"]


def test_no_cache_folder_means_no_extra_models(tmp_path):
    script = "from pipelines import models; print(models.hf_cache_models())"
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=100,
                           env=dict(os.environ, HF_HUB_CACHE=str(tmp_path / "missing"), PYTHONPATH=str(ROOT)))
    assert (found.returncode, found.stdout.strip()) == (0, "[]"), found.stderr


@pytest.mark.timeout(300)
def test_cached_models_join_every_menu_after_the_servers_own(tmp_path):
    import app
    from ui.common import OutputStore

    _, ctx = app.build_app(default_model="tiny", outputs=OutputStore(tmp_path), extra_models=("tiny-flux",),
                           models_from_cache=("acme/shapes-sd", "tiny-flux"))
    assert ctx.model_choices[:3] == ["tiny", "tiny-flux", "acme/shapes-sd"]
    args = app.build_parser(only="serve").parse_args(["serve", "--models-from-hf-cache"])
    assert args.models_from_hf_cache
