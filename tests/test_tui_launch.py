"""Launch a tiny real run on the CPU from the Launch screen and watch it finish with a report (slow)."""

import asyncio
import time

import pytest

pytest.importorskip("textual")
launch = pytest.importorskip("runner.launch")

from advisor.tui.app import make_app


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    pytest.importorskip("torch")
    from runner.demo import DEMO_DATA, build_model_dir, demo_plan

    tmp = tmp_path_factory.mktemp("tui-run")
    model = build_model_dir(tmp / "model")
    return tmp, demo_plan(model, DEMO_DATA, tmp / "runs", max_steps=5)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_start_a_tiny_cpu_run_and_see_its_report(tiny_plan):
    tmp, plan = tiny_plan
    app = make_app(plan=plan, plan_path=tmp / "plan.yaml")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        assert app.plan is not None and app.plan.hardware.device == "cpu"
        await pilot.press("f4")
        await pilot.pause()
        screen = app.screen
        assert not screen.query_one("#start").disabled
        assert plan.data.path == screen.query_one("#dataset").value
        assert "-m runner" in str(screen.query_one("#command").content)
        assert "valid records" in str(screen.query_one("#preview").content)
        screen.query_one("#run-dir").value = str(tmp / "runs" / "from-tui")
        await pilot.press("ctrl+g")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (screen.run and screen.run.finished
                                                     and screen.query_one("#abort").disabled):
            await asyncio.sleep(0.5)
        run = screen.run
        assert run is not None and run.finished, run and run.status
        assert run.error is None, run.error
        assert run.step == 5 and len(run.losses) == 5
        assert run.report is not None and (tmp / "runs" / "from-tui" / "report.json").is_file()
        assert "predicted vs measured" in str(screen.query_one("#run-result").content.title)
        assert (tmp / "plan.yaml").is_file()  # Start saved the plan it ran


@pytest.mark.asyncio
@pytest.mark.slow
async def test_attach_to_a_finished_run_directory(tmp_path):
    """Reattach: events.jsonl written by someone else is read back and shown."""
    import json

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events = [{"type": "start", "predicted": {"peak_allocated_bytes": 2 * 1024**3, "peak_reserved_bytes": 3 * 1024**3},
               "total_steps": 3}]
    events += [{"type": "step", "step": i, "epoch": i / 3, "loss": 3.0 - i, "lr": 1e-4, "tokens_per_s": 100.0,
                "elapsed_s": i, "eta_s": 3 - i, "memory": {"torch_allocated": 1024**3 * i, "rss": 10}}
               for i in (1, 2, 3)]
    report = {"predicted": {"peak_allocated_bytes": 2 * 1024**3}, "measured": {"peak_allocated_bytes": 3 * 1024**3}}
    events.append({"type": "end", "status": "completed", "report": report})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    app = make_app(mode="launch")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        screen = app.screen
        screen.query_one("#run-dir").value = str(run_dir)
        await pilot.click("#attach")
        for _ in range(20):
            await pilot.pause(0.1)
            if screen.run and screen.run.report:
                break
        assert screen.run.losses == [2.0, 1.0, 0.0]
        assert screen.query_one("#mem-chart").lines[0][0] == 2 * 1024**3  # the predicted peak is drawn
        assert "completed" in str(screen.query_one("#run-status").content)


@pytest.mark.asyncio
@pytest.mark.slow
async def test_launch_screen_offers_local_skypilot_and_slurm(tmp_path):
    """A 16-H100 plan over two nodes: the per-node commands here, the SkyPilot task and the sbatch script
    it would write (runner.rent.render, the text `tuneplan cloud` writes), and Write file writes it."""
    pytest.importorskip("runner.rent")
    from advisor.spec import build_plan
    from runner.demo import DEMO_DATA

    plan = build_plan({"model": {"ref": "meta-llama/Llama-3.1-70B"},
                       "training": {"method": "full", "precision": "bf16", "seq_len": 2048},
                       "hardware": {"gpu": "H100 SXM", "gpus": 16, "zero": 3, "nodes": 2,
                                    "main_address": "node0.cluster"},
                       "data": {"path": str(DEMO_DATA)}, "run": {"name": "big"}})
    app = make_app(plan=plan, plan_path=tmp_path / "plan.yaml")
    async with app.run_test(size=(160, 60)) as pilot:
        await pilot.pause()
        await pilot.press("f4")
        await pilot.pause()
        screen = app.screen
        shown = str(screen.query_one("#command").content)
        assert "node 0" in shown and "node 1" in shown and "hardware.node_rank=1" in shown
        assert screen.query_one("#start").display and not screen.query_one("#write").display
        screen.query_one("#target").value = "sky"
        await pilot.pause()
        shown = str(screen.query_one("#command").content)
        assert "num_nodes: 2" in shown and "H100:8" in shown and "sky launch" in shown
        assert screen.query_one("#write").display and not screen.query_one("#start").display
        screen.query_one("#target").value = "slurm"
        await pilot.pause()
        assert "#SBATCH --nodes=2" in str(screen.query_one("#command").content)
        screen.action_write()
        await pilot.pause()
        assert (tmp_path / "plan.sbatch").is_file() and (tmp_path / "plan.yaml").is_file()
        assert "#SBATCH --nodes=2" in (tmp_path / "plan.sbatch").read_text()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_launch_preview_shows_the_longest_example_and_warns_past_the_sequence_length(tiny_plan):
    tmp, plan = tiny_plan
    short = plan.model_copy(update={"training": plan.training.model_copy(update={"seq_len": 64})})
    app = make_app(plan=short, plan_path=tmp / "plan-short.yaml")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        shown = str(app.screen.query_one("#preview").content)
        assert "longest example: line" in shown
        assert "longer than the sequence length 64" in shown


# --- the app acts -----------------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.slow
async def test_enter_on_a_recommendation_applies_it_to_the_plan():
    app = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause(0.5)
        screen = app.screen
        adv = screen._advice
        assert adv is not None and adv.choice is not None
        screen.query_one("#options").focus()
        await pilot.press("enter")  # the first row is the recommendation
        await pilot.pause(0.3)
        c = adv.choice
        plan = app.evaluation.plan
        assert (plan.training.method, plan.training.micro_batch, plan.training.grad_accum, plan.hardware.gpus) == \
            (c.method, c.micro_batch, c.grad_accum, c.num_gpus)


@pytest.mark.asyncio
@pytest.mark.slow
async def test_nothing_fits_lists_the_nearest_plans_and_enter_applies_one():
    app = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        app.screen.query_one("#gpu").value = "rtx-3060"
        app.screen.query_one("#seq").value = "4096"
        await pilot.pause(0.5)
        assert app.evaluation.result.status == "oom"
        await pilot.press("f3")
        await pilot.pause(0.5)
        screen = app.screen
        assert screen._advice.choice is None and screen.query_one("#nearest").row_count >= 1
        screen.query_one("#nearest").focus()
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.evaluation.ok and app.evaluation.result.status in ("fits", "tight")


@pytest.mark.asyncio
@pytest.mark.slow
async def test_a_start_error_stays_on_screen_until_dismissed(tmp_path):
    app = make_app(mode="launch", plan_path=tmp_path / "plan.yaml")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        screen = app.screen
        screen.query_one("#dataset").value = str(tmp_path / "no-such.jsonl")
        screen.query_one("#overrides").value = "hardware.device=cpu hardware.gpu=null"
        await pilot.press("ctrl+g")
        await pilot.pause(2.0)  # longer than nothing: it does not fade like a toast
        shown = str(screen.query_one("#start-error").content)
        assert "cannot start" in shown and "does not exist" in shown
        screen.query_one("#launch-buttons").focus()
        await pilot.press("escape")
        await pilot.pause()
        assert str(screen.query_one("#start-error").content) == ""


@pytest.mark.asyncio
@pytest.mark.slow
async def test_the_save_dialog_selects_its_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press(*"mine.yaml", "enter")
        await pilot.pause()
    assert (tmp_path / "mine.yaml").is_file() and not list(tmp_path.glob("plan.yaml*"))


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_stopped_run_resumes_from_the_launch_screen_and_watch_follows_it(tiny_plan, monkeypatch):
    tmp, plan = tiny_plan
    monkeypatch.setenv("TUNEPLAN_TEST_HOOKS", "step_delay=0.4")
    plan = plan.model_copy(update={"run": plan.run.model_copy(update={"max_steps": 8, "save_every": 100})})
    app = make_app(plan=plan, plan_path=tmp / "plan-resume.yaml")
    run_dir = tmp / "runs" / "resumed"
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await pilot.press("f4")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#run-dir").value = str(run_dir)
        await pilot.press("ctrl+g")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (screen.run and screen.run.step >= 2):
            await asyncio.sleep(0.3)
        await pilot.press("ctrl+x")  # SIGTERM: it checkpoints and stops
        while time.monotonic() < deadline and not screen.query_one("#abort").disabled:
            await asyncio.sleep(0.3)
        assert screen.run.status == "interrupted" and not screen.query_one("#resume").disabled
        await pilot.press("f5")
        await pilot.pause()
        assert app.screen.run is not None and app.screen.run.run_dir == str(run_dir)  # Watch follows it
        await pilot.press("f4")
        await pilot.pause()
        assert app.screen is screen and not screen.query_one("#resume").disabled
        screen.action_resume()
        await pilot.pause(0.5)
        assert str(screen.query_one("#start-error").content) == "", screen.query_one("#start-error").content
        while time.monotonic() < deadline and not (screen.run and screen.run.finished
                                                     and screen.query_one("#abort").disabled):
            await asyncio.sleep(0.5)
        assert screen.run.status == "completed" and screen.run.step == 8, screen.run.error
