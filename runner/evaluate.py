"""`tuneplan eval RUN_DIR`: the tuned model against its base on held-out data, written to RUN_DIR/eval.json.

The data is the run's own validation split, made again exactly as the runner made it
(:func:`runner.data.prepare` with the plan's data settings, seq_len and seed: the same examples, the
same tokens, the same loss mask), or every example of ``--data FILE`` (records of the run's format).
The loss is the runner's validation loss: :func:`advisor.stack.eval_loss` (the training mask and
prompt-loss weights) over batches of ``training.micro_batch`` padded as the run padded them, averaged
over batches -- so the tuned model's number on the default split is the run's final validation loss.
Perplexity is ``exp(loss)``. A few held-out prompts are answered by both models (greedy) beside the
reference answer.

eval.json and the ``eval`` key of report.json are replaced atomically (a new file beside them, then
``os.replace``), never written through a symbolic link.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advisor.problems import UserError
from runner.chat import Sampling, generate_stream
from runner.tuned import Models, TunedRun

EVAL_FILE = "eval.json"


# --- the data ---------------------------------------------------------------------------------

def eval_data(run: TunedRun, tokenizer, data_path: str | None = None, *, packed: bool | None = None):
    """(examples, description) to evaluate on: the run's validation split, or every example of ``data_path``.
    ``packed=False`` gives the examples unpacked (for prompts) even when the run packed its data."""
    from runner.data import DataError, prepare

    plan = run.plan
    spec = plan.data
    if packed is False:
        spec = spec.model_copy(update={"packing": False})
    if data_path is None:
        check_data_file(run, None)
        where = (f"the run's validation split of {spec.path} (data.val_split {spec.val_split:g}, "
                 f"seed {plan.run.seed}, as the runner split it)")
    else:
        check_data_file(run, data_path)
        spec = spec.model_copy(update={"path": str(data_path), "val_split": 0.0, "max_examples": None,
                                       "format": run.data_format or spec.format})
        where = f"every example of {data_path}"
    try:
        prepared = prepare(spec, tokenizer, plan.training.seq_len, plan.run.seed)
    except DataError as e:
        raise UserError(e.problems[0] if len(e.problems) == 1 else
                        f"{e.problems[0]} (and {len(e.problems) - 1} more problems: tuneplan data check "
                        f"{spec.path})") from None
    examples = prepared.val if data_path is None else sorted(prepared.train, key=lambda e: e.line)
    if not examples:
        raise UserError(f"no example to evaluate in {spec.path}")
    return examples, where


def check_data_file(run: TunedRun, data_path: str | None) -> None:
    """UserError, before anything is loaded, when the data cannot be evaluated: a file that is gone, records
    of another shape than the run trained on, no validation split."""
    from runner.data import DataError, load_and_check

    spec = run.plan.data
    if data_path is None:
        if not spec.path:
            raise UserError(f"{run.run_dir / 'plan.yaml'} names no data file (data.path); pass --data FILE")
        if not Path(spec.path).is_file():
            raise UserError(f"the run's data file {spec.path} is gone, so its validation split cannot be made "
                            "again; pass --data FILE with held-out examples")
        if spec.val_split <= 0:
            raise UserError("the run held out no validation data (data.val_split: 0); pass --data FILE with "
                            "held-out examples")
        return
    try:
        _, fmt, problems = load_and_check(data_path, "auto")
    except DataError as e:
        raise UserError(e.problems[0]) from None
    if run.data_format and fmt and fmt != run.data_format:
        raise UserError(f"{data_path} holds {_FORMAT_WORDS.get(fmt, fmt)} records but this run trained on "
                        f"{_FORMAT_WORDS.get(run.data_format, run.data_format)} records; give data of that shape")
    if problems:
        more = f" (and {len(problems) - 1} more: tuneplan data check {data_path})" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)


_FORMAT_WORDS = {"alpaca": "alpaca (instruction/input/output)", "qa": "question/answer",
                 "prompt_completion": "prompt/completion", "text": "text", "messages": "chat (messages)"}


# --- the loss ---------------------------------------------------------------------------------

def mean_loss(models: Models, examples: list, which: str) -> float:
    """The runner's validation loss (runner.recipe.Recipe.evaluate) of ``which`` on ``examples``."""
    from advisor.stack import eval_loss
    from runner.data import collate

    plan = models.run.plan
    mb = plan.training.micro_batch
    pad_to = plan.training.seq_len if plan.data.pad_to == "seq_len" else None
    total, n = 0.0, 0
    with models.use(which) as model:
        for i in range(0, len(examples), mb):
            b = collate(examples[i:i + mb], models.tokenizer.pad_token_id, pad_to)
            b = {k: v.to(models.device) for k, v in b.items()}
            total += float(eval_loss(model, b, plan.training.precision))
            n += 1
    return total / max(n, 1)


def split_example(ex) -> tuple[list[int], list[int]]:
    """(prompt ids, reference response ids) of a tokenized example: the last trained stretch is the response."""
    labels = ex.labels
    end = len(labels)
    while end > 0 and labels[end - 1] == -100:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    if start == 0:  # text data: every token trained; continue its first half
        start = max(1, len(ex.input_ids) // 2)
    return ex.input_ids[:start], ex.input_ids[start:end]


# --- the whole evaluation ---------------------------------------------------------------------

def evaluate(models: Models, *, data_path: str | None = None, samples: int = 3, sampling: Sampling | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Loss and perplexity of base and tuned on the held-out data, and ``samples`` prompts answered by both."""
    run = models.run
    tok = models.tokenizer
    say = progress or (lambda msg: None)
    sampling = sampling or Sampling(max_new_tokens=64)
    t0 = time.time()
    examples, where = eval_data(run, tok, data_path)
    scored = sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
    result: dict[str, Any] = {"run_dir": str(run.run_dir.resolve()), "weights": run.label, "method": run.method,
                              "data": {"what": where, "examples": len(examples), "scored_tokens": scored,
                                       "format": run.data_format, "template": run.resolved_template(tok)},
                              "device": models.device}
    for which in ("base", "tuned"):
        say(f"{which}: loss on {len(examples)} examples")
        loss = mean_loss(models, examples, which)
        result[which] = {"loss": round(loss, 6), "perplexity": _ppl(loss)}
    b, t = result["base"]["loss"], result["tuned"]["loss"]
    result["change"] = {"loss": round(t - b, 6), "perplexity_ratio": round(math.exp(t - b), 4)}
    final_val = (run.report.get("loss") or {}).get("final_val")
    if data_path is None and run.label in ("adapter/", "model/") and final_val is not None:
        result["run_final_val_loss"] = final_val  # the same number, measured by the runner at its last step
    shown = samples_from(run, tok, data_path, examples, samples)
    result["samples"] = []
    for i, ex in enumerate(shown, 1):
        say(f"sample {i}/{len(shown)}")
        prompt, ref = split_example(ex)
        row = {"line": ex.line, "prompt": tok.decode(prompt, skip_special_tokens=True),
               "reference": tok.decode(ref, skip_special_tokens=True).strip()}
        for which in ("base", "tuned"):
            row[which] = "".join(generate_stream(models, prompt, which, sampling)).strip()
        result["samples"].append(row)
    result["sampling"] = {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                          "top_p": sampling.top_p, "seed": sampling.seed}
    result["seconds"] = round(time.time() - t0, 2)
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def samples_from(run: TunedRun, tok, data_path: str | None, examples: list, n: int) -> list:
    """The first ``n`` held-out examples, unpacked (a packed sequence holds several prompts)."""
    if n <= 0:
        return []
    if run.plan.data.packing:
        examples, _ = eval_data(run, tok, data_path, packed=False)
    return examples[:n]


def _ppl(loss: float) -> float | None:
    try:
        return round(math.exp(loss), 4)
    except OverflowError:
        return None


# --- writing ----------------------------------------------------------------------------------

def write_json_nofollow(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON, never through a link (advisor.safefile.write_atomic);
    a symbolic link at ``path`` is refused, as the run directory's checks refuse one."""
    from advisor.safefile import write_atomic

    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link; tuneplan writes no file through a link (remove it and "
                        "run again)")
    try:
        write_atomic(path, json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def read_json_nofollow(path: Path) -> Any:
    """The JSON in ``path`` (None when it does not exist); a symbolic link is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link; tuneplan reads and writes no run file through a link "
                            "(remove it)") from None
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not valid JSON; it was changed by hand or damaged") from None


def check_writable(run: TunedRun) -> None:
    """UserError, before the work, when eval.json / report.json must not be written: a run holds the
    directory's lock (it writes report.json itself), or either name is a symbolic link."""
    from runner.rundir import holder

    owner = holder(run.run_dir)
    if owner is not None:
        raise UserError(f"a run is writing {run.run_dir} (PID {owner.get('pid', '?')}); evaluate it when it has "
                        "ended")
    for name in (EVAL_FILE, "report.json"):
        if (run.run_dir / name).is_symlink():
            raise UserError(f"{run.run_dir / name} is a symbolic link; tuneplan writes no file through a link "
                            "(remove it and run again)")


def save(run: TunedRun, result: dict[str, Any]) -> tuple[Path, bool]:
    """RUN_DIR/eval.json, and a summary under report.json's ``eval`` key; (eval.json, report updated)."""
    check_writable(run)
    out = run.run_dir / EVAL_FILE
    write_json_nofollow(out, result)
    rep_path = run.run_dir / "report.json"
    rep = read_json_nofollow(rep_path)
    if not isinstance(rep, dict):
        return out, False
    rep["eval"] = {"file": EVAL_FILE, "weights": result["weights"], "data": result["data"]["what"],
                   "examples": result["data"]["examples"], "base": result["base"], "tuned": result["tuned"],
                   "change": result["change"], "time": result["time"]}
    write_json_nofollow(rep_path, rep)
    return out, True
