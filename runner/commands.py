"""What `tuneplan run`, `tuneplan data check` and `tuneplan demo` do (their flags are the CLI's:
advisor.cli.runs; front ends reach these through runner.api).

Light at import time: torch, transformers and peft are imported inside the commands. User mistakes
raise advisor.problems.UserError (exit code 2, one clear line each, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from runner.console import (  # noqa: E402,F401
    _print_data_check,
    _print_data_problems,
    _print_error,
    _Progress,
    _stderr,
    print_report,
)


def _user_error(problems):
    from advisor.problems import UserError

    return UserError(problems)


# --- run -----------------------------------------------------------------------------------------

def cmd_run(a: argparse.Namespace, hooks=None) -> int:
    """`tuneplan run`; ``hooks`` (runner.hooks.Hooks) reach the recipe when it runs in this process (a test's
    real subprocess sets TUNEPLAN_TEST_HOOKS instead: runner.hooks.from_env)."""
    from runner.hooks import from_env

    hooks = hooks or from_env()
    from runner.launch import (
        accelerate_config,
        build_command,
        format_command,
        is_distributed,
        uses_accelerate_config,
    )
    from runner.preflight import inputs, preflight

    plan, plan_path, run_dir, overrides = inputs(a)
    log = _stderr
    trust = plan.model.trust_remote_code  # consented with --trust-remote-code (preflight.inputs)
    if not a.worker:  # the run directory is checked again under its lock when the run starts
        plan = preflight(plan, plan_path, a.force, log, run_dir=run_dir, resume=bool(a.resume), here=not a.dry_run)
    if a.dry_run:
        cmd = build_command(None if a.resume else plan_path, run_dir, a.resume, overrides, a.force,
                            trust_remote_code=trust)
        print(format_command(cmd))
        if uses_accelerate_config(plan):
            import yaml

            print(f"\n# {run_dir / 'accelerate_config.yaml'} (written when the run starts)")
            print(yaml.safe_dump(accelerate_config(plan), sort_keys=False), end="")
        print(f"\n# run directory: {run_dir}")
        return 0
    if is_distributed(plan) and not a.worker:
        from runner.launch import launch_and_wait, write_accelerate_config

        run_dir.mkdir(parents=True, exist_ok=True)
        if uses_accelerate_config(plan):
            write_accelerate_config(plan, run_dir)
        from runner.exits import outcome_code

        cmd = build_command(None if a.resume else plan_path, run_dir, a.resume, overrides, True,
                            trust_remote_code=trust)
        log(f"launching: {format_command(cmd)}")
        events = run_dir / "events.jsonl"
        since = events.stat().st_size if events.is_file() else 0
        return outcome_code(run_dir, launch_and_wait(cmd, log), since)
    return run_in_process(plan, run_dir, resume=bool(a.resume), progress=not a.no_progress, hooks=hooks,
                          under_launcher=a.worker)


def run_in_process(plan, run_dir: Path, resume: bool = False, progress: bool = True,
                   command: list[str] | None = None, hooks=None, under_launcher: bool = False) -> int:
    """Run the recipe here with a progress bar; print the report (or the error) at the end.
    ``hooks``: runner.recipe.Hooks (tests). ``under_launcher``: one of several processes started by
    accelerate launch / torchrun; an outcome every process reaches together (interrupted, a mistake in
    the data or plan) exits 0 so the launcher prints no failure of its own: `tuneplan run` reads the
    outcome from the run directory (runner.launch.outcome_code)."""
    from runner.exits import EXIT_INTERRUPTED
    from runner.recipe import Recipe

    command = command or [sys.argv[0].rsplit("/", 1)[-1], *sys.argv[1:]]
    show = progress and not os.environ.get("TUNEPLAN_NO_PROGRESS") and sys.stderr.isatty()
    worker = int(os.environ.get("RANK", "0") or 0) == 0
    with _Progress(show and worker, plan) as bar:
        recipe = Recipe(plan, run_dir, resume=resume, command=command, progress=bar.update if worker else None,
                        log=bar.log, hooks=hooks)
        code = recipe.run()
    err = getattr(recipe, "error", None)
    # one machine: `tuneplan run` reads the outcome from the run directory. Several: every process keeps its
    # failure code (another node's tuneplan cannot see rank 0's events, and a node whose processes all
    # exit 0 waits at torchrun's exit barrier for the nodes that failed)
    together = plan.hardware.nodes == 1 and (
        code == EXIT_INTERRUPTED or (err is not None and err["kind"] in ("data", "plan")))
    if not worker:
        return 0 if under_launcher and together else code
    if err:
        _print_error(err, run_dir)
        if under_launcher and together:
            if err["kind"] != "interrupted":
                from runner.console import print_problems

                print_problems(err["message"].split("; "))
            return 0
        if err["kind"] in ("data", "model", "plan"):
            lines = err["message"].split("; ") if err["kind"] in ("data", "plan") else [err["message"]]
            nxt = err.get("next") if err["kind"] == "model" else None
            raise _user_error(lines + ([f"then: {nxt['what']}: {nxt['command']}"] if nxt else []))
        return code
    print_report(recipe.final_report)
    return 0 if under_launcher and together else code


# --- data check ----------------------------------------------------------------------------------

def cmd_data_check(a: argparse.Namespace) -> int:
    from runner.data import (
        DataError,
        length_stats,
        load_and_check,
        resolve_template,
        segments,
        tokenize,
    )

    _check_data_options(a)
    try:
        records, fmt, problems = load_and_check(a.file, a.format)
    except DataError as e:
        raise _user_error(e.problems) from None
    out: dict[str, Any] = {"file": a.file, "format": fmt, "valid_records": len(records), "problems": problems}
    tok = None
    if a.model:
        tok = _tokenizer(a.model)
    if records:
        try:
            template = resolve_template(fmt, a.template, tok)
        except DataError as e:
            raise _user_error(e.problems) from None
        out["template"] = template
        first = records[0]
        if tok is not None:
            exs = [tokenize(r, fmt, template, tok, a.seq, a.prompt_loss_weight) for r in records]
            out["tokens"] = length_stats([len(e.input_ids) + (1 if e.truncated else 0) for e in exs])
            out["trained_tokens"] = length_stats([e.trained_tokens for e in exs])
            out["truncated"] = sum(e.truncated for e in exs)
            out["no_trained_tokens"] = [e.line for e in exs if e.trained_tokens == 0]
            from runner.failfast import data_check_longest  # the longest example, uncut

            full = [tokenize(r, fmt, template, tok, 10**9, a.prompt_loss_weight) for r in records]
            out["longest"] = data_check_longest(full, a.seq)
            ex = exs[0]
            out["example"] = {"line": ex.line, "tokens": [
                {"id": i, "text": tok.decode([i]), "trained": lab != -100,
                 **({"weight": w} if ex.weights is not None else {})}
                for i, lab, w in zip(ex.input_ids, ex.labels, ex.weights or [None] * len(ex.input_ids), strict=False)]}
        else:
            out["characters"] = length_stats([sum(len(t) for t, _ in segments(r.data, fmt, template, None))
                                              for r in records])
            out["example"] = {"line": first.line, "segments": [
                {"text": t, "trained": tr} for t, tr in segments(first.data, fmt, template, None)]}
    if a.json:  # one object: the problems are its "problems" list, in the shape every --json gives them
        from advisor.problems import Problem

        out["problems"] = [{**Problem(p).as_json(), "flag": None} for p in problems]
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print_data_check(out)
    if problems:
        more = len(problems) - 20
        shown = problems[:20] + ([f"... and {more} more"] if more > 0 else [])
        if a.json:  # stdout holds them already: people still read them on stderr, and the exit code is 2
            _print_data_problems(shown)
            return 2  # the exit code of a user mistake (docs/cli.md)
        raise _user_error(shown)
    return 0


def _check_data_options(a: argparse.Namespace) -> None:
    """--seq and --prompt-loss-weight within the bounds the plan has for them (advisor.spec)."""
    from advisor.problems import Problem
    from advisor.spec import SpecError, build_plan

    flags = {"training.seq_len": "--seq", "data.prompt_loss_weight": "--prompt-loss-weight"}
    try:
        build_plan({"training": {"seq_len": a.seq}, "data": {"prompt_loss_weight": a.prompt_loss_weight}})
    except SpecError as e:
        found = [Problem(f"{flags[p.field]} ({p.field}): {p.message}") for p in e.items if p.field in flags]
        if found:
            raise _user_error(found) from None


def _tokenizer(ref: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(ref)
    except Exception as e:
        raise _user_error(f"cannot load a tokenizer from {ref}: {str(e).splitlines()[0] if str(e) else e}") from None


# --- demo ----------------------------------------------------------------------------------------

def cmd_demo(a: argparse.Namespace) -> int:
    import time

    from advisor.planfile import save_plan
    from runner.demo import DEMO_DATA, build_model_dir, demo_plan

    out = Path(a.out)
    t0 = time.time()
    model_dir = out / "model"
    if a.steps < 1:
        raise _user_error(f"--steps must be at least 1 (got {a.steps})")
    if out.exists() and not out.is_dir():
        raise _user_error(f"--out {out} is a file; give a folder (it is created if missing)")
    if (out / "plan.yaml").exists() and not (model_dir / "config.json").exists():
        raise _user_error(f"{out} holds a plan.yaml that is not a demo's; give --out a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _user_error(f"cannot use --out {out}: {e.strerror or e}; give a folder that can be created") from None
    if not (model_dir / "config.json").exists():
        _stderr(f"building a tiny Llama and a BPE tokenizer in {model_dir} (random weights, nothing downloaded)")
        build_model_dir(model_dir)
    plan = demo_plan(model_dir.resolve(), DEMO_DATA, (out / "runs").resolve(), max_steps=a.steps)
    run_dir = out / "runs" / "demo-run"
    if (run_dir / "events.jsonl").exists():
        plan = plan.model_copy(update={"run": plan.run.model_copy(update={"name": f"demo-run-{int(time.time())}"})})
        run_dir = out / "runs" / plan.run.name
    save_plan(plan, out / "plan.yaml")
    _stderr(f"plan: {out / 'plan.yaml'} (QLoRA r=16 on all linear layers, {a.steps} steps on the CPU)")
    code = run_in_process(plan, run_dir, progress=not a.no_progress,
                          command=["tuneplan", "run", str(out / "plan.yaml"), "--run-dir", str(run_dir)])
    _stderr(f"demo finished in {time.time() - t0:.1f} s; try: tuneplan data check {DEMO_DATA} --model {model_dir}")
    return code
