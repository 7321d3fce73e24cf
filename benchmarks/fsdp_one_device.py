"""FSDP's FULL_SHARD code path on a single device, to find what a GPU adds per token under it.

    python benchmarks/fsdp_one_device.py [--device cuda|cpu] [--snapshot DIR] [--out FILE] [--write docs/accuracy.md]

Why: on the published 2-GPU runs of the plain stack (docs/accuracy.md, the fms-acceleration validation
rows) LoRA and QLoRA hold more per 4096-token sequence per GPU than tuneplan counts (Mistral LoRA
+412 MiB), while the same harness on one process costs what tuneplan says, and FSDP on the CPU (two gloo
ranks, benchmarks/fsdp_cpu.py) is within 1.1%. One process is not the same code: at world size 1 torch's
FSDP clamps FULL_SHARD to NO_SHARD (``torch.distributed.fsdp._init_utils._init_core_state``). This script
lifts that clamp for one process, so FULL_SHARD's own machinery (unshard into a separate buffer on the
unshard stream, reshard after forward, the pre-backward unshard, BACKWARD_PRE prefetch, reduce-scatter
into a new sharded gradient) runs on one device, and compares the cost of one more sequence under
FULL_SHARD and under NO_SHARD for the same model. Equal slopes on a GPU say the extra needs a second rank
(communication); a steeper FULL_SHARD slope reproduces it on one GPU, and ``--snapshot`` then writes the
CUDA allocator's memory snapshot of the FULL_SHARD step (``torch.cuda.memory._dump_snapshot``: every
live block with its stack) to name the tensors.

Each case runs in its own process (torchrun, one rank): loaded as advisor.stack loads it for FSDP,
wrapped with the runner's FSDP settings (use_orig_params, BACKWARD_PRE, advisor.stack.fsdp_wrap_policy),
three Trainer-style steps, the last step's peak of live tensor bytes (CUDA: ``max_memory_allocated``
over the step; CPU: runner.memtrace). On CUDA the model has Mistral-7B's layer (hidden 4096, MLP 14336,
32 heads, 8 KV heads, vocabulary 32,000) with 4 layers, at 4096 tokens; on the CPU a tiny Mistral, the
plumbing CI runs. Budget on one H100 / H200: about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from advisor.units import MIB

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_MISTRAL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cases(device: str) -> list[tuple]:
    """(method, micro-batch, seq, strategy)."""
    seq = 4096 if device == "cuda" else 128
    return [(m, b, seq, st) for m in ("lora", "qlora") for st in ("no_shard", "full_shard") for b in (1, 2)]


def lift_world_size_clamp() -> None:
    """Let FULL_SHARD run at world size 1: torch's FSDP reads the world size only for that clamp in
    ``_init_core_state``, so the call sees 2 and the state keeps its real world size after it."""
    from torch.distributed.fsdp import fully_sharded_data_parallel as fsdp_mod

    original = fsdp_mod._init_core_state

    def init_core_state(state, *args, **kwargs):
        real = state.world_size
        state.world_size = max(real, 2)
        try:
            return original(state, *args, **kwargs)
        finally:
            state.world_size = real

    fsdp_mod._init_core_state = init_core_state


def worker(model_dir: str, method: str, b: int, s: int, strategy: str, device: str, snapshot: str) -> None:
    import functools

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from advisor.stack import fsdp_wrap_policy, load_for_training, make_batch, make_optimizer, train_step
    from benchmarks.fsdp_cpu import spec_of
    from runner import memtrace

    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    if strategy == "full_shard":
        lift_world_size_clamp()
    spec = spec_of(method, b, s, QKVO)
    out: dict = {}

    def work():
        with memtrace.phase("load"):
            model = load_for_training(model_dir, spec, fsdp=True)
            base = model.get_base_model()
            layers = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(base.model.layers[0])})
            wrapped = FSDP(model, auto_wrap_policy=fsdp_wrap_policy(model) or layers,
                           sharding_strategy=ShardingStrategy[strategy.upper()], use_orig_params=True,
                           backward_prefetch=BackwardPrefetch.BACKWARD_PRE, device_id=torch.device(device, 0)
                           if cuda else torch.device("cpu"))
            opt = make_optimizer(wrapped, spec.optimizer, 1e-4)
        out["strategy"] = str(wrapped.sharding_strategy.name)
        batch = make_batch(base.config.vocab_size, b, s, device=device)
        losses = []
        for i in range(3):
            if cuda and i == 2:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                if snapshot:
                    torch.cuda.memory._record_memory_history(max_entries=200_000)
            losses.append(float(train_step(wrapped, batch, opt, spec)))
        out["losses"] = losses
        if cuda:
            torch.cuda.synchronize()
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
            out["reserved_bytes"] = torch.cuda.max_memory_reserved()
            if snapshot:
                Path(snapshot).mkdir(parents=True, exist_ok=True)
                torch.cuda.memory._dump_snapshot(str(Path(snapshot) / f"{method}-{strategy}-b{b}.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)

    if cuda:
        work()
    else:
        out["peak_bytes"] = memtrace.measure(work, collectives=True).last.peak_bytes
    os.write(1, (json.dumps(out) + "\n").encode())
    dist.destroy_process_group()


def measure(c: tuple, device: str, snapshot: str = "") -> dict:
    from benchmarks.tiny_models import build_tiny
    from runner.launch import free_port

    method, b, s, strategy = c
    model_dir = build_tiny("mistral", **(GPU_MISTRAL if device == "cuda" else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", str(model_dir), method,
           str(b), str(s), strategy, device, snapshot]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(x) for x in got.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise SystemExit(f"{method} b{b} {strategy}: the run failed\n{got.stderr[-4000:]}")
    return {"method": method, "batch": b, "seq": s, "asked": strategy, **lines[0]}


def results_path(device: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"fsdp_one_{device}.json"


def slopes(rows: list[dict]) -> dict[tuple[str, str], int]:
    """Bytes one more sequence costs, per (method, strategy)."""
    by = {(r["method"], r["asked"], r["batch"]): r["peak_bytes"] for r in rows}
    return {(m, st): by[(m, st, 2)] - by[(m, st, 1)] for (m, st, b) in by if b == 1 and (m, st, 2) in by}


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"FSDP on one {device} device, one rank (`benchmarks/fsdp_one_device.py`): the cost of one more "
             f"{rows[0]['seq']}-token sequence.", "",
             "| method | NO_SHARD, b1 / b2 | FULL_SHARD (clamp lifted), b1 / b2 | per sequence, NO_SHARD | "
             "per sequence, FULL_SHARD | FULL_SHARD extra |", "|---|---:|---:|---:|---:|---:|"]
    by = {(r["method"], r["asked"], r["batch"]): r["peak_bytes"] for r in rows}
    sl = slopes(rows)
    for m in dict.fromkeys(r["method"] for r in rows):
        no, full = sl[(m, "no_shard")], sl[(m, "full_shard")]
        lines.append(f"| {m} | {by[(m, 'no_shard', 1)] / MIB:,.1f} / {by[(m, 'no_shard', 2)] / MIB:,.1f} MiB | "
                     f"{by[(m, 'full_shard', 1)] / MIB:,.1f} / {by[(m, 'full_shard', 2)] / MIB:,.1f} MiB | "
                     f"{no / MIB:,.2f} MiB | {full / MIB:,.2f} MiB | {(full - no) / MIB:+,.2f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, d, m, b, s, st, dev, snap = sys.argv
        worker(d, m, int(b), int(s), st, dev, snap)
        sys.exit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--snapshot", default="", help="directory for the CUDA memory snapshots of each step")
    ap.add_argument("--out", help="JSON file for the rows (default: benchmarks/results/fsdp_one_<device>.json)")
    ap.add_argument("--table", action="store_true", help="print the stored rows' table, measure nothing")
    ap.add_argument("--write", help="markdown file with the fsdpone block (docs/accuracy.md)")
    a = ap.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out or results_path(a.device))
    if a.table:
        rows = json.loads(out.read_text())
    else:
        rows = [measure(c, a.device, a.snapshot) for c in cases(a.device)]
        out.write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(rows, a.device)
    print(md)
    if a.write:
        from benchmarks.docblock import write_between

        write_between(a.write, "fsdpone", md)
