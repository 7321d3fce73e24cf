"""What every `tuneplan` command shares: plan flags, override parsing and how problems are printed.

Problems arrive typed (:class:`advisor.problems.Problem`); here they get the flag names a CLI user
types (``--batch (training.micro_batch): ...``), one per line on stderr, exit code 2; with
``--json`` they are one object ``{"problems": [...]}`` on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from advisor.problems import Change, Problem, Problems, problem_text
from advisor.spec import field_table

EXIT_USER_ERROR = 2

# plan field -> the flag that sets it: the plan schema's own metadata (advisor.spec.field_table), plus the
# questions that are no plan field (recommend's GPU count and methods, --save, --max, the guide's answers)
FLAGS = {path: meta["flag"] for path, meta in field_table().items() if meta.get("flag")} | {
    "job.gpus": "--gpus", "job.methods": "--methods", "job.save": "--save", "max": "--max",
    "guide.labelled_examples": "--examples", "guide.gap": "--gap",
} | {f"serving.{k}": f"--{k.replace('_', '-')}" for k in (  # the serving questions (advisor/cli/serving.py)
    "engine", "gpu_memory_utilization", "max_model_len", "tensor_parallel", "kv_cache_dtype", "max_num_seqs",
    "max_lora_rank", "max_loras", "context", "concurrency", "weights")}
# problems whose message already names the thing (no 'field:' prefix needed)
_SELF_EXPLAINED = ("model.ref", "hardware.gpu")
# fields that are the user's question more than the plan's: shown with the flag alone
_JOB_FIELDS = ("job.", "guide.", "run.epochs", "serving.")


# what `tuneplan estimate` needs to reproduce a training plan on its card (plan_command)
_COMMAND_FIELDS = ("hardware.gpu", "hardware.gpus", "hardware.zero", "training.method", "training.precision",
                   "training.optimizer", "training.micro_batch", "training.seq_len", "training.grad_accum",
                   "training.grad_checkpointing", "training.lora.r", "training.lora.alpha", "training.lora.targets",
                   "training.transformers", "training.offload_activations", "training.liger", "job.examples",
                   "job.avg_tokens", "run.epochs")


def plan_command(plan, command: str = "estimate") -> list[str]:
    """`tuneplan estimate MODEL --flag value ...` that reproduces a training plan (its model, card and every
    setting of the step that differs from the plan's defaults), as an argument list."""
    from advisor.spec import Plan

    data, default = plan.model_dump(mode="json"), Plan().model_dump(mode="json")

    def get(d, path):
        for part in path.split("."):
            d = d[part]
        return d

    words = ["tuneplan", command, plan.model.ref]
    for path in _COMMAND_FIELDS:
        v = get(data, path)
        if path not in ("hardware.gpu", "training.seq_len", "training.method") and v == get(default, path):
            continue
        flag = FLAGS[path]
        if isinstance(v, bool):
            words.append(flag if v else flag.replace("--", "--no-", 1))
        else:
            words += [flag, ",".join(v) if isinstance(v, list) else str(v)]
    return words


def say_change(c: Change) -> str:
    """A fix as the CLI words it: the flag that sets the field ('use --seq 1024 or less'), or the
    key=value override (`tuneplan run PLAN key=value`, `estimate --plan PLAN key=value`)."""
    flag = FLAGS.get(c.field)
    return "use " + (c.words(flag) if flag else c.words(c.field, "="))


def render(p: Problem) -> str:
    """One problem as the CLI shows it: with the flag name where a flag sets the field."""
    message = p.worded(say_change)
    if p.field is None or p.field in _SELF_EXPLAINED:
        return message
    if p.field.startswith(_JOB_FIELDS) and p.field in FLAGS:  # the flag alone
        return f"{FLAGS[p.field]} {message}" if p.what.startswith("must") else f"{FLAGS[p.field]}: {message}"
    if p.field in FLAGS:
        return f"{FLAGS[p.field]} ({p.field}): {message}"
    return f"{p.field}: {message}"


def report_problems(e: Problems, as_json: bool = False) -> int:
    """Every problem on its own line on stderr (or one JSON object on stdout); the exit code."""
    if as_json:  # the machine-readable list on stdout; people still read stderr
        print(json.dumps({"problems": [{**p.as_json(), "message": p.worded(say_change),
                                        "flag": FLAGS.get(p.field or "")}
                                       for p in e.items]},
                         indent=2))
    print(problem_text([render(p) for p in e.items]), file=sys.stderr)
    return EXIT_USER_ERROR


report_user_error = report_problems  # the runner's name for it


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse stops collecting `key=value` positionals at the first option (`PLAN --run-dir D k=v`);
    gather the ones after it too, and refuse anything else it did not know."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


MODEL_HELP = "bundled profile, local config.json or model dir, or hub id"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, as ``--model REF`` (the CLI contract) or as the first word after the command."""
    p.add_argument("model_ref", nargs="?", metavar="MODEL", help=f"the model ({MODEL_HELP}); same as --model")
    p.add_argument("--model", help=MODEL_HELP)


def take_model(a: argparse.Namespace) -> None:
    """``a.model`` from ``--model`` or the positional MODEL; both, and different, is a mistake."""
    pos = getattr(a, "model_ref", None)
    if pos and a.model and pos != a.model:
        raise Problems(Problem(f"two models given: {pos} and --model {a.model}", "model.ref",
                               "give the model once, as the first word or with --model"))
    a.model = a.model or pos


def put(d: dict[str, Any], key: str, val: Any) -> None:
    if val is not None:
        d[key] = val
