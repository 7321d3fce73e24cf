"""The runner's commands on the command line: `tuneplan run`, `data check`, `demo`, `cloud`, `chat`, `eval`
and `export`. Their flags live here, beside the advisor's; their work is the runner's, reached only through
:mod:`runner.api` (the CLI imports no other runner module). Light at import time.
"""

from __future__ import annotations

import argparse

from advisor.spec import DATA_FORMATS, INFER_PRECISIONS, TEMPLATES


def _runner(name: str):
    """A runner command by name, called with the parsed arguments (runner.api imported when it runs)."""
    def call(a: argparse.Namespace) -> int:
        from runner import api

        return getattr(api, name)(a)

    return call


def add_commands(sub) -> None:
    """Add run, data check, demo, cloud, chat, eval and export to the `tuneplan` subcommands."""
    r = sub.add_parser("run", help="fine-tune for real: tuneplan run PLAN.yaml [key=value ...]",
                       description="Run the plan's fine-tune; key=value overrides any plan field "
                       "(training.micro_batch=2). Writes RUN_DIR/plan.yaml, events.jsonl, report.json, "
                       "checkpoints/ and adapter/.")
    add_run_arguments(r)
    r.set_defaults(func=_runner("cmd_run"))

    d = sub.add_parser("data", help="check a training data file")
    dsub = d.add_subparsers(dest="data_command")
    c = dsub.add_parser("check", help="schema problems with line numbers, counts, token lengths, a masked example")
    c.add_argument("file", help=".jsonl, .json or .csv")
    c.add_argument("--model", help="model directory or hub id whose tokenizer counts the tokens")
    c.add_argument("--format", default="auto", choices=DATA_FORMATS)
    c.add_argument("--template", default="auto", choices=TEMPLATES)
    c.add_argument("--seq", type=int, default=2048, help="truncation length (training.seq_len)")
    c.add_argument("--prompt-loss-weight", type=float, default=0.0)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_runner("cmd_data_check"))
    d.set_defaults(func=lambda a: (d.print_help(), 0)[1])

    m = sub.add_parser("demo", help="a real QLoRA fine-tune of a tiny model on the CPU (about a minute)")
    m.add_argument("--out", default="tuneplan-demo",
                   help="folder for the model, plan and run (default ./tuneplan-demo)")
    m.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=_runner("cmd_demo"))

    add_cloud_command(sub)
    add_after_commands(sub)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", nargs="?", help="plan.yaml (as saved by the TUI or `tuneplan recommend`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.micro_batch=2 run.max_steps=100")
    p.add_argument("--run-dir", help="the run directory (default: run.output_dir/run.name)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest checkpoint (from step 0 when it has none yet)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command (and accelerate config) and exit; needs no GPU here")
    p.add_argument("--force", action="store_true", help="run even when the advisor says the plan does not fit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (lines on stderr instead)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="consent to run the model repository's own Python code (a plan's "
                   "model.trust_remote_code: true is refused without it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process under accelerate launch


def add_cloud_command(sub) -> None:
    """`tuneplan cloud PLAN [--target sky|slurm] [-o FILE]`."""
    c = sub.add_parser("cloud", help="rent the plan's GPUs: a SkyPilot task or a Slurm script for it",
                       description="Write a SkyPilot task (--target sky) or a Slurm sbatch script "
                       "(--target slurm) that runs the plan with `tuneplan run` on every node. Launches "
                       "nothing; prints the command that would.")
    c.add_argument("plan", help="plan.yaml")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. hardware.gpus=16")
    c.add_argument("--target", choices=["sky", "slurm"], default="sky", help="sky (default) or slurm")
    c.add_argument("-o", "--output", help="file to write (default: PLAN's name + .sky.yaml or .sbatch; - prints)")
    c.add_argument("--bucket", help="sky: the bucket mounted at /tuneplan-runs for the run directory (shared by "
                   "every node, kept after the cluster is gone; default with several nodes: tuneplan-RUN-runs)")
    c.add_argument("--partition", help="slurm: the partition (#SBATCH --partition)")
    c.add_argument("--time", help="slurm: the time limit (#SBATCH --time, e.g. 12:00:00)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="consent to the model repository's own Python code (a plan's model.trust_remote_code: "
                   "true is refused without it)")
    c.set_defaults(func=_runner("cmd_cloud"))


def add_after_commands(sub) -> None:
    """chat, eval and export: what to do with a run's model once it has trained (docs/after-the-run.md)."""
    c = sub.add_parser("chat", help="talk to a run's tuned model (--compare: the base beside it)",
                       description="Load the run's base model and adapter as the runner trained them and "
                       "answer with the prompt template the data used. Without --prompt, reads lines from "
                       "stdin until EOF or 'exit' ('/reset' forgets the conversation).")
    _add_common(c)
    c.add_argument("--prompt", help="answer this once and exit")
    c.add_argument("--compare", action="store_true", help="answer with the base model too, same prompt and sampling")
    c.add_argument("--system", help="a system message (chat data only)")
    c.add_argument("--merged", action="store_true", help="load merged/ (run.merge_export) instead of the adapter")
    _add_sampling(c, 128)
    c.set_defaults(func=_runner("cmd_chat"))

    e = sub.add_parser("eval", help="loss and perplexity of the tuned model against its base, and samples",
                       description="Loss and perplexity (with the training mask) of the base and the tuned "
                       "model on the run's validation split, made again exactly as the runner made it, or on "
                       "--data FILE; a few held-out prompts answered by both. Writes RUN_DIR/eval.json and "
                       "an 'eval' key in report.json.")
    _add_common(e)
    e.add_argument("--data", metavar="FILE",
                   help="held-out records of the run's format (default: its validation split)")
    e.add_argument("--samples", type=int, default=3, help="held-out prompts answered by both models (default 3)")
    e.add_argument("--json", action="store_true", help="print eval.json's object")
    _add_sampling(e, 64)
    e.set_defaults(func=_runner("cmd_eval"))

    x = sub.add_parser("export", help="write the merged model (and a 4-bit copy) as a standalone folder",
                       description="Reload the base in --dtype, merge the run's adapter, and write it with "
                       "the tokenizer and the chat template the run trained with. Checks RAM and disk first.")
    x.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (`tuneplan run` printed it)")
    x.add_argument("--out", metavar="DIR", help="a new or empty folder (default: RUN_DIR-export beside the run)")
    x.add_argument("--dtype", choices=INFER_PRECISIONS, help="weights dtype (default: the run's compute dtype)")
    x.add_argument("--4bit", dest="nf4", action="store_true",
                   help="also write DIR-nf4: the merged model quantized by bitsandbytes (NF4)")
    x.add_argument("--check", action="store_true", help="print what it needs (RAM, disk, time) and exit")
    x.add_argument("--checkpoint", metavar="step-N", help="export checkpoints/step-N instead of the final weights")
    x.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code (only when the plan needs it)")
    x.set_defaults(func=_runner("cmd_export"))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (`tuneplan run` printed it)")
    p.add_argument("--checkpoint", metavar="step-N", help="use checkpoints/step-N instead of the final weights")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the GPU when the run trained on one and one is here, else the CPU")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code (only when the plan needs it)")


def _add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"reply length limit (default {max_new})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with a temperature (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same for base and tuned)")
