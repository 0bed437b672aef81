"""`ui.cli_common.run_folder`, the loop behind every folder command (`erase`, `edit-video`): a done
item is skipped, a bad item is one warning and the batch goes on, the summary line, and the final
error (exit status 2 through app.py) when any item failed.  No model: the items are plain paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.errors import UserInputError  # noqa: E402
from ui.cli_common import run_folder  # noqa: E402


def _run(items, done, fail=(), crash=()):
    """run_folder over `items` with recording callbacks: (calls, exit status or the UserInputError)."""
    calls = []

    def process(model, index, item):
        calls.append(("process", index, item.name, model))
        if item.name in crash:
            raise RuntimeError("a bug")
        if item.name in fail:
            raise UserInputError(f"{item.name} is not readable.")
        print(f"wrote {item.name}")

    try:
        outcome = run_folder(items, is_done=lambda item: item.name in done,
                             load=lambda: calls.append(("load",)) or "model", process=process,
                             report_skip=lambda index, item: calls.append(("skip", index, item.name)),
                             report_start=lambda index, item: calls.append(("start", index, item.name)),
                             failures="things could not be done", prefix="[p] ")
    except UserInputError as error:
        outcome = error
    return calls, outcome


def test_done_items_are_skipped_a_bad_one_warns_and_the_run_fails_at_the_end(capsys):
    items = [Path(name) for name in ("a.png", "b.png", "c.png", "d.png")]
    calls, outcome = _run(items, done={"a.png"}, fail={"b.png"})
    out, err = capsys.readouterr()
    # in order; the model is loaded once, before the first item that is not done; the batch goes on after b
    assert calls == [("skip", 0, "a.png"), ("start", 1, "b.png"), ("load",), ("process", 1, "b.png", "model"),
                     ("start", 2, "c.png"), ("process", 2, "c.png", "model"),
                     ("start", 3, "d.png"), ("process", 3, "d.png", "model")]
    assert err.splitlines() == ["warning: b.png: b.png is not readable."]
    assert out.splitlines() == ["wrote c.png", "wrote d.png", "[p] done: 2, skipped: 1, failed: 1"]
    assert isinstance(outcome, UserInputError)
    assert str(outcome) == "1 of 4 things could not be done (see the warnings above)."


def test_a_rerun_with_every_item_done_loads_nothing_and_succeeds(capsys):
    calls, outcome = _run([Path("a.png"), Path("b.png")], done={"a.png", "b.png"})
    assert outcome == 0 and calls == [("skip", 0, "a.png"), ("skip", 1, "b.png")]
    assert capsys.readouterr().out.splitlines() == ["[p] done: 0, skipped: 2, failed: 0"]


def test_an_error_that_is_not_the_users_ends_the_run(capsys):
    with pytest.raises(RuntimeError, match="a bug"):
        _run([Path("a.png"), Path("b.png")], done=set(), crash={"a.png"})
    assert "done:" not in capsys.readouterr().out
