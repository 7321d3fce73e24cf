"""The Textual app driven with App.run_test() + Pilot: what it shows must be what the advisor returns."""

import io

import pytest
from rich.console import Console

pytest.importorskip("textual")

from advisor import service
from advisor.forms import FORM_DEFAULTS, evaluate, plan_dict
from advisor.gpus import find_gpu, gpu_table
from advisor.policy import fit_status
from advisor.spec import Plan, build_plan
from advisor.tui.app import make_app
from advisor.tui.widgets.membar import MemoryBar
from advisor.units import GIB

SIZE = (160, 48)


def plain(static) -> str:
    con = Console(width=200, record=True, file=io.StringIO())
    con.print(static.content)
    return con.export_text()


def expected(**form):
    """advisor.service.estimate (as the --json object) for the default form with these fields changed."""
    return service.estimate(service.build(plan_dict({**FORM_DEFAULTS, **form})), job=service.Job()).as_json()


async def settle(pilot, seconds: float = 0.3):
    await pilot.pause(seconds)  # the form re-estimates 0.12 s after the last change
    await pilot.pause()


async def type_into(pilot, selector: str, text: str):
    w = pilot.app.screen.query_one(selector)
    w.focus()
    w.value = ""
    await pilot.press(*text)
    await settle(pilot)


def shown_numbers(app) -> str:
    return plain(app.screen.query_one("#components"))


# --- the pure part (no Textual event loop) -------------------------------------------------------

def test_default_form_is_the_readme_plan():
    ev = evaluate(FORM_DEFAULTS, job=service.Job())
    assert not ev.errors and not ev.general
    assert ev.result.as_json() == expected()
    assert ev.status == fit_status(ev.result.peak_reserved_bytes, find_gpu("RTX 4090").memory_bytes) == "fits"
    assert [v.label for v in ev.compare] == ["Full", "LoRA", "QLoRA"]
    assert len(ev.gpu_rows) == len(gpu_table())


def test_every_problem_lands_on_its_field():
    ev = evaluate({**FORM_DEFAULTS, "batch": "0", "model": "no-such-model", "gpu": "rtx 9999", "seq": ""})
    assert ev.result is None
    assert set(ev.errors) == {"batch", "model", "gpu", "seq"}
    assert "must be at least 1" in ev.errors["batch"]
    assert "unknown model" in ev.errors["model"] and "unknown GPU" in ev.errors["gpu"]
    ev = evaluate({**FORM_DEFAULTS, "seq": "999999", "lora_targets": "nope_proj"})
    assert set(ev.errors) == {"seq", "lora_targets"}
    ev = evaluate({**FORM_DEFAULTS, "gpu": "t4"})
    assert set(ev.errors) == {"precision"} and "bf16" in ev.errors["precision"]


def test_hub_ids_are_not_fetched_while_typing():
    ev = evaluate({**FORM_DEFAULTS, "model": "some-org/some-model"})
    assert "press Enter" in ev.errors["model"]


# --- the app -------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_opens_on_the_default_plan_with_numbers():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        res = expected()
        head = plain(app.screen.query_one("#headline"))
        assert "meta-llama/Llama-3.1-8B" in head
        assert f"peak {res['peak_reserved_bytes'] / GIB:,.2f} GiB reserved" in head and "fits" in head
        bar = app.screen.query_one(MemoryBar)
        assert dict(bar.parts) == {**res["breakdown"], **res["overhead"]}
        assert bar.capacity == find_gpu("RTX 4090").memory_bytes
        table = shown_numbers(app)
        for v in res["breakdown"].values():
            assert f"{v / GIB:,.2f}" in table
        assert " GB" not in head + table  # GiB, never GB, for 1024-based numbers


@pytest.mark.asyncio
async def test_every_field_says_what_it_means():
    """A field's tooltip is the plan schema's description of what it edits: the precision names its bytes per
    parameter and which mode underflows, so a user need not know that 'bf16' is not 'amp-bf16'."""
    from advisor.spec import field_table

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        tip = str(app.screen.query_one("#precision").tooltip)
        assert tip == field_table()["training.precision"]["description"]
        assert "8 bytes per parameter" in tip and "16 bytes per parameter" in tip and "underflows" in tip
        for name in ("method", "optimizer", "batch", "seq", "accum", "ckpt", "gpus", "zero", "lora_r"):
            assert app.screen.query_one(f"#{name}").tooltip, name


@pytest.mark.asyncio
@pytest.mark.slow
async def test_a_plans_ambiguous_gpu_name_is_said_out_loud(tmp_path):
    """'a100' in a plan fits three cards: the app reads it as one (the select holds its id) and says which, and
    the others, as the CLI's note does."""
    path = tmp_path / "plan.yaml"
    path.write_text("model: {ref: meta-llama/Llama-3.1-8B}\ntraining: {method: qlora}\nhardware: {gpu: a100}\n")
    app = make_app(plan_path=path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        said = " ".join(n.message for n in app._notifications)
        assert app.form["gpu"] == "a100-80gb-sxm"
        assert "'a100' is read as NVIDIA A100 SXM 80GB" in said and "A100 SXM 40GB" in said


@pytest.mark.asyncio
@pytest.mark.slow
async def test_typing_micro_batch_method_and_model_updates_the_estimate():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await type_into(pilot, "#batch", "4")
        res = expected(batch="4")
        assert app.evaluation.result.as_json() == res
        assert f"{res['peak_reserved_bytes'] / GIB:,.2f}" in shown_numbers(app)
        assert f"{res['breakdown']['logits_and_loss'] / GIB:,.2f}" in shown_numbers(app)

        app.screen.query_one("#method").value = "lora"
        await settle(pilot)
        res = expected(batch="4", method="lora")
        assert app.evaluation.result.as_json() == res
        assert f"{res['peak_reserved_bytes'] / GIB:,.2f}" in shown_numbers(app)

        await type_into(pilot, "#model", "Qwen/Qwen2.5-0.5B")
        res = expected(batch="4", method="lora", model="Qwen/Qwen2.5-0.5B")
        assert app.evaluation.result.as_json() == res
        assert "Qwen/Qwen2.5-0.5B" in plain(app.screen.query_one("#headline"))

        app.screen.query_one("#ckpt").value = False
        await settle(pilot)
        assert app.evaluation.result.as_json() == expected(batch="4", method="lora", model="Qwen/Qwen2.5-0.5B",
                                                           ckpt=False)


@pytest.mark.asyncio
@pytest.mark.slow
async def test_the_memory_savers_are_on_the_form():
    """Offloading and Liger are checkboxes of the plan: ticking one re-estimates as the CLI's flag does; Liger on a
    family it does not patch is flagged on its own field."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.query_one("#liger").value = True
        await settle(pilot)
        assert app.evaluation.result.as_json() == expected(liger=True)
        assert app.evaluation.result.as_json()["breakdown"].get("logits_and_loss", 0) < \
            expected()["breakdown"]["logits_and_loss"] / 10
        app.screen.query_one("#offload").value = True
        await settle(pilot)
        assert app.evaluation.result.as_json() == expected(liger=True, offload=True)
        await type_into(pilot, "#model", "gpt2")
        field = app.screen.query_one("#field-liger")
        assert field.has_class("-invalid") and "no patch for model_type 'gpt2'" in field.error


@pytest.mark.asyncio
@pytest.mark.slow
async def test_invalid_input_is_flagged_on_its_field_and_nothing_crashes():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await type_into(pilot, "#batch", "0")
        field = app.screen.query_one("#field-batch")
        assert field.has_class("-invalid") and "must be at least 1" in field.error
        assert "problem" in plain(app.screen.query_one("#headline"))
        await type_into(pilot, "#model", "llama-9000")
        assert "unknown model" in app.screen.query_one("#field-model").error
        await type_into(pilot, "#batch", "2")
        await type_into(pilot, "#model", "meta-llama/Llama-3.2-1B")
        assert not app.screen.query("Field.-invalid")
        assert app.evaluation.result.as_json() == expected(batch="2", model="meta-llama/Llama-3.2-1B")


@pytest.mark.asyncio
@pytest.mark.slow
async def test_unknown_gpu_in_a_loaded_plan_is_flagged_on_the_gpu_field():
    plan = build_plan({"hardware": {"gpu": "rtx 9999"}})
    app = make_app(plan=plan)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "unknown GPU" in app.screen.query_one("#field-gpu").error


@pytest.mark.asyncio
@pytest.mark.slow
async def test_comparison_and_gpu_table_show():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        cmp = plain(app.screen.query_one("#compare"))
        for label, key in (("Full", "full"), ("LoRA", "lora"), ("QLoRA", "qlora")):
            assert label in cmp
            assert f"{expected(method=key)['peak_reserved_bytes'] / GIB:,.2f}" in cmp
        table = app.screen.query_one("#gpu-table")
        assert table.row_count == len(gpu_table())
        table.focus()
        await pilot.press("down", "enter")  # Enter on a row picks that GPU for the plan
        await settle(pilot)
        assert app.evaluation.gpu is not None and app.screen.query_one("#gpu").value == app.evaluation.gpu.id


@pytest.mark.asyncio
@pytest.mark.slow
async def test_inference_task_compares_weight_storage():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.query_one("#task").value = "inference"
        await settle(pilot)
        assert app.evaluation.plan.task == "inference"
        assert app.evaluation.result.as_json() == expected(task="inference")
        assert not app.screen.query_one("#field-method").display
        assert "int8" in plain(app.screen.query_one("#compare"))


@pytest.mark.asyncio
@pytest.mark.slow
async def test_advice_screen_shows_a_recommendation_and_the_guide():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        rec = plain(app.screen.query_one("#recommendation"))
        assert "Recommended:" in rec and "RTX 4090" in rec
        assert app.screen.query_one("#options").row_count == 3
        assert "Verdict: prompt-first" in plain(app.screen.query_one("#verdict"))
        app.screen.query_one("#q-gap").value = "behaviour"
        app.screen.query_one("#q-prompting_tried").value = True
        app.screen.query_one("#q-examples").value = "800"
        await settle(pilot)
        assert "Verdict: fine-tune-lora" in plain(app.screen.query_one("#verdict"))


@pytest.mark.asyncio
@pytest.mark.slow
async def test_save_and_open_round_trip(tmp_path):
    app = make_app()
    path = tmp_path / "plan.yaml"
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await type_into(pilot, "#batch", "2")
        assert app.save_plan(str(path)) == path
    from advisor.planfile import load_plan

    assert load_plan(path).training.micro_batch == 2
    app2 = make_app(plan_path=path)
    async with app2.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app2.screen.query_one("#batch").value == "2"
        assert app2.evaluation.result.as_json() == expected(batch="2")
        await pilot.press("ctrl+o")  # the open prompt, then Esc
        await pilot.pause()
        await pilot.press("escape")


@pytest.mark.asyncio
@pytest.mark.slow
async def test_watch_screen_says_what_it_can_see():
    app = make_app(mode="watch")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(1.5)
        status = plain(app.screen.query_one("#watch-status"))
        chart = app.screen.query_one("#sys-chart")
        assert chart.values  # system memory is always sampled
        try:
            from runner.monitor import gpu_snapshot
        except ImportError:
            return
        if gpu_snapshot() is None:
            assert "No NVIDIA GPU" in status


@pytest.mark.asyncio
@pytest.mark.slow
async def test_switching_screens_and_the_theme():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        for key, name in (("f3", "AdviceScreen"), ("f4", "LaunchScreen"), ("f5", "WatchScreen"), ("f2", "PlanScreen")):
            await pilot.press(key)
            await pilot.pause()
            assert type(app.screen).__name__ == name
        await pilot.press("ctrl+t")
        assert app.theme == "textual-light"
        await pilot.press("ctrl+t")
        assert app.theme == "textual-dark"


def test_plan_default_is_the_form_default():
    """The form's default is the advisor's default plan (Llama-3.1-8B, QLoRA, RTX 4090)."""
    assert build_plan(plan_dict(FORM_DEFAULTS)).model_dump() == Plan(
        hardware={"gpu": "rtx-4090"}).model_dump()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_exact_estimate_runs_in_a_worker_and_shows_beside_the_analytic():
    pytest.importorskip("torch")
    plan = build_plan({"model": {"ref": "HuggingFaceTB/SmolLM2-135M"}, "training": {"seq_len": 512}})
    app = make_app(plan=plan)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("e")
        await pilot.pause()
        assert app.screen.query_one("#sim-progress").display
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "done" in str(app.screen.query_one("#sim-status").content)
        from advisor.simulate import simulate

        ctx = service.build(plan.model_dump(mode="json"))
        exact = simulate(ctx.plan, ctx.shape)
        assert app.screen.sim_result.peak_allocated_bytes == exact.peak_allocated_bytes
        table = plain(app.screen.query_one("#sim-result"))
        assert "analytic" in table and "exact" in table
        assert f"{exact.peak_allocated_bytes / GIB:,.2f}" in table


@pytest.mark.slow
def test_the_app_never_imports_torch_and_the_package_not_textual():
    """`tuneplan` (no command) may import advisor.tui cheaply; opening the app needs no torch/transformers."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, advisor.tui\n"
            "assert 'textual' not in sys.modules\n"
            "from advisor.tui.app import make_app\n"
            "app = make_app(); app.evaluate_form()\n"
            "print(' '.join(sys.modules))")
    mods = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split())
    assert "textual" in mods and "torch" not in mods and "transformers" not in mods


@pytest.mark.asyncio
@pytest.mark.slow
async def test_watch_screen_plots_each_gpu_and_lists_its_processes(monkeypatch):
    """NVML's view (runner.monitor.gpu_snapshot) rendered per device and per process; faked, as CI has no GPU."""
    monitor = pytest.importorskip("runner.monitor")
    snap = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "used": 30 * GIB, "total": 80 * GIB, "utilization": 97,
             "processes": [{"pid": 4242, "used": 29 * GIB, "name": "python"}]},
            {"index": 1, "name": "NVIDIA H100 80GB HBM3", "used": 1 * GIB, "total": 80 * GIB, "utilization": 0,
             "processes": []}]
    monkeypatch.setattr(monitor, "gpu_snapshot", lambda: snap)
    app = make_app(mode="watch")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(1.2)
        screen = app.screen
        assert screen.query_one("#dev-0").display and screen.query_one("#dev-1").display
        assert not screen.query_one("#dev-2").display
        assert screen.query_one("#dev-0").values[-1] == 30 * GIB
        assert "30.00 / 80.0 GiB" in screen.query_one("#dev-0").title
        procs = screen.query_one("#procs")
        assert procs.row_count == 1 and procs.get_row_at(0)[1:] == ["4242", "python", "29.00"]
        assert "No NVIDIA GPU" not in plain(screen.query_one("#watch-status"))
        await pilot.press("p")  # pause, then resume
        await pilot.press("p")


@pytest.mark.asyncio
@pytest.mark.slow
async def test_enter_resolves_a_hub_id_in_a_worker_and_flags_a_failure(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await type_into(pilot, "#model", "some-org/not-cached-model")
        assert "press Enter" in app.screen.query_one("#field-model").error
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await settle(pilot)
        assert "unknown model" in app.screen.query_one("#field-model").error


@pytest.mark.asyncio
@pytest.mark.slow
async def test_the_transformers_release_is_a_choice_on_the_form(tmp_path):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await type_into(pilot, "#model", "mistralai/Mixtral-8x7B-v0.1")
        five = app.evaluation.result.as_json()
        assert any("#1849" in n for n in five["notes"])  # QLoRA on fused experts: the note
        app.screen.query_one("#transformers").value = "4.57"
        await settle(pilot)
        four = app.evaluation.result.as_json()
        assert four == expected(model="mistralai/Mixtral-8x7B-v0.1", transformers="4.57")
        assert four["peak_allocated_bytes"] < five["peak_allocated_bytes"] / 3  # 4-bit experts
        assert "4.57 (training.transformers" in plain(app.screen.query_one("#headline"))
        path = app.save_plan(str(tmp_path / "plan.yaml"))
    from advisor.planfile import load_plan

    assert load_plan(path).training.transformers == "4.57"


# --- one state for every screen ---------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.slow
async def test_a_job_edited_on_advice_is_the_job_on_plan_and_in_the_saved_plan(tmp_path):
    """The job lives in the app's one form: edit it on the Advice screen, and the Plan screen's time
    and cost, its GPU table and the saved plan all use it (they showed 1,000 examples before)."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        await type_into(pilot, "#job_examples", "5000")
        await type_into(pilot, "#epochs", "2")
        await settle(pilot)
        assert app.evaluation.plan.job.examples == 5000 and app.evaluation.plan.run.epochs == 2
        rec = plain(app.screen.query_one("#recommendation"))  # the advice of this job, not of the one before
        assert app.evaluation.result.time.tokens == 5000 * 512 * 2
        await pilot.press("f2")
        await settle(pilot)
        assert "5,120,000 tokens" in plain(app.screen.query_one("#time"))
        assert "5,000 examples × 512 tokens × 2 epochs" in plain(app.screen.query_one("#gpus-title"))
        assert app.save_plan(str(tmp_path / "p.yaml"))
    from advisor.planfile import load_plan

    saved = load_plan(tmp_path / "p.yaml")
    assert (saved.job.examples, saved.run.epochs) == (5000, 2.0) and "Recommended:" in rec


@pytest.mark.asyncio
@pytest.mark.slow
async def test_a_bad_job_value_is_flagged_on_its_field_and_advice_waits():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        await type_into(pilot, "#job_examples", "0")
        await settle(pilot)
        field = app.screen.query_one("#field-job_examples")
        assert "must be at least 1" in field.error
        assert "fix the job fields" in plain(app.screen.query_one("#recommendation"))


@pytest.mark.asyncio
@pytest.mark.slow
async def test_the_device_is_on_the_form_and_a_gpu_on_the_cpu_is_flagged_there():
    """A CPU plan opened in the app and given a GPU: the verdict would count tensors only; it is a
    problem on the device field, which the form shows (it was hidden)."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.query_one("#device").value = "cpu"
        await settle(pilot)
        assert "runs on the CPU" in app.screen.query_one("#field-device").error
        app.screen.query_one("#gpu").value = "none"
        await settle(pilot)
        assert app.evaluation.ok and app.evaluation.plan.hardware.device == "cpu"
