"""Offloaded activation checkpoints (``training.offload_activations``), measured on the CPU.

    python -m benchmarks.offload_cpu [--write docs/accuracy.md]     # ~1 minute

Each case trains a tiny random-weight model of a real architecture (benchmarks/tiny_models.py) for three
Trainer-style steps (advisor.stack.train_step), loaded as the runner loads it (advisor.stack.load_for_training,
checkpointing on), once as it is and once with offloading on (advisor.stack.offload_checkpoints: torch's
save_on_cpu around each checkpointed layer; the way back copies, as it does from a GPU). The CPU memory profiler
records every allocation with its address; an allocation made inside advisor.stack.OFFLOAD_RANGE (the copy to
host) is host memory until it is freed, every other one is device memory. The last step's peaks -- device
tensors, host tensors -- are compared with tuneplan's estimate of the same plan (``--device cpu``: tensors only):
``peak_allocated_bytes`` (device) and ``Breakdown.host["offloaded_activations"]`` (host).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "offload_cpu.json"
# (family, method, precision, micro-batch, seq, config overrides): the deep ones (12 layers, a small vocabulary) make
# the layers' inputs a large share of the step, as in a real model at long context
DEEP = {"num_hidden_layers": 12, "vocab_size": 512}
CASES = (
    ("llama", "lora", "bf16", 2, 256, None), ("llama", "qlora", "bf16", 2, 256, None),
    ("llama", "full", "bf16", 2, 256, None), ("mistral", "lora", "amp-bf16", 2, 256, None),
    ("qwen2", "lora", "bf16", 4, 128, None),
    ("llama", "lora", "bf16", 2, 512, DEEP), ("llama", "qlora", "bf16", 2, 512, DEEP),
    ("llama", "full", "bf16", 1, 512, DEEP), ("llama", "lora", "amp-bf16", 1, 1024, DEEP),
)


def spec_of(method: str, precision: str, b: int, s: int, offload: bool):
    from advisor.spec import TrainSpec

    return TrainSpec(method=method, precision=precision, optimizer="adamw", micro_batch=b, seq_len=s,
                     grad_checkpointing=True, attn_impl="sdpa", offload_activations=offload,
                     lora={"r": 8, "alpha": 16, "targets": "all-linear"})


def case_id(c) -> str:
    family, method, precision, b, s, over = c
    return f"{family}/{method}/{precision}/b{b}s{s}" + (f"/L{over['num_hidden_layers']}v{over['vocab_size']}"
                                                        if over else "")


def _timeline(prof) -> dict:
    """The last tuneplan:step's peaks of all, device and host tensor bytes (see the module doc)."""
    from advisor.stack import OFFLOAD_RANGE, PHASE_PREFIX

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    ns = lambda us: int(round(float(us) * 1000))  # noqa: E731
    packs, steps, phases = [], [], []
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and (name == OFFLOAD_RANGE or name.startswith(PHASE_PREFIX)):
            t0 = ns(e["ts"])
            span = (t0, t0 + ns(e.get("dur", 0)))
            if name == OFFLOAD_RANGE:
                packs.append(span)
            elif name == PHASE_PREFIX + "step":
                steps.append(span)
            else:
                phases.append((name[len(PHASE_PREFIX):], *span))
    blocks = sorted((e for e in events if e.get("name") == "[memory]" and str(e["args"].get("Device Type", 0)) == "0"),
                    key=lambda e: (float(e["ts"]), e["args"].get("Ev Idx", 0)))
    host_addr: set = set()
    total = host = 0
    series = []
    for e in blocks:
        a = e["args"]
        t, n, addr = ns(e["ts"]), int(a["Bytes"]), a["Addr"]
        if n > 0 and any(p0 <= t <= p1 for p0, p1 in packs):
            host_addr.add(addr)
            host += n
        elif n < 0 and addr in host_addr:
            host_addr.discard(addr)
            host += n
        total += n
        series.append((t, total, host))
    s0, s1 = max(steps)  # the last step
    inside = [(tot, h) for t, tot, h in series if s0 <= t <= s1]
    before = [(tot, h) for t, tot, h in series if t < s0][-1:]
    pts = before + inside
    device = {ph: max((tot - h for t, tot, h in series if p0 <= t <= p1), default=0)
              for ph, p0, p1 in phases if s0 <= p0 <= s1}
    return {"peak_bytes": max(tot for tot, _ in pts), "device_peak_bytes": max(tot - h for tot, h in pts),
            "host_peak_bytes": max(h for _, h in pts), "packs_per_step": sum(s0 <= p0 <= s1 for p0, _ in packs),
            "device_phase_peaks": device}


def measure_one(c, offload: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from advisor.stack import load_for_training, make_batch, make_optimizer, train_step
    from benchmarks.tiny_models import build_tiny

    family, method, precision, b, s, over = c
    spec = spec_of(method, precision, b, s, offload)
    model_dir = build_tiny(family, **(over or {}))
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = load_for_training(model_dir, spec)
        opt = make_optimizer(model, spec.optimizer, 1e-4)
        batch = make_batch(model.config.get_text_config().vocab_size, b, s)
        losses = [float(train_step(model, batch, opt, spec)) for _ in range(3)]
        del model, opt
    return {**_timeline(prof), "losses": losses}


def measure(c) -> dict:
    from benchmarks.tiny_models import make_config

    return {"id": case_id(c), "family": c[0], "method": c[1], "precision": c[2], "batch": c[3], "seq": c[4],
            "config": make_config(c[0], **(c[5] or {})).to_dict(), "plain": measure_one(c, False),
            "offload": measure_one(c, True)}


def plan_of(row: dict, offload: bool):
    from advisor.model import count_on_meta
    from advisor.spec import Plan

    shape = count_on_meta(row["family"], row["config"])
    t = spec_of(row["method"], row["precision"], row["batch"], row["seq"], offload).model_dump()
    return Plan.model_validate({"training": t, "hardware": {"gpu": None, "device": "cpu"},
                                "data": {"padded": False}}), shape


def estimate_of(row: dict, offload: bool) -> dict:
    """tuneplan's figures for the row (``--device cpu``, where the host copies are in the same RAM and so among the
    components at each moment): the peak of all tensors, of the device's (every moment less its host copies:
    what a GPU would hold) and of the host copies."""
    from advisor.memory import estimate, training_phases

    plan, shape = plan_of(row, offload)
    phases = training_phases(shape, plan.training, plan.hardware)
    host = {k: v.get("offloaded_activations", 0) for k, v in phases.items()}
    return {"peak_bytes": estimate(plan, shape).peak_allocated_bytes,
            "device_peak_bytes": max(sum(v.values()) - host[k] for k, v in phases.items()),
            "host_peak_bytes": max(host.values())}


def simulate_of(row: dict, offload: bool) -> int:
    """The simulate mode's peak for the row (all tensors, the host copies included on the CPU)."""
    from advisor.simulate import simulate

    plan, shape = plan_of(row, offload)
    return simulate(plan, shape).peak_allocated_bytes


def markdown(rows: list[dict], simulated: dict[str, int] | None = None) -> str:
    """``simulated``: the simulate mode's peak per row id (offload on), for its column."""
    lines = ["| case (checkpointing on) | device, plain | device, offload | host, offload | all tensors, offload | "
             "device saved |" + (" simulate, all tensors |" if simulated else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if simulated else "")]
    errs = []
    m = lambda x: f"{x / 2**20:.2f}"  # noqa: E731

    def cell(measured: int, ours: int) -> str:
        errs.append(abs(ours / measured - 1))
        return f"{m(measured)} / {m(ours)} ({100 * (ours / measured - 1):+.1f}%)"

    for r in rows:
        plain, off = estimate_of(r, False), estimate_of(r, True)
        meas, mp = r["offload"], r["plain"]
        saved = mp["device_peak_bytes"] - meas["device_peak_bytes"]
        sim = ""
        if simulated:
            s = simulated[r["id"]]
            sim = f" {m(s)} ({100 * (s / meas['peak_bytes'] - 1):+.1f}%) |"
        lines.append(f"| `{r['id']}` | {cell(mp['device_peak_bytes'], plain['device_peak_bytes'])} | "
                     f"{cell(meas['device_peak_bytes'], off['device_peak_bytes'])} | "
                     f"{cell(meas['host_peak_bytes'], off['host_peak_bytes'])} | "
                     f"{cell(meas['peak_bytes'], off['peak_bytes'])} | "
                     f"{m(saved)} / {m(plain['device_peak_bytes'] - off['device_peak_bytes'])} |{sim}")
    lines += ["", f"MiB, measured / tuneplan (error). {len(rows)} cases: every figure within {100 * max(errs):.1f}% "
              f"(mean |error| {100 * sum(errs) / len(errs):.1f}%). `python -m benchmarks.offload_cpu --write "
              "docs/accuracy.md` re-measures (about a minute) and regenerates this; `--table` recomputes the estimate."]
    return "\n".join(lines)


if __name__ == "__main__":
    from benchmarks.docblock import stored_or_measured, table_arguments

    a = table_arguments("offloadcpu", RESULTS)
    rows = stored_or_measured(a, RESULTS, CASES, case_id, measure)
    sims = {r["id"]: simulate_of(r, True) for r in rows}
    md = markdown(rows, sims)
    print(md)
    if a.write:
        from benchmarks.docblock import write_between

        write_between(a.write, "offloadcpu", md)
