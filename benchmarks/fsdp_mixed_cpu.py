"""FSDP mixed precision (``mixed-bf16``) per rank, measured on the CPU: two gloo processes, torch's FSDP as
accelerate sets it for ``mixed_precision: bf16``.

    python -m benchmarks.fsdp_mixed_cpu [--write docs/accuracy.md]     # ~1 minute

Each case full-fine-tunes a tiny random-weight model of a real architecture (benchmarks/tiny_models.py) in two
processes: loaded in fp32 as advisor.stack loads a ``mixed-bf16`` plan for FSDP (the fp32 masters), wrapped by
``FullyShardedDataParallel`` with the runner's accelerate settings (FULL_SHARD, use_orig_params, BACKWARD_PRE, the
decoder layer as the unit) and the mixed-precision policy accelerate builds from ``mixed_precision: bf16``
(advisor.stack.fsdp_mixed_precision: param, reduce and buffer dtypes bf16; tests/test_savers.py checks it is
accelerate's), the forward under bf16 autocast (accelerate's ``native_amp`` wraps the forward so), three
Trainer-style steps (advisor.stack.train_step). ``runner.memtrace`` records each rank's allocations; the last
step's peak of live tensor bytes is the measurement, compared with tuneplan's estimate of the same plan on 2
"GPUs" with ZeRO-3 and ``--device cpu`` (tensors only). The same worker also runs ``amp-bf16`` (fp32 units
gathered in fp32, autocast) and pure ``bf16``, the two modes mixed-bf16 is neither of.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "fsdp_mixed_cpu.json"
# (family, precision, micro-batch, seq)
CASES = (
    ("mistral", "mixed-bf16", 2, 128), ("mistral", "mixed-bf16", 4, 128), ("llama", "mixed-bf16", 2, 128),
    ("qwen2", "mixed-bf16", 2, 128), ("llama", "mixed-bf16", 1, 16), ("mistral", "mixed-bf16", 1, 8),
    ("mistral", "amp-bf16", 2, 128), ("mistral", "bf16", 2, 128),
)


def spec_of(precision: str, b: int, s: int):
    from advisor.spec import TrainSpec

    return TrainSpec(method="full", precision=precision, optimizer="adamw", micro_batch=b, seq_len=s,
                     grad_checkpointing=True, attn_impl="sdpa")


def case_id(c) -> str:
    family, precision, b, s = c
    return f"{family}/full/{precision}/fsdp2/b{b}s{s}"


def worker(model_dir: str, precision: str, b: int, s: int) -> None:
    """One rank (under torchrun)."""
    import functools

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from advisor.stack import fsdp_mixed_precision, load_for_training, make_batch, make_optimizer, train_step
    from benchmarks.fsdp_cpu import _caller_outlives_gloo
    from runner import memtrace

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = spec_of(precision, b, s)
    _caller_outlives_gloo(dist)
    out: dict = {"rank": rank}

    def work():
        with memtrace.phase("load"):
            model = load_for_training(model_dir, spec, fsdp=True)
            layer = type(model.model.layers[0])
            layers = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer})
            wrapped = FSDP(model, auto_wrap_policy=layers, sharding_strategy=ShardingStrategy.FULL_SHARD,
                           use_orig_params=True, backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
                           mixed_precision=fsdp_mixed_precision(precision), device_id=torch.device("cpu"))
            opt = make_optimizer(wrapped, spec.optimizer, 1e-4)
        batch = make_batch(model.config.vocab_size, b, s, seed=rank)

        def grads(optimizer, args, kwargs):  # the gradients the optimizer steps: their dtype
            out["grad_dtypes"] = sorted({str(p.grad.dtype).removeprefix("torch.") for g in optimizer.param_groups
                                         for p in g["params"] if p.grad is not None})

        opt.register_step_pre_hook(grads)
        out["losses"] = [float(train_step(wrapped, batch, opt, spec)) for _ in range(3)]
        out["shard_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in wrapped.parameters()})

    trace = memtrace.measure(work, collectives=True)
    last = trace.last
    report = {**out, "peak_bytes": last.peak_bytes, "peak_phase": last.peak_phase, "phase_peaks": last.phase_peaks}
    os.write(1, (json.dumps(report) + "\n").encode())  # one write: the ranks share stdout (see fsdp_cpu)
    dist.destroy_process_group()


def measure(c) -> dict:
    from benchmarks.tiny_models import build_tiny, make_config
    from runner.launch import free_port

    family, precision, b, s = c
    model_dir = build_tiny(family)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", str(model_dir), precision,
           str(b), str(s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    ranks = sorted((json.loads(x) for x in got.stdout.splitlines() if x.startswith("{")), key=lambda r: r["rank"])
    if len(ranks) != 2:
        raise SystemExit(f"{case_id(c)}: the run failed\n{got.stderr[-4000:]}")
    return {"id": case_id(c), "family": family, "precision": precision, "batch": b, "seq": s,
            "config": make_config(family).to_dict(), "ranks": ranks}


def estimate_of(row: dict):
    """tuneplan's estimate of the row's plan on 2 "GPUs" with ZeRO-3 on the CPU (tensors only)."""
    from advisor.memory import estimate
    from advisor.model import count_on_meta
    from advisor.spec import Plan

    shape = count_on_meta(row["family"], row["config"])
    t = spec_of(row["precision"], row["batch"], row["seq"]).model_dump()
    plan = Plan.model_validate({"training": t, "hardware": {"gpu": None, "device": "cpu", "gpus": 2, "zero": 3},
                                "data": {"padded": False}})
    return estimate(plan, shape)


def markdown(rows: list[dict]) -> str:
    lines = ["| case (2 ranks, FSDP full shard) | measured peak, rank 0 / 1 | tuneplan | error (max rank) | "
             "measured phase | tuneplan moment | shards / gradients |",
             "|---|---:|---:|---:|---|---|---|"]
    errs = []
    for r in rows:
        peaks = [x["peak_bytes"] for x in r["ranks"]]
        bd = estimate_of(r)
        err = bd.peak_allocated_bytes / max(peaks) - 1
        errs.append(abs(err))
        dt = f"{'/'.join(r['ranks'][0]['shard_dtypes'])} / {'/'.join(r['ranks'][0]['grad_dtypes'])}"
        lines.append(f"| `{r['id']}` | {peaks[0] / 2**20:.2f} / {peaks[1] / 2**20:.2f} MiB | "
                     f"{bd.peak_allocated_bytes / 2**20:.2f} MiB | {100 * err:+.1f}% | {r['ranks'][0]['peak_phase']} | "
                     f"{bd.peak_phase.replace('_', ' ')} | {dt} |")
    lines += ["", f"{len(rows)} cases: mean |error| {100 * sum(errs) / len(errs):.1f}%, max {100 * max(errs):.1f}%. "
              "`python -m benchmarks.fsdp_mixed_cpu --write docs/accuracy.md` re-measures (about a minute) and "
              "regenerates this; `--table` recomputes the estimate only."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, d, prec, b, s = sys.argv
        worker(d, prec, int(b), int(s))
        sys.exit(0)
    from benchmarks.docblock import stored_or_measured, table_arguments

    a = table_arguments("fsdpmixed", RESULTS)
    rows = stored_or_measured(a, RESULTS, CASES, case_id, measure)
    md = markdown(rows)
    print(md)
    if a.write:
        from benchmarks.docblock import write_between

        write_between(a.write, "fsdpmixed", md)
