"""The Chat screen (F6) driven with Pilot on a real QLoRA run of the demo's tiny Llama, trained once on the CPU:
it loads the run in a worker, streams the tuned model's reply (and the base's beside it with compare on), shows
tokens/s and memory, and "serve this" (the export and `vllm serve` commands, the GPU: advisor.service's numbers).
A directory that cannot be used gives its one message on the screen."""

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
