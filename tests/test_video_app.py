"""The "Edit video" tab: drawing boxes on frames, the edit as a stoppable job with every stage's
progress, its files, its examples, and the tab in a real browser (tiny model, tiny clips)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import browser_page, built_tab, error_badges, launched_app, require_browser, shown_box  # noqa: E402

from pipelines.errors import UserInputError  # noqa: E402
from pipelines.video_settings import VideoSettings  # noqa: E402
from ui import video_tab  # noqa: E402

SOURCE, PROMPT = "a photo of a cat", "a photo of a dog"
#: a cheap edit on the tiny model: the rest of the settings are the tab's (the paper's)
FAST = dict(steps=2, tune_steps=2, refine_iterations=1, window=3, checkpoint_every=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 4-frame, 32 px MP4 at 12 fps."""
    from pipelines.io import write_video
    from PIL import Image

    rng = np.random.RandomState(0)
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video([Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)) for _ in range(4)], path, 12)
    return path


@pytest.fixture
def tab(tmp_path):
    """(controls by elem_id, the AppContext, the handler with its own cache folder)."""
    controls, ctx = built_tab(video_tab.build_tab, tmp_path / "outputs")
    return controls, ctx, video_tab.make_handler(ctx, cache=tmp_path / "cache")


def _run(handler, clip, boxes, progress_calls: list | None = None, previews: list | None = None, **settings):
    """Every status line the handler yields, and its last output; `progress_calls` receives
    every (progress, desc, unit) the handler reports, `previews` every (preview output, the
    status lines so far) it yields before the last."""
    def progress(value, desc=None, total=None, unit="steps"):
        if progress_calls is not None:
            progress_calls.append((value, desc, unit))

    statuses, last, skip = [], None, type(gr.skip())
    for last in handler("tiny", str(clip), SOURCE, PROMPT, boxes, **{**FAST, **settings}, progress=progress):
        if not isinstance(last[0], skip):
            statuses.append(last[0])
        if previews is not None and last[-1] != gr.skip():
            previews.append((last[-1], list(statuses)))
    if previews:
        previews.pop()  # the last output's
    return statuses, last


# ----------------------------------------------------------------------------- the controls


def test_every_setting_has_a_control_starting_at_its_default(tab):
    controls, _, _ = tab
    by_field = {"frames": "ev-frames", "window": "ev-window", "steps": "ev-steps", "guidance": "ev-guidance",
                "seed": "ev-seed", "tune_steps": "ev-tune-steps", "tune_lr": "ev-tune-lr", "rad": "ev-rad",
                "rad_scale": "ev-rad-scale", "topk": "ev-topk", "preserve_background": "ev-preserve-background",
                "mixed_precision": "ev-mixed-precision", "per_frame_groupnorm": "ev-per-frame-groupnorm"}
    defaults = VideoSettings()
    for name, elem in by_field.items():
        assert controls[elem].value == getattr(defaults, name), name
    # tune_steps' default None (empty box: the backbone's default) is not UNSET's 0: its 0 is no fine-tune
    assert video_tab.tab_settings(tune_steps=None).fine_tune_steps() == VideoSettings.PAPER_TUNE_STEPS
    assert video_tab.tab_settings(tune_steps=0).fine_tune_steps() == 0
    # None-default fields start at 0 ("the source's"), which the handler reads back as None
    assert controls["ev-width"].value == controls["ev-height"].value == controls["ev-tune-frames"].value == 0
    settings = video_tab.tab_settings(width=0, height=0, tune_frames=0, seed=-1)
    assert settings.width is settings.height is settings.tune_frames is None and settings.seed >= 0


def test_every_long_job_has_a_stop_and_the_examples_say_what_they_do(tab):
    controls, _, _ = tab
    assert controls["ev-stop"].value == "Stop" and controls["ev-run"].value == "Edit"
    assert len(video_tab.EXAMPLE_LABELS) == len(video_tab.EXAMPLES)
    assert controls["ev-stop-note"].visible is False  # shown once Stop is pressed: no empty gap under the buttons


def test_the_seed_used_row_shows_after_an_edit_and_reuses_its_seed(tmp_path):
    """As on the other tabs: a hidden "Seed used" row, revealed by a successful edit (the edit
    event's last output is its box), whose button puts the seed back into Advanced and opens it."""
    from ui.common import AppContext, OutputStore

    ctx = AppContext(default_model="tiny", outputs=OutputStore(tmp_path))
    with gr.Blocks() as demo:
        video_tab.build_tab(ctx)
    by_elem = {block.elem_id: key for key, block in demo.blocks.items() if getattr(block, "elem_id", None)}
    assert demo.blocks[by_elem["ev-seed-row"]].visible is False  # no "Seed used 0" before an edit
    dependencies = demo.config["dependencies"]
    edit = next(d for d in dependencies if d.get("api_name") == video_tab.TASK)
    # the API's outputs: the seed used where it was before the preview came (which is last)
    assert [demo.blocks[i].elem_id for i in edit["outputs"]] == ["ev-status", "ev-edited", "ev-side", "ev-attention",
                                                                 "ev-files", "ev-seed-used", "ev-preview"]
    # revealed only once the edit has succeeded (a refused or stopped edit leaves it hidden)
    assert any(d["trigger_after"] == edit["id"] and d["trigger_only_on_success"]
               and d["outputs"] == [by_elem["ev-seed-row"]] for d in dependencies)
    # the preview box (shown while an edit samples) is hidden once the edit has succeeded; it starts hidden
    hide = next(d for d in dependencies if d["trigger_after"] == edit["id"] and d["trigger_only_on_success"]
                and d["outputs"] == [by_elem["ev-preview"]])
    assert demo.fns[hide["id"]].fn() == {"__type__": "update", "visible": False}
    assert demo.blocks[by_elem["ev-preview"]].visible is False
    reuse = next(d for d in dependencies if d["targets"] == [(by_elem["ev-reuse-seed"], "click")])
    assert reuse["inputs"] == [by_elem["ev-seed-used"], by_elem["ev-seed"]]
    assert reuse["outputs"] == [by_elem["ev-seed"], by_elem["ev-advanced"]]
    seed, advanced = demo.fns[reuse["id"]].fn(1234, -1)
    assert seed == 1234 and advanced.open is True
    assert demo.fns[reuse["id"]].fn(None, 7)[0] == 7  # nothing used yet: the box keeps its value


def test_the_edit_event_passes_each_control_to_its_own_parameter(tmp_path):
    """Gradio passes inputs by position: the run button's inputs follow the handler's signature."""
    from ui.common import AppContext, OutputStore

    ctx = AppContext(default_model="tiny", outputs=OutputStore(tmp_path))
    with gr.Blocks() as demo:
        video_tab.build_tab(ctx)
    dependency = next(d for d in demo.config["dependencies"] if d.get("api_name") == video_tab.TASK)
    ids = [demo.blocks[i].elem_id for i in dependency["inputs"]]
    names = video_tab.setting_parameters(video_tab.make_handler(ctx))
    assert ids == ["ev-model", "ev-video", "ev-source-prompt", "ev-prompt", "ev-boxes",
                   *(video_tab.elem_id(name) for name in names)]


def test_the_table_becomes_boxes_and_says_what_is_wrong_in_one_sentence():
    boxes = video_tab.boxes_from_table([["dog", 0, 0, 16, 16, 0], ["", None, None, None, None, None],
                                        [" dog ", 4, 4, 20, 20, float("nan")]])
    assert [(b.word, b.x2, b.frame) for b in boxes] == [("dog", 16, 0), ("dog", 20, 0)]
    assert video_tab.boxes_from_table(None) == []
    for rows, fragment in (([["dog", 0, 0, 16]], "has 4 cells"), ([[None, 0, 0, 16, 16, 0]], "has no word"),
                           ([["dog", 0, None, 16, 16, 0]], "has no y1"), ("dog", "must be a table")):
        with pytest.raises(UserInputError, match=fragment):
            video_tab.boxes_from_table(rows)


def test_two_clicks_add_a_box_for_the_chosen_word_and_the_frame_shows_it(tab, clip):
    _, ctx, _ = tab
    scale = video_tab.display_scale((32, 32))  # the viewer shows the 32 px frame enlarged
    assert scale == video_tab.VIEWER_SIDE // 32 > 1
    rows, picture, note, corner = video_tab.add_corner(ctx, str(clip), 2, [], PROMPT, "dog", None,
                                                       20 * scale + scale - 1, 5 * scale)
    assert rows == [] and corner == [20, 5] and "opposite corner" in note
    rows, picture, note, corner = video_tab.add_corner(ctx, str(clip), 2, rows, PROMPT, "dog", corner,
                                                       4 * scale, 17 * scale + 1)
    assert rows == [["dog", 4, 5, 21, 18, 2]] and corner is None  # sorted corners, clicked pixels included
    assert picture.size == (32 * scale, 32 * scale) and "*dog*" in note and "keyframe" in note
    # the box is drawn on the enlarged frame: its top edge has the first box colour
    assert tuple(np.asarray(picture)[5 * scale, 10 * scale]) == video_tab.BOX_COLOURS[0]
    # drawing the word's box again on the same frame replaces it
    rows2, _, _, _ = video_tab.add_corner(ctx, str(clip), 2, rows, PROMPT, "dog", [0, 0], scale, scale)
    assert rows2 == [["dog", 0, 0, 2, 2, 2]]
    # a click past the frame's edge is a corner on the edge
    _, _, _, corner = video_tab.add_corner(ctx, str(clip), 0, rows, PROMPT, "dog", None, 10_000, -5)
    assert corner == [31, 0]
    # another frame of the same word shows the keyframe's box, marked interpolated (held here)
    picture, note = video_tab.frame_with_boxes(np.zeros((32, 32, 3), np.uint8), 0, 4, rows, PROMPT)
    assert "interpolated" in note
    with pytest.raises(UserInputError, match="Choose the word"):
        video_tab.add_corner(ctx, str(clip), 0, rows, PROMPT, "horse", None, 1, 1)
    # a box that cannot be used is shown as the task's sentence, not drawn
    _, note = video_tab.frame_with_boxes(np.zeros((32, 32, 3), np.uint8), 0, 4, [["dog", 0, 0, 90, 9, 0]], PROMPT)
    assert note.startswith("**Boxes:**") and "outside the 32x32 frame" in note


def test_the_word_menu_offers_the_edited_prompts_words():
    assert video_tab.prompt_choices("a jellyfish and a goldfish, a jellyfish") == ["a", "jellyfish", "and",
                                                                                   "goldfish"]
    assert video_tab.prompt_choices(None) == []


# ----------------------------------------------------------------------------- the edit


@pytest.mark.timeout(300)
def test_an_edit_reports_every_stage_writes_its_files_and_reuses_the_cache(tab, clip):
    _, _, handler = tab
    calls, previews = [], []
    statuses, (summary, edited, side, heat, files, seed_used, preview) = _run(
        handler, clip, [["dog", 0, 0, 16, 16, 0], ["dog", 16, 16, 32, 32, 3]], calls, previews)
    # the last run's preview is hidden first; the editing stage's one preview step (of 2) shows the
    # first, middle and last frames side by side; the result replaces it
    assert previews[0][0] == {"__type__": "update", "value": None, "visible": False}
    assert len(previews) == 2, previews
    shown, before = previews[1]
    assert shown["visible"] is True and shown["label"] == "Preview (while editing): step 1 of 2, frames 0, 1, 3"
    strip = np.asarray(shown["value"])  # 3 frames of 32 px, 2 px apart, enlarged 4 times (100 px -> 400)
    assert strip.shape == (4 * 32, 4 * (3 * 32 + 2 * 2), 3) and video_tab.PREVIEW_WIDTH // 100 == 4
    assert (strip[:, 4 * 32:4 * 34] == 32).all() and not (strip[:, :4 * 32] == 32).all()  # the gap, a frame
    assert "Editing: step 1 of 2" in before[-1] and "Inversion: step 2 of 2" in before[-1]
    assert preview is None
    # the progress bar names each stage with its own count ("fine-tuning 1/2", "inverting the clip 2/2")
    assert list(dict.fromkeys(desc for _, desc, _ in calls)) == ["loading the model", "fine-tuning",
                                                                  "inverting the clip", "editing", "writing the clips"]
    for stage in ("fine-tuning", "inverting the clip", "editing"):
        assert [value for value, desc, _ in calls if desc == stage][-1] == (2, 2), stage
    assert ((1, 2), "fine-tuning", "steps") in calls
    assert any("Fine-tune: step 1 of 2" in s for s in statuses)
    assert any("Inversion: step 2 of 2" in s for s in statuses)
    assert any("Editing: step 1 of 2" in s for s in statuses)
    assert "4 frames at 32x32" in summary and "fine tune" in summary and "Seed 33" in summary
    assert seed_used == 33  # the "Seed used" box
    names = sorted(Path(f).name for f in files)
    assert names == ["edited.json", "edited.mp4", "edited_attn_0_dog.mp4", "edited_side_by_side.mp4"]
    assert Path(edited).name == "edited.mp4" and Path(side).name == "edited_side_by_side.mp4"
    assert [word for _, word in heat] == ["dog"]
    record = json.loads(Path(files[0]).with_name("edited.json").read_text())
    assert record["boxes"][0]["keyframes"] == [0, 3] and record["settings"]["steps"] == 2
    assert not record["fine_tune_cached"] and not record["inversion_cached"]
    assert not any(str(Path(edited).parents[1]) in str(v) for v in record.values())  # no server folder named
    from pipelines.video import read_clip

    result = read_clip(edited)
    assert len(result.frames) == 4 and result.fps == pytest.approx(12, abs=0.5)

    # another prompt and other boxes on the same clip: fine-tune and inversion come from the cache
    statuses, (summary, *_) = _run(handler, clip, [["dog", 8, 8, 24, 24, 0]])
    assert "Fine-tune: from the cache" in summary and "Inversion: from the cache" in summary
    assert not any("Fine-tune: step" in s for s in statuses)


@pytest.mark.timeout(300)
def test_stop_ends_the_fine_tune_at_a_step_and_the_next_edit_resumes_there(tab, clip):
    _, ctx, handler = tab
    run = handler("tiny", str(clip), SOURCE, PROMPT, [["dog", 0, 0, 16, 16, 0]], **{**FAST, "tune_steps": 6},
                  progress=lambda *a, **k: None)
    for outputs in run:
        if "Fine-tune: step 2 of 6" in str(outputs[0]):
            assert ctx.stops.stop(None, video_tab.TASK) == 1
            break
    with pytest.raises(gr.Error) as stopped:
        list(run)
    message = str(stopped.value)
    assert "Stopped at fine-tune step" in message and "resumes there" in message
    assert ctx.stops.running() == 0
    statuses, (summary, *_rest) = _run(handler, clip, [["dog", 0, 0, 16, 16, 0]], tune_steps=6)
    steps_run = [int(s.split("Fine-tune: step ")[1].split()[0]) for s in statuses if "Fine-tune: step" in s]
    assert steps_run and steps_run[0] >= 3 and steps_run[-1] == 6  # resumed after the checkpoint, not from 1


@pytest.mark.timeout(120)
def test_bad_input_is_one_sentence_before_any_model_work(tab, clip, tmp_path):
    _, _, handler = tab
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 40)
    cases = [
        (dict(video=None), "Please upload a clip"),
        (dict(video=str(broken)), "not a readable video"),
        (dict(boxes=[["horse", 0, 0, 16, 16, 0]]), "horse"),
        (dict(boxes=[["dog", 0, 0, 90, 16, 0]]), "outside the 32x32 frame"),
        (dict(boxes=[["dog", 5, 5, 5, 16, 0]]), "zero area"),
        (dict(boxes=[["dog", 0, 0, 16, 16, 9]]), "frame"),
        (dict(prompt=""), "Please enter the prompt"),
        (dict(frames=1), "at least 2 frames"),
        (dict(steps=float("nan")), "finite"),
        (dict(seed=2 ** 70), "seed"),
    ]
    for change, fragment in cases:
        args = dict(model="tiny", video=str(clip), source_prompt=SOURCE, prompt=PROMPT,
                    boxes=[["dog", 0, 0, 16, 16, 0]], **FAST)
        args.update(change)
        with pytest.raises(gr.Error) as caught:
            list(handler(**args, progress=lambda *a, **k: None))
        message = str(caught.value)
        assert fragment in message, (change, message)
        assert "\n" not in message and "Traceback" not in message


def test_the_servers_training_limit_bounds_the_default_fine_tune_too(clip, tmp_path):
    """An empty fine-tune box means the paper's 200 steps on the inflated UNet: a server started
    with --max-train-steps 100 refuses it as it refuses a typed 200; with a motion adapter the
    default is 0 steps, within any limit."""
    from ui.common import AppContext, OutputStore
    from ui.limits import Limits

    ctx = AppContext(default_model="tiny", outputs=OutputStore(tmp_path / "outputs"), limits=Limits(max_train_steps=100))
    handler = video_tab.make_handler(ctx, cache=tmp_path / "cache")
    args = dict(model="tiny", video=str(clip), source_prompt=SOURCE, prompt=PROMPT, boxes=[["dog", 0, 0, 16, 16, 0]],
                **{**FAST, "tune_steps": None})
    for tune_steps in (None, 200):
        with pytest.raises(gr.Error, match="--max-train-steps"):
            list(handler(**{**args, "tune_steps": tune_steps}, progress=lambda *a, **k: None))
    assert VideoSettings(motion_adapter="some-adapter").fine_tune_steps() == 0


def test_the_examples_bind_words_of_their_prompts_inside_the_example_clip():
    from pipelines.video import read_clip
    from pipelines.video import boxes as box_tools

    clip = read_clip(video_tab.EXAMPLE_CLIP)
    assert len(clip.frames) == 8 and clip.size == (64, 64)
    tokenizer = video_tab._tokenizer()
    for path, source, prompt, rows, irjs, tune_steps, steps in video_tab.EXAMPLES:
        assert Path(path) == video_tab.EXAMPLE_CLIP and source and prompt
        targets = box_tools.resolve(video_tab.boxes_from_table(rows), prompt, tokenizer, 77, len(clip.frames),
                                    clip.size)
        assert [t.word for t in targets] == sorted({r[0] for r in rows})
        assert 0 < tune_steps <= VideoSettings.PAPER_TUNE_STEPS and 0 < steps <= VideoSettings().steps
    # the first example's box follows the red circle: it holds the circle's pixels on its keyframes
    for _, x1, y1, x2, y2, frame in video_tab.EXAMPLES[0][3]:
        red = clip.frames[frame][..., 0].astype(int) - clip.frames[frame][..., 2].astype(int) > 100
        inside = red[y1:y2, x1:x2].sum()
        assert inside >= 0.9 * red.sum() > 0, frame


# ----------------------------------------------------------------------------- the browser


@pytest.mark.timeout(600)
def test_edit_video_tab_in_a_real_browser():
    """Pick the example, add a box with two clicks on the frame, edit, and get the clips."""
    require_browser()
    from playwright.sync_api import expect

    with launched_app("--model", "tiny") as server, browser_page(server.url) as page:
        page.get_by_role("tab", name="Edit video").click()
        # as the tab opens at 1400x900, its examples are on screen and nothing is wider than the page
        examples = page.locator("#ev-examples button")
        expect(examples).to_have_count(len(video_tab.EXAMPLES))
        for k in range(len(video_tab.EXAMPLES)):
            box = examples.nth(k).bounding_box()
            assert box["y"] + box["height"] <= 900 and box["x"] + box["width"] <= 1400, box
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # a refused edit (no clip) is one notice; no output keeps an "Error" badge
        page.locator("#ev-run").click()
        page.locator(".toast-title.error").first.wait_for(state="visible", timeout=30_000)
        page.wait_for_timeout(1500)
        assert error_badges(page) == 0
        expect(page.locator("#ev-seed-row")).to_be_hidden()  # a refused edit used no seed
        page.set_viewport_size({"width": 1400, "height": 1200})
        examples.first.click()  # the first example
        expect(page.locator("#ev-prompt textarea")).to_have_value("a blue square on a striped background")
        expect(page.locator("#ev-frame img")).to_have_count(1, timeout=60_000)
        expect(page.locator("#ev-box-note")).to_contain_text("square", timeout=60_000)

        # two clicks on the frame add a row for the chosen word
        page.locator("#ev-word input").click()
        page.get_by_role("option", name="square", exact=True).click()
        image = page.locator("#ev-frame img")
        box = shown_box(image)
        image.click(position={"x": box["width"] * 0.1, "y": box["height"] * 0.1})
        expect(page.locator("#ev-box-note")).to_contain_text("opposite corner", timeout=30_000)
        image.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.3})
        # the new box replaced the word's box on frame 0; frame 7's keyframe stays
        expect(page.locator("#ev-box-note")).to_contain_text("keyframe", timeout=30_000)
        expect(page.locator("#ev-boxes")).not_to_contain_text("29")
        table = " ".join(page.locator("#ev-boxes").inner_text().split())
        rows = re.findall(r"square (\d+) (\d+) (\d+) (\d+) (\d+)", table)
        by_frame = {int(r[4]): tuple(map(int, r[:4])) for r in rows}
        assert len(rows) == 2 and by_frame[7] == (19, 5, 46, 32), table
        x1, y1, x2, y2 = by_frame[0]
        assert 3 <= x1 < x2 <= 25 and 3 <= y1 < y2 <= 25, table  # clicked at 10 % and 30 % of 64 px

        # a quick edit: 2 fine-tune and 6 sampling steps on the tiny model (previews after steps 1 to 5)
        page.locator("#ev-advanced").get_by_text("Advanced").first.click()
        page.locator("#ev-tune-steps input").fill("2")
        page.locator("#ev-steps input").fill("6")
        page.locator("#ev-refine-iterations input[type=number]").fill("1")
        page.locator("#ev-refine-iterations input[type=number]").press("Enter")
        expect(page.locator("#ev-preview")).to_be_hidden()  # shown only while an edit samples
        page.locator("#ev-run").click()
        # while the edit samples, its preview (first, middle and last frames) shows, and fits the column
        expect(page.locator("#ev-preview img")).to_have_count(1, timeout=300_000)
        expect(page.locator("#ev-preview")).to_contain_text("frames 0, 3, 7")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        expect(page.locator("#ev-edited video")).to_have_count(1, timeout=300_000)
        expect(page.locator("#ev-preview")).to_be_hidden()  # the result took its place
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        expect(page.locator("#ev-side video")).to_have_count(1)
        expect(page.locator("#ev-status")).to_contain_text("8 frames at 64x64")
        expect(page.locator('#ev-files a[href$="edited.mp4"]')).to_have_count(1)
        expect(page.locator("#ev-attention .thumbnail-item")).to_have_count(1)
        # the seed the edit used (the settings' 33: the example leaves the seed as it is), and back
        expect(page.locator("#ev-seed-row")).to_be_visible()
        expect(page.locator("#ev-seed-used input")).to_have_value("33")
        page.locator("#ev-seed input").fill("-1")
        page.locator("#ev-reuse-seed").click()
        expect(page.locator("#ev-seed input")).to_have_value("33")
