"""Liger kernels (``training.liger``) against Liger-Kernel's published HF Trainer runs, with and without Liger.

    python benchmarks/liger_memory.py [--write docs/accuracy.md]

Rows: ``benchmarks/data/liger_runs.csv``, the baseline (``use_liger_False``) and pre-init (``use_liger_True_
patching_type_pre_init``) logs of Liger-Kernel's HF Trainer example (each row's source: file and commit; liger-kernel
0.2.1, transformers 4.43.3, FSDP full shard on 4 x A100 80GB, rank 0's ``max_memory_allocated`` from step 3 on).
Which rows calibrate was fixed before anything was computed (docs/accuracy.md, "Liger kernels"): Llama-3-8B (batch 32
and 48) and Mistral-7B calibrate; gemma-7b, Qwen2-7B, gemma-2-2b and Phi-3.5-mini validate. Nothing is fitted: the
Liger terms are counted from Liger-Kernel's source (advisor/liger.py, LOSS_BYTES["liger"]); the calibration rows are
where they are checked first.

Each row is planned as benchmarks/data/harness_memory.csv plans the baselines (full, mixed-bf16, AdamW, FSDP full
shard as ZeRO-3, checkpointing, sdpa, transformers 4.46's rules, padded batches), with ``training.liger`` as logged.
Two sequence lengths: 512, the longest batch the data loader can form (SFTTrainer's max_seq_length: tuneplan's
expected peak), and ``logged_len``, the longest logged step's padded length (the step's tokens over its 4 ranks'
sequences, rounded up to 16; rank 0's own batch may be longer or shorter). The "step floor" is tuneplan's
optimizer-step moment, which does not depend on the length.

Time: the measured gain is the with-Liger run's tokens per second over its baseline's (all 4 GPUs, padding
included; the runs drew different samples: the split had no seed), the predicted one the step-time model's
(advisor.throughput) with and without Liger at the baseline run's mean padded length (tokens seen over steps x
global batch).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docblock import write_between  # noqa: E402

from advisor.units import MIB  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "liger_runs.csv"
BLOCK = "liger"
# pairs whose with-Liger run is not what tuneplan models: shown, left out of the summary
NOT_MODELLED = {
    "gemma2-b32": "liger-kernel 0.2.1 patched gemma-2 with its plain cross-entropy (apply_liger_kernel_to_gemma2("
                  "cross_entropy=True), no fused linear cross-entropy: src/liger_kernel/transformers/monkey_patch.py "
                  "@ 4581599f): the logits were materialized",
}


def csv_rows(path: Path = DATA) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plan_data(row: dict, seq: int) -> dict:
    t = {"method": "full", "precision": "mixed-bf16", "optimizer": "adamw", "micro_batch": int(row["micro_batch"]),
         "seq_len": seq, "grad_checkpointing": True, "attn_impl": "sdpa", "transformers": "4.46",
         "harness": "hf-trainer", "liger": row["liger"] == "true"}
    hw = {"gpu": "a100-80gb-sxm", "gpus": int(row["gpus"]), "zero": 3, "device": "cuda"}
    return {"model": {"ref": row["profile"]}, "training": t, "hardware": hw, "data": {"padded": True}}


def mean_len(row: dict) -> int:
    return max(16, round(int(row["tokens_seen"]) / (int(row["steps"]) * int(row["global_batch"]))))


def predict(rows: list[dict]) -> list[dict]:
    from advisor import service, throughput
    from advisor.memory import training_phases

    gpu = service.find_gpu("a100-80gb-sxm")
    out = []
    for row in rows:
        r = dict(row)
        for key, seq in (("max", int(row["seq_len"])), ("logged", int(row["logged_len"]))):
            ctx = service.build(plan_data(row, seq))
            bd = service.estimate(ctx).breakdown
            r[f"pred_{key}"] = bd.peak_allocated_bytes
            r[f"moment_{key}"] = bd.peak_phase
            if key == "max":
                phases = training_phases(ctx.shape, ctx.plan.training, ctx.plan.hardware, True)
                r["floor"] = sum(phases["optimizer_step"].values())
        # the time model with and without Liger at the pair's baseline length (the runs drew different samples)
        base = next(b for b in rows if b["pair"] == row["pair"] and b["liger"] == "false")
        ctx = service.build(plan_data(row, mean_len(base)))
        r["step_s"] = throughput.step_time(ctx.plan, ctx.shape, gpu).step_s
        r["measured"] = float(row["allocated_mib"]) * MIB
        r["modelled"] = row["pair"] not in NOT_MODELLED
        out.append(r)
    return out


def pairs(predicted: list[dict]) -> list[dict]:
    """Per pair: the measured and predicted saving (baseline - Liger) and tokens/s gain."""
    by: dict[str, dict] = {}
    for r in predicted:
        by.setdefault(r["pair"], {})["liger" if r["liger"] == "true" else "base"] = r
    out = []
    for name, p in by.items():
        b, li = p["base"], p["liger"]
        out.append({"pair": name, "role": b["role"], "model": b["model"], "modelled": b["modelled"],
                    "saved": b["measured"] - li["measured"], "saved_max": b["pred_max"] - li["pred_max"],
                    "saved_logged": b["pred_logged"] - li["pred_logged"],
                    "gain": float(li["tokens_per_s"]) / float(b["tokens_per_s"]),
                    "gain_pred": b["step_s"] / li["step_s"]})
    return out


def _mib(b: float) -> str:
    return f"{b / MIB:,.0f}"


def _pct(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f}%"


def markdown(predicted: list[dict]) -> str:
    lines = ["Peak allocated per GPU (rank 0, MiB): published, and tuneplan's at 512 tokens (the longest batch the "
             "loader can form: the expected peak) and at the longest logged step's padded length; the step floor is "
             "tuneplan's optimizer-step moment.", "",
             "| row | role | Liger | published | tuneplan @ 512 | moment | tuneplan @ logged len | step floor |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for r in predicted:
        role = r["role"] if r["modelled"] else f"{r['role']} (not modelled)"
        lines.append(f"| {r['model']} b{r['micro_batch']} ({r['pair']}) | {role} | {r['liger']} | "
                     f"{_mib(r['measured'])} | {_mib(r['pred_max'])} ({_pct(r['pred_max'], r['measured'])}) | "
                     f"{r['moment_max'].replace('_', ' ')} | {_mib(r['pred_logged'])} @ {r['logged_len']} "
                     f"({_pct(r['pred_logged'], r['measured'])}) | {_mib(r['floor'])} "
                     f"({_pct(r['floor'], r['measured'])}) |")
    lines += ["", "What Liger saved (baseline - Liger, MiB) and its speed gain (tokens/s with Liger over without):", "",
              "| pair | role | saved, published | saved, tuneplan @ 512 | saved, tuneplan @ logged len | "
              "gain, published | gain, time model |", "|---|---|---:|---:|---:|---:|---:|"]
    for p in pairs(predicted):
        role = p["role"] if p["modelled"] else f"{p['role']} (not modelled)"
        lines.append(f"| {p['model']} ({p['pair']}) | {role} | {_mib(p['saved'])} | {_mib(p['saved_max'])} | "
                     f"{_mib(p['saved_logged'])} | {p['gain']:.2f}x | {p['gain_pred']:.2f}x |")
    notes = [f"- {k}: {v}." for k, v in NOT_MODELLED.items()]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", help="rewrite the <!-- liger --> block of this markdown file")
    a = ap.parse_args(argv)
    md = markdown(predict(csv_rows()))
    print(md)
    if a.write:
        write_between(a.write, BLOCK, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
