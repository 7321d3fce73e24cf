"""After the run: `tuneplan chat`, `eval` and `export` on a real QLoRA run of the demo's tiny Llama (CPU).

One run is trained for the module (40 steps on the demo data at the demo's learning rate: its
validation loss ends about 0.6 below the untrained base's, 6.03 against 6.67), and every command is
run on it as a user runs it (advisor.cli.main.main). The prompt tests need only the demo tokenizer.
"""

import json
import shutil

import pytest
import torch

from advisor.cli.main import main
from runner.demo import DEMO_DATA

STEPS = 40
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished QLoRA run of the demo (checkpoint at step 20, adapter at step 40)."""
    from advisor.spec import build_plan
    from runner.demo import build_model_dir, demo_plan
    from runner.recipe import Recipe

    root = tmp_path_factory.mktemp("after")
    model_dir = build_model_dir(root / "model")
    d = demo_plan(model_dir.resolve(), DEMO_DATA, (root / "runs").resolve(), max_steps=STEPS).model_dump(mode="json")
    d["data"]["pad_to"] = "longest"  # shorter batches: the same learning in a third of the time
    d["run"].update(eval_every=STEPS, save_every=STEPS // 2)
    run_dir = root / "runs" / "demo-run"
    recipe = Recipe(build_plan(d), run_dir, log=lambda m: None)
    assert recipe.run() == 0, getattr(recipe, "error", None)
    return run_dir


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from runner.demo import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def one_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.startswith("tuneplan:")]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    return lines[0]


def copy_run(trained, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("run.lock"))
    return dst


def edit_plan(run_dir, **model):
    from advisor.planfile import load_plan, save_plan

    plan = load_plan(run_dir / "plan.yaml")
    save_plan(plan.model_copy(update={"model": plan.model.model_copy(update=model)}), run_dir / "plan.yaml")


# --- prompts: the tokens training saw (no model needed) -------------------------------------------------

def _apply(tok, template, messages):
    old = tok.chat_template
    tok.chat_template = template
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    finally:
        tok.chat_template = old
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("fmt,template", [("alpaca", "alpaca"), ("qa", "alpaca"), ("prompt_completion", "plain"),
                                          ("messages", "plain"), ("messages", "chat"), ("alpaca", "chat")])
def test_prompt_is_the_training_prompt_and_the_exported_template_writes_it(tokenizer, fmt, template):
    """prompt_ids is the part of a training example before its response, and the chat template export
    writes renders the same tokens (what a server applying the exported tokenizer's template sends)."""
    from runner.data import Record, tokenize
    from runner.prompts import chat_template_for, prompt_ids, record_for

    msgs = [{"role": "user", "content": QUESTION}]
    ids = prompt_ids(tokenizer, fmt, template, msgs)
    rec = record_for(fmt, msgs)
    key = {"alpaca": "output", "qa": "answer", "prompt_completion": "completion"}.get(fmt)
    if key:
        rec[key] = "Paris is the capital."
    else:
        rec["messages"][-1]["content"] = "Paris is the capital."
    ex = tokenize(Record(1, rec), fmt, template, tokenizer, 10**6, 0.0)
    first_trained = next(i for i, lab in enumerate(ex.labels) if lab != -100)
    assert ids == ex.input_ids[:first_trained]
    jinja, words = chat_template_for(fmt, template, tokenizer)
    assert words
    assert _apply(tokenizer, jinja or tokenizer.chat_template, msgs) == ids


def test_chat_history_is_the_training_prompt_of_the_next_turn(tokenizer):
    """Multi-turn (messages data): the prompt of turn 2 is what training showed before the 2nd answer."""
    from runner.data import Record, tokenize
    from runner.prompts import chat_template_for, prompt_ids

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    for template in ("chat", "plain"):
        ids = prompt_ids(tokenizer, "messages", template, conv)
        ex = tokenize(Record(1, {"messages": [*conv, {"role": "assistant", "content": "Madrid."}]}), "messages",
                      template, tokenizer, 10**6, 0.0)
        starts = [i for i, lab in enumerate(ex.labels) if lab != -100 and (i == 0 or ex.labels[i - 1] == -100)]
        assert len(starts) == 2  # the two assistant turns
        assert ids == ex.input_ids[:starts[1]]
        jinja, _ = chat_template_for("messages", template, tokenizer)
        assert _apply(tokenizer, jinja or tokenizer.chat_template, conv) == ids


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    one_error(capsys, "does not exist")
    assert main(["eval", str(tmp_path)]) == 2
    one_error(capsys, "has no plan.yaml")
    assert main(["export", str(tmp_path)]) == 2
    one_error(capsys, "has no plan.yaml")


# --- chat ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_chat_compare_prints_a_base_and_a_tuned_reply(trained, capsys):
    assert main(["chat", str(trained), "--prompt", QUESTION, "--compare", "--max-new-tokens", "12"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    base = next(x for x in lines if x.startswith("base> "))
    tuned = next(x for x in lines if x.startswith("tuned> "))
    assert base != tuned.replace("tuned> ", "base> ")
    assert cap.err.count("tokens/s") == 2 and "RSS" in cap.err and "alpaca template" in cap.err


@pytest.mark.slow
def test_chat_reads_stdin_until_exit(trained, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\nexit\nnever read\n"))
    assert main(["chat", str(trained), "--max-new-tokens", "6", "--checkpoint", "step-20"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and cap.err.count("tokens/s") == 1 and "checkpoints/step-20/adapter" in cap.err


@pytest.mark.slow
def test_chat_api_streams_what_generate_gives(trained):
    """The Chat screen's API: chunks as they come, stats after; greedy equals a plain generate on the same
    prompt (tuned: the adapter on; base: the adapter off); closing the generator stops the generation."""
    from runner.chat import ChatSession, Sampling
    from runner.tuned import load_models, open_run

    models = load_models(open_run(trained), "cpu")
    chat = ChatSession(models, Sampling(max_new_tokens=16))
    chunks = list(chat.stream(QUESTION))
    st = chat.last_stats
    assert chunks and 0 < st.new_tokens <= 16 and st.tokens_per_s > 0 and st.first_token_s is not None
    assert st.weights_bytes > 0 and st.memory["rss"] > 0 and st.stop in ("eos", "length")
    ids = torch.tensor([chat.prompt_ids(QUESTION)])
    for which in ("tuned", "base"):
        with models.use(which) as m, torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=models.tokenizer.pad_token_id)
        want = models.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        got = "".join(chunks) if which == "tuned" else chat.reply(QUESTION, "base")
        assert got.strip() == want.strip(), which
    sampled = Sampling(max_new_tokens=12, temperature=1.0, seed=7)
    chat.sampling = sampled
    assert chat.reply(QUESTION, "base") == chat.reply(QUESTION, "base")  # seeded
    chat.sampling = Sampling(max_new_tokens=400)
    gen = chat.stream(QUESTION, "base")
    next(gen)
    gen.close()
    assert chat.last_stats.stop == "stopped" and chat.last_stats.new_tokens < 400


# --- eval ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_writes_eval_json_with_the_tuned_model_below_the_base(trained, capsys):
    assert main(["eval", str(trained), "--samples", "2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    ev = json.loads((trained / "eval.json").read_text())
    rep = json.loads((trained / "report.json").read_text())
    assert ev["tuned"]["loss"] < ev["base"]["loss"] - 0.3, ev
    # the validation split made again as the runner made it: the runner's own number at its last step
    assert ev["tuned"]["loss"] == pytest.approx(rep["loss"]["final_val"], abs=1e-4)
    assert ev["data"]["examples"] == 9 and len(ev["samples"]) == 2
    assert all(s["base"] != s["tuned"] and s["reference"] for s in ev["samples"])
    assert rep["eval"]["tuned"] == ev["tuned"] and rep["status"] == "completed"
    assert "tuned" in out and "perplexity" in out
    assert not [p for p in trained.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_eval_on_a_data_file(trained, tmp_path, capsys):
    f = tmp_path / "held.jsonl"
    f.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:6]))
    assert main(["eval", str(trained), "--data", str(f), "--samples", "0", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["data"]["examples"] == 6 and "every example of" in ev["data"]["what"] and ev["samples"] == []


# --- export -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_merges_and_the_4bit_copy_loads(trained, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.tuned import no_cpu_repack

    before = sorted((p.relative_to(trained), p.stat().st_mtime_ns) for p in trained.rglob("*"))
    out = tmp_path / "exported"
    assert main(["export", str(trained), "--out", str(out), "--4bit"]) == 0
    cap = capsys.readouterr()
    assert "needs" in cap.err and "takes about" in cap.err and str(out) in cap.out
    assert sorted((p.relative_to(trained), p.stat().st_mtime_ns) for p in trained.rglob("*")) == before

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True)
    x = torch.tensor([list(ids["input_ids"])])
    assert tok.decode(x[0]).endswith("### Response:\n")  # the alpaca prompt the run trained with
    merged = AutoModelForCausalLM.from_pretrained(out)
    base_dir = json.loads((out / "tuneplan-export.json").read_text())["base"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(x).logits
        ref = PeftModel.from_pretrained(base, trained / "adapter")(x).logits  # base + adapter, unmerged
        got = merged(x).logits
    assert (got - ref).abs().max() < 1e-4
    assert (got - plain).abs().max() > 1e-2  # the adapter is in it

    q = AutoModelForCausalLM.from_pretrained(f"{out}-nf4")
    assert type(q.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    no_cpu_repack(q)
    with torch.no_grad():
        qg = q(x).logits
    assert torch.nn.functional.cosine_similarity(qg.flatten(), got.flatten(), dim=0) > 0.9  # NF4 rounding


# --- bad input: one message each, exit code 2 ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case,needle", [
    ("unfinished", "resume it with `tuneplan run --resume"),
    ("no_weights", "has no adapter_model.safetensors"),
    ("pickled", "does not load: it could run code"),
    ("model_gone", "no longer exists"),
    ("remote_code", "--trust-remote-code"),
    ("no_checkpoint", "it has step-20"),
    ("other_format", "this run trained on alpaca"),
    ("bad_sampling", "--max-new-tokens must be at least 1"),
])
def test_chat_and_eval_refuse_with_one_message(case, needle, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    args = ["chat", str(run), "--prompt", "hi"]
    if case == "unfinished":
        shutil.rmtree(run / "adapter")
        args = ["eval", str(run)]
    elif case in ("no_weights", "pickled"):
        w = run / "adapter" / "adapter_model.safetensors"
        if case == "pickled":
            w.rename(w.with_name("adapter_model.bin"))
        else:
            w.unlink()
    elif case == "model_gone":
        edit_plan(run, ref=str(tmp_path / "moved-away"))
    elif case == "remote_code":
        edit_plan(run, trust_remote_code=True)
    elif case == "no_checkpoint":
        args += ["--checkpoint", "step-99"]
    elif case == "other_format":
        f = tmp_path / "pc.jsonl"
        f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
        args = ["eval", str(run), "--data", str(f)]
    elif case == "bad_sampling":
        args += ["--max-new-tokens", "0"]
    assert main(args) == 2
    msg = one_error(capsys, needle)
    if case == "unfinished":
        assert "--checkpoint step-20" in msg
    if case == "remote_code":  # consent on the command: it loads (a Llama needs no custom code anyway)
        assert main([*args, "--trust-remote-code", "--max-new-tokens", "2"]) == 0


@pytest.mark.slow
def test_eval_never_writes_through_a_link(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    (run / "eval.json").unlink(missing_ok=True)
    (run / "eval.json").symlink_to(target)
    assert main(["eval", str(run), "--samples", "0"]) == 2
    one_error(capsys, "symbolic link")
    assert target.read_text() == "{}"


@pytest.mark.slow
@pytest.mark.parametrize("case,needle", [
    ("not_empty", "exists and is not empty"),
    ("inside_run", "inside the run's own adapter"),
    ("link", "symbolic link"),
    ("ram", "of free RAM"),
    ("disk", "of disk"),
])
def test_export_refuses_with_one_message(case, needle, trained, tmp_path, capsys, monkeypatch):
    import collections

    out = tmp_path / "out"
    if case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "inside_run":
        out = trained / "adapter" / "x"
    elif case == "link":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    elif case == "ram":  # this machine has the RAM: pretend 1 MiB is free (psutil's own figure, patched)
        vm = collections.namedtuple("vm", "available total")
        monkeypatch.setattr("psutil.virtual_memory", lambda: vm(1024**2, 2 * 1024**2))
    elif case == "disk":
        du = collections.namedtuple("du", "total used free")
        monkeypatch.setattr("shutil.disk_usage", lambda p: du(2 * 1024**2, 1024**2, 1024**2))
    assert main(["export", str(trained), "--out", str(out)]) == 2
    one_error(capsys, needle)
    assert not (trained / "adapter" / "x").exists()
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- a full fine-tune: model/ instead of adapter/, the base loaded beside it ----------------------------

@pytest.mark.slow
def test_full_fine_tune_chat_eval_export(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from advisor.spec import build_plan
    from runner.recipe import Recipe

    model_dir = trained.parent.parent / "model"
    plan = build_plan({
        "model": {"ref": str(model_dir)},
        "training": {"method": "full", "precision": "fp32", "micro_batch": 8, "seq_len": 128,
                     "grad_checkpointing": False, "learning_rate": 1e-3},
        "hardware": {"gpu": None, "device": "cpu"},
        "data": {"path": str(DEMO_DATA), "val_split": 0.1},
        "run": {"output_dir": str(tmp_path), "name": "full", "max_steps": 12, "warmup_steps": 2,
                "eval_every": 12, "save_every": 100}})
    run_dir = tmp_path / "full"
    recipe = Recipe(plan, run_dir, log=lambda m: None)
    assert recipe.run() == 0, getattr(recipe, "error", None)
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / "adapter").exists()

    assert main(["chat", str(run_dir), "--prompt", QUESTION, "--compare", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "base> " in out and "tuned> " in out
    assert main(["eval", str(run_dir), "--samples", "1", "--max-new-tokens", "4", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["weights"] == "model/" and ev["tuned"]["loss"] < ev["base"]["loss"] - 0.3
    assert ev["tuned"]["loss"] == pytest.approx(recipe.val_loss, abs=1e-4)
    out_dir = tmp_path / "full-export"
    assert main(["export", str(run_dir), "--out", str(out_dir), "--dtype", "bf16"]) == 0
    got = AutoModelForCausalLM.from_pretrained(out_dir)
    want = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values(), strict=True))
