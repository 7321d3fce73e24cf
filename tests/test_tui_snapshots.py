"""How each screen looks (pytest-textual-snapshot). Update with `pytest tests/test_tui_snapshots.py --snapshot-update`.

The watch screen is left out: it plots this machine's live memory, which differs on every run.
"""

import pytest

pytest.importorskip("pytest_textual_snapshot")

from advisor.tui.app import make_app

SIZE = (160, 48)


async def _steady(pilot):
    for w in pilot.app.screen.query("Input"):
        w.cursor_blink = False
    await pilot.pause()


def test_plan_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_steady)


def test_plan_screen_with_problems(snap_compare):
    async def before(pilot):
        pilot.app.screen.query_one("#batch").value = "0"
        pilot.app.screen.query_one("#model").value = "llama-9000"
        await pilot.pause(0.3)
        await _steady(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)


def test_advice_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, press=["f3"], run_before=_steady)


def test_launch_screen(snap_compare, monkeypatch):
    monkeypatch.setattr("sys.executable", "python")  # the command shown names the interpreter
    async def before(pilot):
        await pilot.press("f4")
        await pilot.pause()
        screen = pilot.app.screen
        screen.query_one("#dataset").value = "runner/demo_data/instructions.jsonl"
        screen.query_one("#run-dir").value = "runs/example"
        screen.preview()
        await _steady(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)
