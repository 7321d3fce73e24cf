"""`tuneplan chat`, `tuneplan eval`, `tuneplan export`: what to do with a run's model once it has trained.

Their flags are the CLI's (advisor.cli.runs); front ends reach them through runner.api. Light at import time (torch,
transformers and peft are imported by the commands). User mistakes raise advisor.problems.UserError:
one line, exit code 2, no traceback. The work itself is in runner.tuned (open and load), runner.chat,
runner.evaluate and runner.export; this module parses flags and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from advisor.problems import UserError
from advisor.units import mib_or_gib as _gib


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sampling(a: argparse.Namespace):
    from runner.chat import Sampling

    bad = []
    if a.max_new_tokens < 1:
        bad.append(f"--max-new-tokens must be at least 1 (got {a.max_new_tokens})")
    if not a.temperature >= 0:
        bad.append(f"--temperature must be 0 (greedy) or more (got {a.temperature})")
    if not 0 < a.top_p <= 1:
        bad.append(f"--top-p must be above 0 and at most 1 (got {a.top_p})")
    if bad:
        raise UserError(bad)
    return Sampling(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)


def _open(a: argparse.Namespace, merged: bool = False):
    from runner.tuned import open_run

    return open_run(a.run_dir, checkpoint=a.checkpoint, merged=merged, trust_remote_code=a.trust_remote_code)


def _load(run, device: str):
    from runner.tuned import load_models

    t0 = time.time()
    models = load_models(run, device)
    what = {"qlora": "QLoRA (NF4 base)", "lora": "LoRA", "full": "full fine-tune"}[run.method]
    _stderr(f"loaded {run.run_dir}/{run.label} ({what}, {run.precision}, {models.device}) in {time.time() - t0:.1f} s; "
            f"weights {_gib(models.weights_bytes())}")
    return models


def _stats_line(st) -> str:
    mem = st.memory
    parts = [f"{st.new_tokens} tokens in {st.seconds:.2f} s"]
    if st.tokens_per_s:
        parts.append(f"{st.tokens_per_s:.1f} tokens/s")
    if st.first_token_s is not None:
        parts.append(f"first token {st.first_token_s:.2f} s")
    if st.stop == "length":
        parts.append("stopped at --max-new-tokens")
    used = f"weights {_gib(st.weights_bytes)}, RSS {_gib(mem.get('rss'))} (peak {_gib(mem.get('rss_peak'))})"
    if mem.get("cuda_peak") is not None:
        used += f", GPU peak {_gib(mem['cuda_peak'])}"
    return f"  [{', '.join(parts)}; {used}]"


# --- chat ----------------------------------------------------------------------------------------

def cmd_chat(a: argparse.Namespace) -> int:
    from runner.chat import ChatSession

    sampling = _sampling(a)
    run = _open(a, merged=a.merged)
    models = _load(run, a.device)
    chat = ChatSession(models, sampling, system=a.system)
    _stderr(f"prompt format: {run.data_format} records, {chat.template} template"
            + ("" if chat.multi_turn else " (one message at a time, as the run trained)")
            + ("; greedy" if sampling.temperature == 0 else f"; temperature {sampling.temperature:g}, "
               f"top-p {sampling.top_p:g}, seed {sampling.seed}"))
    if a.prompt is not None:
        problem = _answer(chat, a.prompt, a.compare)
        if problem:
            raise UserError(problem)
        return 0
    tty = sys.stdin.isatty()
    if tty:
        _stderr("type a message; 'exit' or Ctrl-D ends, '/reset' forgets the conversation")
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("exit", "quit", "/exit", "/quit"):
            break
        if text == "/reset":
            chat.reset()
            _stderr("(conversation forgotten)")
            continue
        if text:
            problem = _answer(chat, text, a.compare)
            if problem:
                _stderr(f"tuneplan: {problem}")  # this message is not sent; the next one may be
    return 0


def _answer(chat, text: str, compare: bool) -> str | None:
    """Print each model's reply as it comes; or, sending nothing, why the model cannot read the message whole
    (runner.chat.prompt_problem, the line the app shows)."""
    from runner.chat import prompt_problem

    whiches = ("base", "tuned") if compare else ("tuned",)
    for which in whiches:
        problem = prompt_problem(chat, text, which)
        if problem:
            return problem
    for which in whiches:
        if compare:
            print(f"{which}> ", end="", flush=True)
        for chunk in chat.stream(text, which):
            print(chunk, end="", flush=True)
        print(flush=True)
        _stderr(_stats_line(chat.last_stats))
    return None


# --- eval ----------------------------------------------------------------------------------------

def cmd_eval(a: argparse.Namespace) -> int:
    from runner.evaluate import check_data_file, check_writable, evaluate, save

    sampling = _sampling(a)
    if a.samples < 0:
        raise UserError(f"--samples must be 0 or more (got {a.samples})")
    run = _open(a)
    check_writable(run)
    check_data_file(run, a.data)
    models = _load(run, a.device)
    result = evaluate(models, data_path=a.data, samples=a.samples, sampling=sampling, progress=_stderr)
    path, report = save(run, result)
    if a.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_eval(result)
    _stderr(f"wrote {path}" + ("; report.json has it under 'eval'" if report else " (no report.json to add it to)"))
    return 0


def print_eval(r: dict) -> None:
    d = r["data"]
    print(f"eval of {r['run_dir']}/{r['weights']} on {d['what']}: {d['examples']} examples, "
          f"{d['scored_tokens']:,} scored tokens")
    print(f"{'':8}{'loss':>9}{'perplexity':>13}")
    for which in ("base", "tuned"):
        m = r[which]
        ppl = f"{m['perplexity']:,.2f}" if m["perplexity"] is not None else "inf"
        print(f"{which:8}{m['loss']:>9.4f}{ppl:>13}")
    ch = r["change"]
    print(f"tuned - base: loss {ch['loss']:+.4f}, perplexity x{ch['perplexity_ratio']:.3g}"
          + ("  (lower is better)" if ch["loss"] < 0 else "  (the tuned model is not better on this data)"))
    if r.get("run_final_val_loss") is not None:
        print(f"the run's own validation loss at its last step: {r['run_final_val_loss']:.4f}")
    if r["samples"]:
        s = r["sampling"]
        how = "greedy" if not s["temperature"] else f"temperature {s['temperature']:g}, seed {s['seed']}"
        print(f"\nsamples ({how}, {s['max_new_tokens']} new tokens at most):")
    for i, row in enumerate(r["samples"], 1):
        print(f"[{i}] line {row['line']}: {_short(row['prompt'], 300)}")
        for k in ("reference", "base", "tuned"):
            print(f"    {k + ':':11}{_short(row[k], 300)}")


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


# --- export --------------------------------------------------------------------------------------

def cmd_export(a: argparse.Namespace) -> int:
    from runner.export import export, plan_export
    from runner.tuned import open_run

    run = open_run(a.run_dir, checkpoint=a.checkpoint, trust_remote_code=a.trust_remote_code)
    xp = plan_export(run, a.out, a.dtype, a.nf4)
    for line in xp.words():
        _stderr(line)
    if a.check:
        return 0
    done = export(xp, progress=_stderr)
    print(f"merged model: {done['merged']}")
    if "nf4" in done:
        print(f"4-bit copy:   {done['nf4']}")
    print(f"chat template: {done['chat_template']}")
    _stderr(f"export finished in {done['seconds']:.1f} s; load it with "
            f"AutoModelForCausalLM.from_pretrained({done['merged']!r}); GGUF: see docs/after-the-run.md")
    return 0
