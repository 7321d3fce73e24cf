"""How each screen looks (pytest-textual-snapshot). Update with `pytest tests/test_tui_snapshots.py --snapshot-update`.

The watch screen is pinned to fixed NVML answers (no GPU here, and live memory differs on every run), and
the stack line to fixed versions (a fresh install may resolve a newer accelerate or peft).
"""

import pytest

pytest.importorskip("pytest_textual_snapshot")

from advisor.tui.app import make_app

SIZE = (160, 48)
STACK = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
         "accelerate": "1.15.0"}


@pytest.fixture(autouse=True)
def _fixed_stack_versions(monkeypatch):
    """The screens name the installed releases of the stack (advisor.gpu_memory.modelled_stack): pin them."""
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: STACK.get(name) or real(name))


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
        await pilot.app.workers.wait_for_complete()  # the preview's worker: longest example, job and peak from the data
        await _steady(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)


def test_watch_screen_with_a_fixed_gpu(snap_compare, monkeypatch):
    """Watch with NVML answers pinned (this task has no GPU): one H100 with two processes."""
    import runner.monitor as monitor

    gib = 1024**3
    snap = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "used": 61 * gib, "total": 80 * gib, "utilization": 87,
             "processes": [{"pid": 4242, "name": "python", "used": 58 * gib},
                           {"pid": 777, "name": "vllm", "used": 3 * gib}]}]
    monkeypatch.setattr(monitor, "gpu_snapshot", lambda: snap)
    monkeypatch.setattr(monitor, "system_memory",
                        lambda: {"total": 128 * gib, "available": 100 * gib, "used": 28 * gib, "rss": gib})

    from advisor.tui.messages import MemorySample

    async def before(pilot):
        await pilot.press("f5")
        await pilot.pause()
        screen = pilot.app.screen
        screen.paused = True  # live samples are ignored from here on
        await pilot.pause(0.2)
        screen.history.clear()
        screen.paused = False
        system = monitor.system_memory()
        for used in (40, 52, 58, 61):  # a fixed history, fed synchronously
            snap[0]["used"] = used * gib
            screen.on_memory_sample(MemorySample(snap, system))
        screen.paused = True
        await _steady(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=before)
