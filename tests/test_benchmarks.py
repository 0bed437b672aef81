"""benchmarks/run.py's machine-readable output on the tiny model (structure, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, run  # noqa: E402

TASKS = ("eraser", "generate", "grounding", "instruct", "personalize", "steering")


def _lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.startswith("{") and '"kind"' in x]


def test_timing_summary_pairs_and_spread():
    s = common.timing_summary([2.0, 2.2, 1.8, 2.0, 2.1], [1.0, 1.0, 1.0, 1.1, 1.0])
    assert s["ratio"] == 2.0 and s["method_s"] == 2.0 and s["baseline_s"] == 1.0
    assert s["ratios"] == [2.0, 2.2, 1.8, 1.818, 2.1]
    lo, hi = s["ratio_iqr"]
    assert lo <= s["ratio_median_of_pairs"] <= hi
    assert s["ratio_ci95"][0] <= s["ratio"] <= s["ratio_ci95"][1]
    assert s["noisy"] is (s["spread"] > 0.1)


def test_views_and_allocations_are_not_counted():
    import torch

    a = torch.randn(2, 3, 4)
    with common.OpCounter() as counter:
        a.transpose(1, 2).unsqueeze(0)[0]  # views only
        torch.empty(3)
        b = a * 2  # one kernel
    assert counter.total == 1 and counter.by_op == {"mul.Tensor": 1}
    assert b.shape == a.shape


def test_breakdown_and_timing_lines(capsys, tmp_path):
    out = tmp_path / "results.jsonl"
    assert run.main(["all", "--ops-only", "--steps", "2", "--out", str(out)]) == 0
    ops = _lines(capsys.readouterr().out)
    assert [line["task"] for line in ops] == list(TASKS)
    assert _lines(out.read_text()) == ops
    for line in ops:
        assert line["kind"] == "ops" and line["model"] == "tiny"
        assert line["controlled_calls"] > 0, line["task"]
        for key in ("ops_per_call_method", "ops_per_call_stock", "extra_ops_per_call"):
            assert isinstance(line[key], (int, float))
        assert line["extra_ops_per_call"] == pytest.approx(line["ops_per_call_method"] - line["ops_per_call_stock"], abs=0.02)
        assert len(line["total_ops"]) == 2 and isinstance(line["extra_by_op"], dict)
        for g in line.get("goals", []):
            assert set(g) == {"goal", "value", "limit", "met"} and isinstance(g["met"], bool)
    by_task = {line["task"]: line for line in ops}
    assert {"text_probs", "ops_after_last_captured"} <= set(by_task["grounding"])
    assert by_task["grounding"]["ops_after_last_captured"] == [0]  # the early exit stops the forward
    assert by_task["eraser"]["mask_building"]["later_calls"] > 0
    assert by_task["steering"]["post_hook"]["calls"] == by_task["steering"]["controlled_calls"]
    assert all(by_task[t]["goals"] for t in ("eraser", "generate", "grounding", "steering"))

    assert run.main(["grounding", "--steps", "2", "--repeats", "2"]) == 0
    (timing,) = _lines(capsys.readouterr().out)
    assert timing["kind"] == "timing" and timing["repeats"] == 2 and len(timing["ratios"]) == 2
    for key in ("method_s", "baseline_s", "ratio", "peak_mem_ratio"):
        assert isinstance(timing[key], (int, float)) and timing[key] > 0
    # two repeats whose ratios agree to 0.1 % round to a spread of exactly 0.0 (seen in CI)
    assert isinstance(timing["spread"], (int, float)) and timing["spread"] >= 0
    assert len(timing["ratio_iqr"]) == 2 and len(timing["ratio_ci95"]) == 2
    assert isinstance(timing["noisy"], bool) and timing["equal_calls"] is True
    assert timing["compile"] is None and timing["backend"] is None


def test_gpu_script_parses_and_keeps_to_its_budget(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_all.sh")]).returncode == 0
    from benchmarks import gpu_all

    results = tmp_path / "gpu.jsonl"
    assert gpu_all.main(["--budget", "0", "--results", str(results)]) == 0
    lines = _lines(results.read_text())
    assert len(lines) == 2 * len(gpu_all.PLAN)  # every planned run gives one line: here all skipped
    assert {line["kind"] for line in lines} == {"skipped"}
    assert {line["model"] for line in lines} == {model for _, model, *_ in gpu_all.PLAN}
    assert all(model in common.full_size_models() for _, model, *_ in gpu_all.PLAN)


def test_the_video_checker_reads_a_perfect_edit_as_placed_and_the_source_as_not():
    """benchmarks/quality.py video: the figures of a clip drawn with the edit done exactly (the
    object recoloured and reshaped in place) and of the unchanged source."""
    from dataclasses import replace

    from benchmarks import quality
    from pipelines.builtin import world

    for case in quality.video_cases(4):
        source = case.clip.frames(64)
        edited_objects = [[replace(o, colour=case.colour, shape=case.shape) for o in objects]
                          for objects in case.clip.objects_per_frame]
        perfect = [world.render(case.clip.background, objects, 64) for objects in edited_objects]
        assert case.word in case.prompt.split() and case.colour in case.prompt
        got = quality.video_figures(perfect, source, case)
        assert got["placed"] == got["placed_exact"] == 1.0, (case.prompt, got)
        assert got["psnr_outside"] == quality.PSNR_CAP and got["flicker"] == 0.0  # only the boxes changed
        unchanged = quality.video_figures(source, source, case)
        assert unchanged["placed"] == 0.0 and unchanged["psnr_outside"] == quality.PSNR_CAP
    # half the cases change the shape too
    shapes = [(c.clip.objects_per_frame[0][0].shape, c.shape) for c in quality.video_cases(4)]
    assert sum(a != b for a, b in shapes) == 2


def test_the_reference_video_loop_does_more_passes_for_the_same_clip(tiny_pipe, tmp_path):
    """bench_video's baseline does the reference code's extra work (a gradient pass at every step,
    the whole UNet, discarded refinement forwards) and, since that work changes nothing, edits the
    clip to the same frames: what our loop skips is pure waste."""
    import numpy as np

    from benchmarks.bench_video import reference_loop
    from pipelines.video import edit_video

    pipe = tiny_pipe("tiny")
    rng = np.random.RandomState(0)
    clip = [(rng.rand(32, 32, 3) * 255).astype(np.uint8) for _ in range(4)]
    settings = dict(steps=6, tune_steps=1, refine_iterations=2, window=4, heatmaps=False, cache_dir=tmp_path)
    ours = edit_video(pipe, clip, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], **settings)
    with reference_loop():
        reference = edit_video(pipe, clip, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], **settings)
    assert reference.params["gradient_passes"] > ours.params["gradient_passes"]
    assert np.abs(np.stack(reference.frames).astype(int) - np.stack(ours.frames).astype(int)).max() <= 1


def test_the_video_move_checker_reads_the_moved_object_in_its_new_box_only():
    from benchmarks import quality
    from pipelines.builtin import world

    for case in quality.video_move_cases(3):
        source = case.clip.frames(64)
        assert case.prompt == case.source_prompt and case.old_boxes is not None
        # the perfect move: the same object drawn at the centre of each new box
        moved = []
        for objects, (x1, y1, x2, y2) in zip(case.clip.objects_per_frame, case.boxes):
            obj = objects[0]
            moved.append(world.render(case.clip.background, [obj.moved((x1 + x2) / 128, (y1 + y2) / 128)], 64))
        got = quality.video_figures(moved, source, case)
        assert got["placed"] == 1.0 and got["left_behind"] == 0.0 and got["psnr_outside"] == quality.PSNR_CAP, got
        unchanged = quality.video_figures(source, source, case)
        assert unchanged["placed"] == 0.0 and unchanged["left_behind"] == 1.0


def test_the_personalize_checker_reads_object_one_alone_as_faithful_and_both_as_leaking():
    """benchmarks/quality.py personalize: a sample that draws exactly the first learned object is
    faithful; one that also draws the second object leaks; the second alone is neither; a scene
    the method refused counts as wrong."""
    from dataclasses import replace

    from benchmarks import quality

    for scene in quality.personalize_scenes(4):
        first, second = scene.objects
        assert first.shape != second.shape and first.colour != second.colour
        alone = replace(scene, objects=(replace(first, size="large", x=0.5, y=0.5),))
        both = scene.render(64)
        only_second = replace(scene, objects=(second,)).render(64)
        got = quality.personalize_figures([alone.render(64)] * 2, scene)
        assert got == {"faithful": 1.0, "own_colour": 1.0, "own": 1.0, "leak": 0.0, "refused": 0.0}, (scene, got)
        mixed = quality.personalize_figures([alone.render(64), both], scene)
        assert mixed["leak"] == 0.5 and mixed["faithful"] <= 0.5
        wrong = quality.personalize_figures([only_second], scene)
        assert wrong["own_colour"] == wrong["faithful"] == 0.0 and wrong["leak"] == 1.0
        assert quality.personalize_figures(None, scene)["refused"] == 1.0


def test_the_instruct_checker_reads_the_exact_edit_as_done_and_the_source_as_not():
    """benchmarks/quality.py instruct: fresh edits of 2 and 3 parts; the exact result has every
    part done and nothing else changed; the source has no part done; a result with one part
    left undone is not `all_done` but keeps its other parts."""
    from dataclasses import replace

    from benchmarks import quality
    from pipelines.builtin import world

    edits = quality.instruct_edits(6)
    assert [len(e.parts) for e in edits] == [2, 3, 2, 3, 2, 3]
    assert min(e.seed for e in edits) >= world.TEST_SEED_START
    for edit in edits:
        exact = quality.instruct_figures(edit, edit.target.render(64))
        assert exact == {"all_done": 1.0, "parts_done": 1.0, "preserve_error": 0.0}
        source = quality.instruct_figures(edit, edit.source.render(64))
        assert source == {"all_done": 0.0, "parts_done": 0.0, "preserve_error": 0.0}
        first = edit.parts[0]
        half = replace(edit, parts=edit.parts[1:]).target if first.kind == "colour" else None
        if half is not None:  # the first part left undone
            got = quality.instruct_figures(edit, half.render(64))
            assert got["all_done"] == 0.0 and got["parts_done"] == (len(edit.parts) - 1) / len(edit.parts)
