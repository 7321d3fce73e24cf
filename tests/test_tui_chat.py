"""The Chat screen (F6) driven with Pilot on a real QLoRA run of the demo's tiny Llama, trained once on the CPU:
it loads the run in a worker, streams the tuned model's reply (and the base's beside it with compare on), shows
tokens/s and memory, and "serve this" (the export and `vllm serve` commands, the GPU: advisor.service's numbers).
Its Eval tab measures base against tuned (runner.api.evaluate_run: eval.json) and shows the run's eval.json; its
Export tab checks RAM, disk and time before it writes the merged model, and "serve this" then serves that folder.
A directory that cannot be used, a bad setting, a folder that cannot be written: one message on the screen; and
`tuneplan chat --prompt` says the same line as the screen about a prompt beyond the model's positions."""

import asyncio
import shlex
import shutil
import time

import pytest

pytest.importorskip("textual")

from advisor.tui.app import make_app

STEPS = 20
QUESTION = "What is the capital of France?"
SIZE = (160, 48)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished QLoRA run of the demo (20 steps: the adapter already changes the replies)."""
    pytest.importorskip("torch")
    from advisor.spec import build_plan
    from runner.demo import DEMO_DATA, build_model_dir, demo_plan
    from runner.recipe import Recipe

    root = tmp_path_factory.mktemp("chat")
    model_dir = build_model_dir(root / "model")
    d = demo_plan(model_dir.resolve(), DEMO_DATA, (root / "runs").resolve(), max_steps=STEPS).model_dump(mode="json")
    d["data"]["pad_to"] = "longest"  # shorter batches (as tests/test_after_run.py)
    d["run"].update(eval_every=STEPS, save_every=STEPS)
    run_dir = root / "runs" / "demo-run"
    recipe = Recipe(build_plan(d), run_dir, log=lambda m: None)
    assert recipe.run() == 0, getattr(recipe, "error", None)
    return run_dir


def shown(screen, selector: str) -> str:
    return screen.query_one(selector).content.plain


async def until(condition, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        await asyncio.sleep(0.2)
    return bool(condition())


async def open_dir(pilot, screen, run_dir) -> None:
    """Type a run directory and press Enter; wait until it is loaded or refused."""
    box = screen.query_one("#chat-run")
    box.focus()
    box.value = str(run_dir)
    await pilot.press("enter")
    await pilot.pause()
    assert await until(lambda: screen.session is not None or screen.error is not None)


async def ask(pilot, screen, text: str) -> int:
    before = screen.turn
    prompt = screen.query_one("#chat-prompt")
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")
    await pilot.pause()
    assert screen.turn == before + 1 and prompt.value == ""  # sent
    assert await until(lambda: not screen.replying, 120)
    await pilot.pause()
    return screen.turn


@pytest.mark.slow
@pytest.mark.asyncio
async def test_chat_answers_beside_the_base_with_its_speed_and_says_how_to_serve(trained):
    from advisor import present, service

    app = make_app(run_dir=str(trained))  # as after Start on the Launch screen
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("f6")
        await pilot.pause()
        screen = app.screen
        assert type(screen).__name__ == "ChatScreen"
        assert screen.query_one("#chat-run").value == str(trained)
        assert await until(lambda: screen.session is not None or screen.error is not None)
        assert screen.error is None, screen.error
        status = shown(screen, "#chat-status")
        assert f"loaded {trained}/adapter/" in status and "QLoRA (NF4 base), fp32, cpu" in status
        assert "alpaca template" in status

        # serve this: the numbers and commands advisor.service gives for the base model's shape
        serve = shown(screen, "#serve-text")
        shape = service.resolve_model(str(trained.parent.parent / "model"))
        merged = service.rank_serving(shape, str(trained.parent / "demo-run-export"), context=128, concurrency=1)
        cmd = shlex.join(merged.command(merged.choice))
        assert cmd.startswith(f"vllm serve {trained}-export --max-model-len 128") and cmd in serve
        assert f"tuneplan export {trained} --dtype bf16" in serve  # the demo computes in fp32
        gpu = present.short_gpu(merged.choice.gpu.name)
        assert f"GPU: {gpu}" in serve and present.at_once(merged.choice.estimate) in serve
        assert f"--enable-lora --max-lora-rank 16 --lora-modules demo-run={trained}/adapter" in serve
        await pilot.click("#copy-serve")
        assert app.clipboard == cmd
        await pilot.click("#copy-export")
        assert app.clipboard == f"tuneplan export {trained} --dtype bf16"

        # a tuned reply, streamed, with its speed and memory
        screen.query_one("#chat-max").value = "24"
        turn = await ask(pilot, screen, QUESTION)
        tuned = shown(screen, f"#reply-{turn}-tuned")
        stats = shown(screen, f"#stats-{turn}-tuned")
        assert tuned.strip() and "tokens/s" in stats and "RSS" in stats and "weights 1.2 MiB" in stats
        assert "24 tokens in" in stats or "ended its turn" in stats
        assert not screen.query(f"#reply-{turn}-base")  # compare is off
        assert tuned == screen.session.reply(QUESTION, "tuned")  # what the model says, greedy

        # compare on: the base's reply beside the tuned one, same prompt and sampling
        await pilot.click("#chat-compare")
        assert screen.query_one("#chat-compare").value
        turn = await ask(pilot, screen, QUESTION)
        assert shown(screen, f"#reply-{turn}-tuned") == tuned
        base = shown(screen, f"#reply-{turn}-base")
        assert base.strip() and base != tuned  # the adapter changed the model
        assert base == screen.session.reply(QUESTION, "base")
        assert "tokens/s" in shown(screen, f"#stats-{turn}-base")

        # Esc stops a reply at its next token; the session is free again
        await pilot.click("#chat-compare")
        screen.query_one("#chat-max").value = "400"
        prompt = screen.query_one("#chat-prompt")
        prompt.focus()
        prompt.value = QUESTION
        await pilot.press("enter")
        await asyncio.sleep(0.3)
        await pilot.press("escape")
        assert await until(lambda: not screen.replying, 60)
        await pilot.pause()
        assert "· stopped ·" in shown(screen, f"#stats-{screen.turn}-tuned")

        # a message the model cannot read whole, and a bad setting: one line each, nothing sent
        turn = screen.turn
        prompt.value = "word " * 700
        await pilot.press("enter")
        await pilot.pause()
        assert "beyond the model's 512 positions" in shown(screen, "#chat-note") and screen.turn == turn
        screen.query_one("#chat-max").value = "0"
        prompt.value = QUESTION
        await pilot.press("enter")
        await pilot.pause()
        assert "max new tokens must be at least 1" in shown(screen, "#chat-note") and screen.turn == turn
        assert prompt.value == QUESTION  # kept, to send again


@pytest.mark.asyncio
async def test_a_directory_that_is_not_a_run_says_so_on_the_screen(tmp_path):
    app = make_app(run_dir=str(tmp_path))  # the app's run (as Launch sets it) is not a run directory
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "Go to chat" in [c.title for c in app.get_system_commands(app.screen)]  # in the command palette
        await pilot.press("f6")
        await pilot.pause()
        screen = app.screen
        assert type(screen).__name__ == "ChatScreen"
        assert await until(lambda: screen.error is not None, 30)
        assert screen.session is None
        assert f"{tmp_path} has no plan.yaml, so it is not a run directory" in shown(screen, "#chat-status")
        await ask_before_loading(pilot, screen)
        await open_dir(pilot, screen, tmp_path / "nowhere")
        assert "does not exist" in shown(screen, "#chat-status")
        assert "the `vllm serve` command" in shown(screen, "#serve-text")  # nothing to serve yet
        assert screen.query_one("#copy-serve").disabled
        await pilot.press("f2")
        await pilot.press("f6")
        await pilot.pause(0.5)
        assert "does not exist" in shown(screen, "#chat-status")  # the directory typed in stays


async def ask_before_loading(pilot, screen) -> None:
    prompt = screen.query_one("#chat-prompt")
    prompt.focus()
    prompt.value = "hello"
    await pilot.press("enter")
    await pilot.pause()
    assert not screen.replying and prompt.value == "hello"  # nothing sent, the message kept


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_run_without_its_adapter_and_one_that_needs_custom_code(trained, tmp_path):
    from advisor.planfile import load_plan, save_plan

    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained, unfinished, ignore=shutil.ignore_patterns("run.lock"))
    shutil.rmtree(unfinished / "adapter")
    custom = tmp_path / "custom"
    shutil.copytree(trained, custom, ignore=shutil.ignore_patterns("run.lock"))
    plan = load_plan(custom / "plan.yaml", trust_remote_code=True)
    save_plan(plan.model_copy(update={"model": plan.model.model_copy(update={"trust_remote_code": True})}),
              custom / "plan.yaml")

    app = make_app(mode="chat")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.screen
        await open_dir(pilot, screen, unfinished)
        status = shown(screen, "#chat-status")
        assert f"{unfinished} has no adapter/" in status and "tuneplan run" in status
        await open_dir(pilot, screen, custom)
        status = shown(screen, "#chat-status")
        assert "model.trust_remote_code: true" in status and "tick 'trust remote code'" in status
        await pilot.click("#chat-trust")  # consent, as --trust-remote-code does
        await pilot.click("#chat-load")
        await pilot.pause()
        assert await until(lambda: screen.session is not None or screen.error is not None)
        assert screen.error is None and screen.session.models.run.trust_remote_code


# --- the Eval and Export tabs --------------------------------------------------------------------------

def rendered(widget, width: int = 120) -> str:
    """What a Static shows, as plain text (its content may be a rich Group of tables)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(widget.content)
    return console.export_text()


def copy_of(trained, tmp_path):
    """The run in a folder of its own (eval and export write beside and into it)."""
    run = tmp_path / "runs" / "demo-run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("run.lock"))
    return run


async def loaded(pilot, app, run_dir):
    """The app opened on ``run_dir`` (as after Start on Launch), F6, the models loaded."""
    await pilot.pause()
    await pilot.press("f6")
    await pilot.pause()
    screen = app.screen
    assert await until(lambda: screen.session is not None or screen.error is not None)
    assert screen.error is None, screen.error
    await pilot.pause()  # the prompt takes the focus (on the Chat tab) before a test clicks another tab
    return screen


async def tab(pilot, screen, name: str) -> None:
    await pilot.click(f"#--content-tab-tab-{name}")
    await pilot.pause()
    assert screen.query_one("#chat-tabs").active == f"tab-{name}"


async def press(pilot, screen, selector: str) -> None:
    """Click a button once it takes clicks again (a Button ignores them for 0.2 s after the last: its active
    effect, whose timer runs late on a busy machine)."""
    button = screen.query_one(selector)
    assert await until(lambda: not button.has_class("-active") and not button.disabled, 30)
    await pilot.click(selector)
    await pilot.pause()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_eval_tab_measures_the_tuned_model_below_its_base_and_shows_eval_json(trained, tmp_path):
    import json

    run = copy_of(trained, tmp_path)
    app = make_app(run_dir=str(run))
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, app, run)
        await tab(pilot, screen, "eval")
        panel = screen.query_one("#eval-panel")
        assert "no eval.json yet" in shown(screen, "#eval-status")

        # a bad setting: its one line, nothing written
        screen.query_one("#eval-n").value = "-1"
        await press(pilot, screen, "#eval-run")
        assert await until(lambda: "samples" in shown(screen, "#eval-status"), 60)
        assert shown(screen, "#eval-status") == "samples must be 0 or more (got -1)" and not panel.busy
        assert not (run / "eval.json").exists()

        screen.query_one("#eval-n").value = "2"
        screen.query_one("#eval-max").value = "12"
        await press(pilot, screen, "#eval-run")
        assert await until(lambda: panel.result is not None and not panel.busy, 120), shown(screen, "#eval-status")
        await pilot.pause()
        assert not screen.query_one("#eval-run").disabled
        r = panel.result
        assert r["tuned"]["loss"] < r["base"]["loss"]  # 20 steps already lower the held-out loss
        assert r["tuned"]["loss"] == pytest.approx(r["run_final_val_loss"], abs=1e-4)  # the run's own number
        assert len(r["samples"]) == 2 and r["sampling"]["max_new_tokens"] == 12
        assert json.loads((run / "eval.json").read_text()) == json.loads(json.dumps(r))
        assert json.loads((run / "report.json").read_text())["eval"]["tuned"] == r["tuned"]
        assert shown(screen, "#eval-status").startswith(f"wrote {run}/eval.json; report.json has it under 'eval'")
        view = rendered(screen.query_one("#eval-result"))
        for which in ("base", "tuned"):
            assert f"{r[which]['loss']:.4f}" in view and f"{r[which]['perplexity']:,.2f}" in view
        assert "(lower is better)" in view and "reference" in view and r["samples"][0]["reference"][:20] in view

        # the run opened again: its eval.json is shown before anything is measured
        await press(pilot, screen, "#chat-load")
        assert await until(lambda: screen.session is not None and panel.result is not None)
        await pilot.pause()
        view = rendered(screen.query_one("#eval-result"))
        assert f"eval.json of {r['time']}" in view and f"{r['tuned']['loss']:.4f}" in view


@pytest.mark.slow
@pytest.mark.asyncio
async def test_export_tab_checks_first_then_writes_a_merged_model_that_loads(trained, tmp_path, monkeypatch):
    import collections

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = copy_of(trained, tmp_path)
    app = make_app(run_dir=str(run))
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, app, run)
        await tab(pilot, screen, "export")
        panel = screen.query_one("#export-panel")
        assert await until(lambda: panel.ready, 60)
        assert screen.query_one("#export-out").value == f"{run}-export"  # the CLI's defaults
        assert screen.query_one("#export-dtype").value == "fp32"  # the run's compute dtype
        check = shown(screen, "#export-check")
        assert check.startswith(f"export {run}/adapter/ -> {run}-export (fp32)")
        assert "of RAM" in check and "of disk" in check and "takes about" in check
        assert not screen.query_one("#export-run").disabled

        # the choices are checked again as they change; what cannot be written is one line, Export off
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep.txt").write_text("mine")
        screen.query_one("#export-out").value = str(tmp_path / "full")
        assert await until(lambda: "exists and is not empty" in shown(screen, "#export-check"), 60)
        assert "\n" not in shown(screen, "#export-check") and screen.query_one("#export-run").disabled
        du = collections.namedtuple("du", "total used free")
        monkeypatch.setattr("shutil.disk_usage", lambda p: du(2 * 1024**2, 1024**2, 1024**2))
        screen.query_one("#export-out").value = str(tmp_path / "out")
        assert await until(lambda: "of disk at" in shown(screen, "#export-check"), 60)
        assert "1.0 MiB is free" in shown(screen, "#export-check") and not panel.ready
        monkeypatch.undo()
        screen.query_one("#export-dtype").value = "bf16"
        assert await until(lambda: panel.ready and "(bf16)" in shown(screen, "#export-check"), 60)
        screen.query_one("#export-dtype").value = "fp32"
        assert await until(lambda: panel.ready and "(fp32)" in shown(screen, "#export-check"), 60)

        out = tmp_path / "out"
        await press(pilot, screen, "#export-run")
        assert await until(lambda: panel.done is not None and not panel.busy, 120), shown(screen, "#export-log")
        await pilot.pause()
        log = shown(screen, "#export-log")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        from advisor.units import mib_or_gib

        assert f"wrote {out} ({mib_or_gib(size)})" in log and "exported in" in log, log
        serve = shown(screen, "#serve-text")
        assert f"done: wrote {out} ({mib_or_gib(size)})" in serve
        assert f"vllm serve {out} --max-model-len 128" in serve
        assert not (tmp_path / "out-nf4").exists() and not (run.parent / "demo-run-export").exists()

    # what it wrote is the run's model: base + adapter, merged
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(trained.parent.parent / "model", dtype=torch.float32)
    x = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(base, run / "adapter")(x).logits
        got = merged(x).logits
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.slow
def test_cli_chat_says_the_screens_line_about_a_prompt_too_long(trained, capsys):
    from advisor.cli.main import main
    from runner import api

    session = api.chat_session(api.load_models(api.open_run(trained), "cpu"), max_new_tokens=500)
    for text, max_new in (("word " * 700, "24"), (QUESTION, "500")):
        session.sampling = api.sampling(max_new_tokens=int(max_new))
        said = api.prompt_problem(session, text)
        assert said and "beyond the model's 512 positions" in said
        assert main(["chat", str(trained), "--prompt", text, "--max-new-tokens", max_new]) == 2
        cap = capsys.readouterr()
        assert "Traceback" not in cap.err and cap.out == ""  # nothing generated
        assert [x for x in cap.err.splitlines() if x.startswith("tuneplan:")] == [f"tuneplan: {said}"]


@pytest.mark.slow
def test_serve_this_rounds_the_adapters_rank_up_to_one_vllm_takes(trained, tmp_path):
    from advisor.planfile import load_plan, save_plan
    from advisor.tui.serve_this import serve_this
    from runner import api

    run = copy_of(trained, tmp_path)
    plan = load_plan(run / "plan.yaml")
    training = plan.training.model_copy(update={"lora": plan.training.lora.model_copy(update={"r": 4})})
    save_plan(plan.model_copy(update={"training": training}), run / "plan.yaml")
    s = serve_this(api.open_run(run))
    assert "--max-lora-rank 8" in shlex.join(s.lora_cmd)  # vLLM refuses 4: the next rank it takes
