"""Throughput of a tuneplan run vs a plain transformers Trainer script with the same settings.

Same model (a small Llama, random weights, built locally), same tokenized data (runner.data, every
batch padded to seq_len so each step does identical work), LoRA r=16 on all linear layers, fp32,
AdamW, micro-batch 8 x 128 tokens, constant learning rate, no evaluation, no checkpoints. Three
variants, each run REPEATS times in alternating order, median reported:

* ``trainer``  -- transformers.Trainer (adamw_torch, the same collator), timed from its first to its
  last step by a callback;
* ``tuneplan`` -- runner.recipe.Recipe as `tuneplan run` runs it: memory monitor thread (0.5 s),
  events.jsonl written and flushed every step, memory sampled at every step;
* ``tuneplan-bare`` -- the same loop with the monitor and events off: the difference to
  ``tuneplan`` is the monitor + events overhead (target < 2%).

Throughput = steps x micro_batch x seq_len / loop seconds (padded tokens: identical work per step).

    .venv/bin/python benchmarks/bench_runner.py [--steps 60] [--repeats 3] [--json] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MB, SEQ, LR = 8, 128, 1e-3
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4)


def plan_for(model_dir: Path, out: Path, steps: int):
    from advisor.spec import build_plan
    from runner.demo import DEMO_DATA

    return build_plan({
        "model": {"ref": str(model_dir)},
        "training": {"method": "lora", "precision": "fp32", "optimizer": "adamw", "micro_batch": MB, "seq_len": SEQ,
                     "grad_accum": 1, "grad_checkpointing": False, "learning_rate": LR,
                     "lora": {"r": 16, "alpha": 16, "targets": "all-linear"}},
        "hardware": {"gpu": None, "device": "cpu"},
        "data": {"path": str(DEMO_DATA), "val_split": 0.0, "pad_to": "seq_len"},
        "run": {"output_dir": str(out), "max_steps": steps, "warmup_steps": 0, "lr_scheduler": "constant",
                "max_grad_norm": 1.0, "save_every": 10**6, "eval_every": 10**6, "seed": 0},
    })


def run_tuneplan(plan, run_dir: Path, instrument: bool) -> tuple[float, float]:
    from runner.recipe import Recipe

    r = Recipe(plan, run_dir, log=lambda m: None, instrument=instrument)
    assert r.run() == 0, getattr(r, "error", None)
    n = r.step * MB * SEQ
    return n / r.train_seconds, n / r.train_cpu_seconds


def run_trainer(plan, model_dir: Path, out: Path, steps: int) -> tuple[float, float]:
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from advisor.stack import load_for_training
    from runner.data import collate, prepare

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = prepare(plan.data, tok, SEQ, 0)
    model = load_for_training(model_dir, plan.training, "cpu")  # the same LoRA model as the runner's
    times: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not times:
                times.append((time.time(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            times[1:] = [(time.time(), time.process_time())]

    train = [{"input_ids": e.input_ids, "labels": e.labels} for e in data.train]

    def collator(rows):
        from runner.data import Example

        return collate([Example(r["input_ids"], r["labels"], None, 0) for r in rows], tok.pad_token_id, SEQ)

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=MB, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                             optim="adamw_torch", weight_decay=0.0, logging_steps=10**6, save_strategy="no",
                             eval_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                             remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
                      callbacks=[Clock()])
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its metrics dict; keep stdout for --json
        trainer.train()
    del torch
    # the clock runs from the first step's start to the last step's end (the runner's clock starts
    # at its loop's start, which also includes building the first batch: in the Trainer's favour)
    n = steps * MB * SEQ
    return n / (times[1][0] - times[0][0]), n / (times[1][1] - times[0][1])


def instrumentation_cost_us(n: int = 2000) -> float:
    """Microseconds the runner spends per step on instrumentation: one memory sample and one
    flushed step event (what `tuneplan` does and `tuneplan-bare` does not)."""
    from runner.events import EventWriter
    from runner.monitor import MemoryMonitor

    mon = MemoryMonitor(10.0)
    with tempfile.TemporaryDirectory() as tmp, EventWriter(tmp) as ev:
        t0 = time.perf_counter()
        for i in range(n):
            m = mon.read()
            ev.emit("step", step=i, epoch=0.1, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=1.0, elapsed_s=1.0,
                    eta_s=1.0, memory=m, total_steps=n, tokens=1024)
        return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", help="also write the JSON result to this file")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)

    from runner.demo import DEMO_DATA, build_model_dir

    results: dict[str, list[float]] = {"trainer": [], "tuneplan": [], "tuneplan-bare": []}
    cpu: dict[str, list[float]] = {k: [] for k in results}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(tmp / "model", DEMO_DATA, **MODEL)
        plan = plan_for(model_dir, tmp / "runs", a.steps)
        run_tuneplan(plan, tmp / "warmup", True)  # imports, caches
        for rep in range(a.repeats):
            order = ["trainer", "tuneplan", "tuneplan-bare"]
            order = order[rep % 3:] + order[:rep % 3]
            for name in order:
                d = tmp / f"{name}-{rep}"
                if name == "trainer":
                    tps, ctps = run_trainer(plan, model_dir, d, a.steps)
                else:
                    tps, ctps = run_tuneplan(plan, d, name == "tuneplan")
                results[name].append(round(tps, 1))
                cpu[name].append(round(ctps, 1))
                print(f"  {name:14s} run {rep + 1}: {tps:,.0f} tokens/s wall, {ctps:,.0f} per CPU-second",
                      file=sys.stderr)
    med = {k: statistics.median(v) for k, v in results.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    out = {"settings": {"model": MODEL, "micro_batch": MB, "seq_len": SEQ, "steps": a.steps, "repeats": a.repeats,
                        "method": "lora r=16 all-linear", "precision": "fp32", "torch_threads": torch.get_num_threads(),
                        "cpus": os.cpu_count()},
           "tokens_per_s": {k: round(v, 1) for k, v in med.items()}, "runs": results,
           "tokens_per_cpu_s": {k: round(v, 1) for k, v in cmed.items()}, "runs_cpu": cpu,
           "tuneplan_vs_trainer": round(med["tuneplan"] / med["trainer"] - 1, 4),
           "monitor_events_overhead": round(1 - med["tuneplan"] / med["tuneplan-bare"], 4),
           "tuneplan_vs_trainer_cpu": round(cmed["tuneplan"] / cmed["trainer"] - 1, 4),
           "monitor_events_overhead_cpu": round(1 - cmed["tuneplan"] / cmed["tuneplan-bare"], 4)}
    step_s = MB * SEQ / med["tuneplan-bare"]
    cost = instrumentation_cost_us()
    out["instrumentation_us_per_step"] = round(cost, 1)
    out["step_ms"] = round(step_s * 1e3, 1)
    out["instrumentation_share"] = round(cost / 1e6 / step_s, 5)
    if a.save:
        Path(a.save).write_text(json.dumps(out, indent=2) + "\n")
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in med.items():
            print(f"{k:14s} {v:10,.0f} tokens/s wall, {cmed[k]:10,.0f} per CPU-second (median of {a.repeats})")
        print(f"wall: tuneplan vs Trainer {out['tuneplan_vs_trainer']:+.1%}, monitor + events overhead "
              f"{out['monitor_events_overhead']:+.1%} (target < 2%)")
        print(f"instrumentation per step (memory sample + flushed event): {cost:.0f} µs of a "
              f"{step_s * 1e3:.0f} ms step = {cost / 1e6 / step_s:.3%}")
        print(f"CPU time: tuneplan vs Trainer {out['tuneplan_vs_trainer_cpu']:+.1%}, monitor + events overhead "
              f"{out['monitor_events_overhead_cpu']:+.1%}")


if __name__ == "__main__":
    main()
