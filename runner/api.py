"""The runner as the front ends see it: the one module the CLI (advisor.cli) and the app (advisor.tui)
import from the runner. The commands behind `tuneplan run`, `data check`, `demo`, `cloud`, `chat`,
`eval` and `export` (their flags are the CLI's, advisor.cli.runs), and what the app needs to start a
run, follow it, preview its data and write its cloud files. Light at import time: each name imports
its module when first used, so the app still opens without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# --- the commands (called with the CLI's parsed arguments) --------------------------------------------


def cmd_run(a, hooks=None) -> int:
    from runner.commands import cmd_run as run

    return run(a, hooks)


def cmd_data_check(a) -> int:
    from runner.commands import cmd_data_check as check

    return check(a)


def cmd_demo(a) -> int:
    from runner.commands import cmd_demo as demo

    return demo(a)


def cmd_cloud(a) -> int:
    from runner.rent import cmd_cloud as cloud

    return cloud(a)


def cmd_chat(a) -> int:
    from runner.after import cmd_chat as chat

    return chat(a)


def cmd_eval(a) -> int:
    from runner.after import cmd_eval as evaluate

    return evaluate(a)


def cmd_export(a) -> int:
    from runner.after import cmd_export as export

    return export(a)


# --- for the app: start and follow a run ---------------------------------------------------------------


def start_run(plan_path, run_dir=None, resume=None, overrides=(), force: bool = False, env=None, capture=True):
    """Start a run in a subprocess (runner.launch.start_run): a RunHandle, or UserError at once."""
    from runner.launch import start_run as start

    return start(plan_path, run_dir, resume, overrides, force, env, capture)


def build_command(plan_path, run_dir=None, resume=None, overrides=(), force: bool = False) -> list[str]:
    from runner.launch import build_command as build

    return build(plan_path, run_dir, resume, overrides, force)


def node_commands(plan, plan_path, run_dir) -> list[list[str]]:
    from runner.launch import node_commands as nodes

    return nodes(plan, plan_path, run_dir)


def format_command(cmd: list[str]) -> str:
    from runner.launch import format_command as fmt

    return fmt(cmd)


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    from runner.events import read_events as read

    return read(run_dir, offset)


def next_command(run_dir: str | Path) -> dict[str, str] | None:
    """What to type (or press) to continue a stopped run: resume from its checkpoint, or start it again."""
    from runner.rundir import next_command as nxt

    return nxt(Path(run_dir))


def render_cloud(plan, kind: str, plan_path, **options: Any) -> str:
    """The SkyPilot task (kind "sky") or sbatch script ("slurm") `tuneplan cloud` writes for the plan."""
    from runner.rent import render

    return render(plan, kind, plan_path, **options)


def check_data(path: str | Path, fmt: str = "auto"):
    """(records, format, problems) of a data file (runner.data.load_and_check); DataError when unreadable."""
    from runner.data import load_and_check

    return load_and_check(path, fmt)


def longest_in_file(*args, **kwargs) -> dict:
    """The longest example of a data file in the model's tokens (runner.failfast.longest_in_file)."""
    from runner.failfast import longest_in_file as longest

    return longest(*args, **kwargs)


def gpu_snapshot():
    from runner.monitor import gpu_snapshot as snap

    return snap()


def system_memory():
    from runner.monitor import system_memory as mem

    return mem()


# --- for the app: after the run (the Chat screen) -------------------------------------------------------


def open_run(run_dir: str | Path, *, checkpoint: str | None = None, merged: bool = False,
             trust_remote_code: bool = False):
    """The run in ``run_dir`` (runner.tuned.open_run: a TunedRun; reads the directory, loads nothing), or
    UserError with the one line that says why it cannot be used (not a run, no adapter yet, custom code
    without consent, ...)."""
    from runner.tuned import open_run as open_

    return open_(run_dir, checkpoint=checkpoint, merged=merged, trust_remote_code=trust_remote_code)


def load_models(run, device: str = "auto"):
    """The run's tuned model and its base, loaded as the runner trained them (runner.tuned.load_models);
    seconds: call it from a worker thread. UserError when they cannot be loaded."""
    from runner.tuned import load_models as load

    return load(run, device)


def chat_session(models, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, system: str | None = None):
    """A runner.chat.ChatSession on loaded models: ``stream(text, which)`` yields the reply of "tuned" or
    "base" as it is generated, then ``last_stats`` holds its tokens/s and memory. UserError when the run's
    prompt format cannot be told."""
    from runner.chat import ChatSession

    return ChatSession(models, sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed), system=system)


def sampling(*, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
    """runner.chat.Sampling (greedy when temperature is 0); UserError naming each bad value."""
    from advisor.problems import UserError
    from runner.chat import Sampling

    bad = []
    if max_new_tokens < 1:
        bad.append(f"max new tokens must be at least 1 (got {max_new_tokens})")
    if not temperature >= 0:
        bad.append(f"temperature must be 0 (greedy) or more (got {temperature})")
    if not 0 < top_p <= 1:
        bad.append(f"top-p must be above 0 and at most 1 (got {top_p})")
    if bad:
        raise UserError(bad)
    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def export_defaults(run) -> dict[str, Any]:
    """Where `tuneplan export RUN_DIR` writes the merged model by default and in which dtype
    (runner.export.default_out / default_dtype): {"out": Path, "dtype": "bf16" | "fp16" | "fp32"}."""
    from runner.export import default_dtype, default_out

    return {"out": default_out(run), "dtype": default_dtype(run)}


def read_eval(run) -> dict[str, Any] | None:
    """The run's eval.json (what `tuneplan eval` wrote last, runner.evaluate), None when it has none; UserError
    when it is a symbolic link or not JSON."""
    from runner.evaluate import EVAL_FILE, read_json_nofollow

    found = read_json_nofollow(run.run_dir / EVAL_FILE)
    return found if isinstance(found, dict) else None


def evaluate_run(models, *, samples: int = 3, max_new_tokens: int = 64, data_path=None, progress=None):
    """`tuneplan eval` on loaded models (runner.evaluate): the checks first (a run still writing the directory,
    the data), then base and tuned loss and perplexity with the training mask, ``samples`` held-out prompts
    answered by both (greedy), written to RUN_DIR/eval.json and report.json's ``eval``; ``progress(words)``
    as it goes. Seconds: call it from a worker thread. (result, eval.json path, report.json updated);
    UserError with the one line that says why not."""
    from advisor.problems import UserError
    from runner.evaluate import check_data_file, check_writable, evaluate, save

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise UserError(f"samples must be 0 or more (got {samples})")
    how = sampling(max_new_tokens=max_new_tokens)
    run = models.run
    check_writable(run)
    check_data_file(run, data_path)
    result = evaluate(models, data_path=data_path, samples=samples, sampling=how, progress=progress)
    path, report = save(run, result)
    return result, path, report


def plan_export(run, out=None, dtype: str | None = None, nf4: bool = False):
    """Every check `tuneplan export` makes before it starts (runner.export.plan_export: the folder, RAM and disk
    against what the merge needs, the time): an ExportPlan (``.words()``: the lines the CLI prints), or
    UserError with the one line that says why not."""
    from runner.export import plan_export as plan

    return plan(run, out, dtype, nf4)


def export_run(xp, progress=None) -> dict[str, Any]:
    """Write the export ``plan_export`` checked (runner.export.export: the merged model, and the 4-bit copy);
    seconds to minutes: call it from a worker thread. What it wrote: {"merged": DIR, "nf4": DIR (with the
    4-bit copy), "bytes": {"merged": n, "nf4": n} (the files written), "seconds", "chat_template"}."""
    from runner.export import export

    done = export(xp, progress=progress)
    done["bytes"] = {k: sum(f.stat().st_size for f in Path(done[k]).rglob("*") if f.is_file() and not f.is_symlink())
                     for k in ("merged", "nf4") if k in done}
    return done


# --- the estimate from the data: the runner's loader, as lengths ------------------------------------------


def data_lengths(plan, data_path=None, progress=None):
    """The plan's data as the runner's loader prepares it, in lengths (runner.data.measure, batched: a large
    JSONL in seconds), for advisor.service.data_estimate: read with the plan's tokenizer and template (the
    model directory's, or the hub's tokenizer files), or without one an approximation that says so.
    ``progress(fraction, words)`` as the records are tokenized. Raises Problems for the data's problems."""
    from advisor.problems import Problem, Problems
    from advisor.service import DataLengths
    from runner.data import DataError, measure

    tokenizer, source = plan_tokenizer(plan)
    try:
        m = measure(plan.data, tokenizer, plan.training.seq_len, plan.run.seed, data_path, progress, source)
    except DataError as e:
        raise Problems([Problem(p, "data.path") for p in e.problems]) from None
    return DataLengths(tuple(m.train), tuple(m.lines), len(m.val), m.examples, m.trained_tokens, m.records,
                       m.truncated, m.skipped, m.format, m.template, m.source, m.exact,
                       str(data_path or plan.data.path), tuple(m.warnings), tuple(m.lengths))


def plan_tokenizer(plan):
    """(tokenizer, words) for the plan's model: the model directory's tokenizer (or the one beside a
    config.json), else the hub's tokenizer files (the cache, or a download of those files alone when online);
    (None, why) when there is none, and the data is then counted approximately (runner.data.BYTES_PER_TOKEN)."""
    from pathlib import Path

    from runner.data import BYTES_PER_TOKEN
    from runner.modeldir import looks_local

    ref, m = plan.model.ref, plan.model
    where = ref
    if looks_local(ref):
        p = Path(ref).expanduser()
        where = str(p if p.is_dir() else p.parent)
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        kw = {} if looks_local(ref) or not m.revision else {"revision": m.revision}
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=m.trust_remote_code, **kw)
        return tok, f"the tokenizer of {ref}"
    except Exception as e:  # noqa: BLE001 - offline, gated, no tokenizer files: the approximation says why
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why if len(why) <= 160 else why[:157] + "..."
    return None, (f"no tokenizer for {ref} ({why}): tokens approximated as UTF-8 bytes / {BYTES_PER_TOKEN:g}, "
                  "plus one BOS and one EOS per example")


def prompt_problem(session, text: str, which: str = "tuned") -> str | None:
    """Why the session's model cannot answer ``text`` whole (runner.chat.prompt_problem: the prompt and the max
    new tokens beyond the model's positions), the line `tuneplan chat` gives too; None when it fits."""
    from runner.chat import prompt_problem as problem

    return problem(session, text, which)
