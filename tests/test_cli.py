"""The command line: `python app.py generate ...` and its error handling (offline, tiny model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from app_server import assert_user_error, run_app  # noqa: E402
FAST = ["--model", "tiny", "--steps", "2", "--width", "64", "--height", "64"]


@pytest.mark.timeout(300)
def test_generate_writes_image_sidecar_and_one_heatmap_per_word(tmp_path):
    output, heatmaps = tmp_path / "out" / "cat.png", tmp_path / "maps"
    proc = run_app("generate", *FAST, "--prompt", "a photo of a cat", "--seed", "0",
                   "--output", str(output), "--heatmaps", str(heatmaps), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert output.is_file() and output.stat().st_size > 0
    sidecar = output.with_suffix(".json")
    assert sidecar.is_file()
    assert json.loads(sidecar.read_text())["seed"] == 0
    maps = sorted(heatmaps.glob("*.png"))
    assert len(maps) == 5, maps  # a / photo / of / a / cat
    assert maps[-1].name.endswith("cat.png")
    stdout = proc.stdout
    assert str(output) in stdout and "seed: 0" in stdout
    for path in maps:
        assert str(path) in stdout


@pytest.mark.timeout(300)
def test_generate_random_seed_is_printed(tmp_path):
    proc = run_app("generate", *FAST, "--prompt", "a cat", "--output", "x.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seed_lines = [line for line in proc.stdout.splitlines() if line.startswith("seed: ")]
    assert len(seed_lines) == 1 and seed_lines[0].split()[1].isdigit()
    assert len(list((tmp_path / "x_heatmaps").glob("*.png"))) == 2  # default heatmap folder


def test_missing_prompt_is_one_line_error(tmp_path):
    assert_user_error(run_app("generate", "--model", "tiny", cwd=tmp_path), "--prompt")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--width", "65"], "65"),
        (["--steps", "0"], "step"),
        (["--model", "no-such-model-anywhere-xyz"], "no-such-model-anywhere-xyz"),
        (["--model", "missing/folder/model.safetensors"], "missing"),
        (["--width", "sixty"], "--width"),
    ],
    ids=["width-65", "steps-0", "unknown-model", "missing-file", "width-not-a-number"],
)
def test_bad_generate_arguments_are_one_line_errors(tmp_path, args, fragment):
    base = {"--model": "tiny", "--steps": "2", "--width": "64", "--height": "64"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [item for pair in base.items() for item in pair]
    proc = run_app("generate", *flat, "--prompt", "a photo of a cat", "--output", "o.png",
                   cwd=tmp_path)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "o.png").exists()


def test_bad_serve_arguments_are_one_line_errors():
    assert_user_error(run_app("serve", "--auth", "user:pa:ss"), "colon")
    assert_user_error(run_app("--auth", "nocolon"), "colon")
    assert_user_error(run_app("--port", "99999"), "65535")
    assert_user_error(run_app("no-such-command"), "no-such-command")


def test_help_lists_the_subcommands():
    proc = run_app("--help")
    assert proc.returncode == 0
    for command in ("serve", "generate"):
        assert command in proc.stdout
    sub = run_app("generate", "--help")
    assert sub.returncode == 0 and "--heatmaps" in sub.stdout and "--prompt" in sub.stdout
    serve = run_app("serve", "--help")
    for flag in ("--host", "--port", "--share", "--auth", "--model", "--device", "--max-upload-mb"):
        assert flag in serve.stdout


def test_app_is_importable_and_subcommands_form_a_registry():
    sys.path.insert(0, str(ROOT))
    import app

    assert {"serve", "generate"} <= set(app.COMMANDS)
    args = app.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert args.model == app.DEFAULT_MODEL
    assert app.build_parser().parse_args(["serve", "--auth", "ann:secret"]).auth == ("ann", "secret")
