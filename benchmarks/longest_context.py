"""Validation only: the longest context that fits, on cards from 8 to 80 GB, against published runs.

    python benchmarks/longest_context.py [--write docs/accuracy.md]

Source: Unsloth's context-length benchmarks, column "Hugging Face + FA2" (the plain stack: transformers +
peft + bitsandbytes with flash-attention 2, no Unsloth kernels), for Llama 3.1 8B Instruct and the 70B
(Llama 3.1 70B in July 2024, Llama 3.3 70B in December 2024: the same architecture, the bundled
meta-llama/Llama-3.1-70B profile). Settings as stated there: 4-bit QLoRA on all linear layers
(q, k, v, o, gate, up, down), rank 32, batch 1, every sequence padded to the length. Not stated, taken
from Unsloth's notebooks that the comparison ran in: LoRA alpha 16, dropout 0, AdamW 8-bit, gradient
checkpointing on, bf16, and "GB" as GiB (the notebooks print ``max_memory_reserved() / 1024**3``).
- December 2024: https://unsloth.ai/blog/llama3-3 (10 Dec 2024), the same table in the
  unslothai/unsloth README ("Context length benchmarks").
- July 2024: https://unsloth.ai/blog/llama3-1.

These rows were never used to fit anything. Each card is an A100's profile with its memory set to the
row's size (the Ampere context, as the runs on an A100 / L4 had), estimated through the service
(advisor.service, analytic mode): at the published length, the expected nvidia-smi peak as a share of
the card (the issue's goal: 92-105%) and the verdict; and tuneplan's own answer to "the longest
context that fits" (advisor.limits.max_seq: `value`, the expected peak with the allocator's cache on
the card; `launchable_value`, the last the verdict still calls launchable when only the cache is over)
against the published length. An "OOM" row: even a short context did not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advisor.units import GIB  # noqa: E402
from benchmarks.docblock import write_between  # noqa: E402

BASE_GPU = "a100-80gb"
L8, L70 = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B"
DEC, JUL = "Dec 2024", "Jul 2024"
# (source, profile, card GiB, published longest context with HF + FA2; None: out of memory)
PUBLISHED = (
    (DEC, L8, 8, None), (DEC, L8, 12, 932), (DEC, L8, 16, 2551), (DEC, L8, 24, 5789),
    (DEC, L8, 40, 12264), (DEC, L8, 48, 15502), (DEC, L8, 80, 28454),
    (DEC, L70, 48, None), (DEC, L70, 80, 6916),
    (JUL, L8, 8, None), (JUL, L8, 12, 1044), (JUL, L8, 16, 2663), (JUL, L8, 24, 5901),
    (JUL, L8, 40, 12377), (JUL, L8, 48, 15615), (JUL, L8, 80, 28567),
    (JUL, L70, 48, None), (JUL, L70, 80, 7433),
)
SHORT = 256  # the context an OOM row is checked at


def plan_data(profile: str, seq: int) -> dict:
    t = {"method": "qlora", "precision": "bf16", "optimizer": "adamw_8bit", "micro_batch": 1, "seq_len": seq,
         "grad_accum": 1, "grad_checkpointing": True, "attn_impl": "flash_attention_2",
         "lora": {"r": 32, "alpha": 16, "dropout": 0.0, "targets": "all-linear"}}
    return {"model": {"ref": profile}, "training": t, "hardware": {"gpu": BASE_GPU, "gpus": 1, "device": "cuda"}}


def card(gib: float):
    from advisor.gpus import find_gpu

    base = find_gpu(BASE_GPU)
    return dataclasses.replace(base, memory_gib=float(gib), name=f"{gib:g} GiB card ({base.name}'s profile)")


def predict() -> list[dict]:
    from advisor import service
    from advisor.limits import max_seq

    out = []
    for source, profile, gib, seq in PUBLISHED:
        ctx = service.build(plan_data(profile, seq or SHORT))
        gpu = card(gib)
        ctx = dataclasses.replace(ctx, gpu=gpu)
        res = service.estimate(ctx)
        lim = max_seq(ctx.plan, ctx.shape, gpu)
        out.append({"source": source, "model": profile, "gib": gib, "published": seq, "oom": seq is None,
                    "at": seq or SHORT, "alloc": res.peak_allocated_bytes, "nvidia": res.peak_reserved_bytes,
                    "high": res.peak_reserved_high_bytes, "share": res.peak_reserved_bytes / (gib * GIB),
                    "verdict": res.status, "max": lim.value, "launchable": lim.launchable_value})
    return out


def summary(rs: list[dict]) -> dict:
    ran = [r for r in rs if not r["oom"]]
    shares = [r["share"] for r in ran]
    err_max = [r["max"] / r["published"] - 1 for r in ran]
    err_launch = [(r["launchable"] or r["max"]) / r["published"] - 1 for r in ran]
    oom_agree = sum(r["max"] == 0 and r["launchable"] is None for r in rs if r["oom"])
    return {"rows": len(ran), "share_min": min(shares), "share_max": max(shares),
            "in_goal": sum(0.92 <= s <= 1.05 for s in shares),
            "max_median": statistics.median(abs(e) for e in err_max), "max_lo": min(err_max), "max_hi": max(err_max),
            "launch_median": statistics.median(abs(e) for e in err_launch),
            "launch_hi": max(err_launch), "oom_rows": len(rs) - len(ran), "oom_agree": oom_agree}


def summary_line(s: dict) -> str:
    p = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    q = lambda x: f"{100 * x:+.0f}%"  # noqa: E731
    return (f"At the {s['rows']} published longest contexts, tuneplan's expected nvidia-smi peak is "
            f"{p(s['share_min'])}-{p(s['share_max'])} of the card ({s['in_goal']} of {s['rows']} within 92-105%). "
            f"Its longest context that fits (`--max seq`) is {q(s['max_lo'])} to {q(s['max_hi'])} off the "
            f"published one (median |error| {100 * s['max_median']:.1f}%); the last it would still launch "
            f"when only the allocator's cache is over the card is up to {q(s['launch_hi'])} (median "
            f"{100 * s['launch_median']:.0f}%). Out of memory at any length: {s['oom_agree']} of "
            f"{s['oom_rows']} agree.")


def markdown(rs: list[dict]) -> str:
    lines = ["Source: Unsloth's context-length benchmarks, column \"Hugging Face + FA2\" (the plain stack), "
             "[December 2024](https://unsloth.ai/blog/llama3-3) and [July 2024](https://unsloth.ai/blog/llama3-1): "
             "QLoRA r 32 on all linear layers, batch 1, padded sequences; the settings they do not state are in "
             "the script's docstring. Each card is the A100 profile with the row's memory. "
             "`python benchmarks/longest_context.py --write docs/accuracy.md` regenerates this.", "",
             "| published | model | card | published longest | tuneplan nvidia-smi there (p90) | share of card | "
             "verdict there | tuneplan `--max seq` | error | launchable to |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rs:
        model = r["model"].split("/")[1].replace("Llama-3.1-70B", "Llama-3.x-70B")
        pub = "OOM" if r["oom"] else f"{r['published']:,}"
        at = f" (at {r['at']})" if r["oom"] else ""
        err = "" if r["oom"] else f"{100 * (r['max'] / r['published'] - 1):+.1f}%"
        lines.append(f"| {r['source']} | {model} | {r['gib']} GB | {pub} | {r['nvidia'] / GIB:.2f} GiB "
                     f"({r['high'] / GIB:.2f}){at} | {100 * r['share']:.1f}% | {r['verdict']} | {r['max']:,} | {err} | "
                     f"{'' if r['launchable'] is None else format(r['launchable'], ',')} |")
    lines += ["", summary_line(summary(rs))]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", help="markdown file with the longctx block (docs/accuracy.md)")
    a = ap.parse_args()
    md = markdown(predict())
    print(md)
    if a.write:
        write_between(a.write, "longctx", md)
