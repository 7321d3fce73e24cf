"""Measure the true peak memory of real fine-tuning steps on the CPU: the reference for the estimates.

    python benchmarks/calibrate.py [--quick] [--out benchmarks/results/measured_cpu.json]
                                   [--only SUBSTRING] [--steps 3] [--threads 1]

Each case builds a tiny random-weight model of a real architecture (benchmarks/tiny_models.py),
loads it with advisor.stack exactly as the runner does (transformers + peft + bitsandbytes), runs
``--steps`` Trainer-style steps (or one greedy ``generate`` for inference) under the CPU memory
profiler (runner.memtrace), and records the *last* step, the steady state.

Output: one JSON list, one object per case::

    {"id", "family", "model_dir", "config": <config.json dict>, "task": "training"|"inference",
     "spec": TrainSpec/InferSpec.model_dump(), "batch", "seq", "optimizer_impl", "attn_impl",
     "measured": {
        "peak_bytes":        peak live tensor bytes of the last step (what the estimate must match),
        "step_start_bytes":  live at the start of the last step (weights + optimizer states + batch),
        "step_end_bytes":    live at its end,
        "phase_peaks":       {phase: peak inside it} (forward/backward/optimizer/zero_grad; prefill/decode),
        "phase_start_bytes": {phase: live when it began},
        "peak_phase":        the phase holding the step peak,
        "step_peaks":        peak of every step (first steps create optimizer states),
        "trace_peak_bytes":  peak over the whole run, loading and first step included,
        "load_bytes":        live after the model (and optimizer object) was built, "load_peak_bytes",
        "weights_bytes":     bytes of parameters + buffers (+ 4-bit quant states), "weights_by_dtype",
        "trainable_params", "total_params", "quantized_params" (4-bit, logical count),
        "untracked_bytes":   tensors the profiler missed, from an independent gc count after the last
                             step (gc count - baseline - traced live; ~0 means the trace is complete),
        "seconds"},
     "stack": {"torch", "transformers", "peft", "bitsandbytes", "threads"}}

A case that fails is kept with "error" instead of "measured".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from advisor import stack as build  # noqa: E402
from advisor.spec import InferSpec, LoraSpec, TrainSpec  # noqa: E402
from benchmarks.tiny_models import FAMILIES, build_tiny, make_config  # noqa: E402
from runner import memtrace  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "measured_cpu.json"


def T(family, batch=2, seq=128, impl="default", layers=None, inter=None, **spec) -> dict:
    """A training case; ``layers``: a deeper tiny model than the family's 2 layers; ``inter``: a wider MLP
    (intermediate_size) than the family's."""
    spec.setdefault("grad_checkpointing", False)
    spec.setdefault("attn_impl", "sdpa")
    c = {"family": family, "task": "training", "batch": batch, "seq": seq, "impl": impl,
         "spec": TrainSpec(micro_batch=batch, seq_len=seq, **spec)}
    if layers:
        c["overrides"] = {"n_layer" if family == "gpt2" else "num_hidden_layers": layers}
    if inter:
        c.setdefault("overrides", {})["intermediate_size"] = inter
    return c


def I(family, batch=2, seq=256, prompt=None, **spec) -> dict:
    """An inference case; ``prompt``: prompt tokens (default half of ``seq``; the rest is generated)."""
    return {"family": family, "task": "inference", "batch": batch, "seq": seq,
            "spec": InferSpec(batch=batch, seq_len=seq, prompt_len=prompt or max(1, seq // 2), **spec)}


def quick_matrix() -> list[dict]:
    return [
        T("llama", method="full", precision="fp32", optimizer="adamw"),
        T("llama", method="lora", precision="bf16", optimizer="adamw", grad_checkpointing=True),
        T("llama", method="qlora", precision="bf16", optimizer="adamw_8bit", grad_checkpointing=True),
        T("gpt2", method="full", precision="bf16", optimizer="sgd", attn_impl="eager"),
        T("qwen2", method="lora", precision="amp-bf16", optimizer="adamw"),
        I("llama", precision="bf16"),
    ]


def full_matrix() -> list[dict]:
    cases: list[dict] = []
    # A. core grid on llama: method x precision x optimizer x checkpointing
    for method in ("full", "lora", "qlora"):
        for prec in ("fp32", "bf16"):
            for opt in ("adamw", "sgd", "adamw_8bit"):
                for gc_ in (False, True):
                    cases.append(T("llama", method=method, precision=prec, optimizer=opt, grad_checkpointing=gc_))
    # B. batch x seq sweeps (vocab 4096 untied; qwen2 vocab 6144 tied)
    for fam in ("llama", "qwen2"):
        for b in (1, 2, 4):
            for s in (64, 128, 256):
                for gc_ in (False, True):
                    cases.append(T(fam, b, s, method="lora", precision="bf16", optimizer="adamw",
                                   grad_checkpointing=gc_))
    for b in (1, 2, 4):
        for s in (64, 128, 256):
            cases.append(T("llama", b, s, method="full", precision="fp32", optimizer="adamw"))
            cases.append(T("llama", b, s, method="qlora", precision="bf16", optimizer="adamw",
                           grad_checkpointing=True))
    # C. every family, four representative setups
    for fam in FAMILIES:
        cases.append(T(fam, method="full", precision="bf16", optimizer="adamw"))
        cases.append(T(fam, method="full", precision="fp32", optimizer="sgd", grad_checkpointing=True))
        cases.append(T(fam, method="lora", precision="bf16", optimizer="adamw", grad_checkpointing=True))
        cases.append(T(fam, method="qlora", precision="bf16", optimizer="adamw", grad_checkpointing=True))
    # D. eager attention (s^2 term)
    for fam in ("llama", "mistral", "gpt2"):
        for s in (128, 256):
            cases.append(T(fam, 2, s, method="full", precision="fp32", optimizer="adamw", attn_impl="eager"))
            cases.append(T(fam, 2, s, method="lora", precision="bf16", optimizer="adamw", attn_impl="eager"))
    cases.append(T("llama", 2, 256, method="lora", precision="bf16", optimizer="adamw", attn_impl="eager",
                   grad_checkpointing=True))
    # E. autocast
    cases.append(T("llama", method="full", precision="amp-bf16", optimizer="adamw"))
    cases.append(T("llama", method="lora", precision="amp-bf16", optimizer="adamw", grad_checkpointing=True))
    cases.append(T("llama", method="qlora", precision="amp-bf16", optimizer="adamw", grad_checkpointing=True))
    cases.append(T("qwen2", method="full", precision="amp-bf16", optimizer="adamw", grad_checkpointing=True))
    cases.append(T("llama", method="lora", precision="amp-fp16", optimizer="adamw"))
    # F. the other optimizers and torch optimizer implementations
    for opt in ("sgd_momentum", "adafactor", "paged_adamw_8bit", "paged_adamw_32bit"):
        cases.append(T("llama", method="full", precision="bf16", optimizer=opt))
        cases.append(T("llama", method="lora", precision="bf16", optimizer=opt, grad_checkpointing=True))
    for impl in ("fused", "foreach"):
        for prec in ("fp32", "bf16"):
            cases.append(T("llama", method="full", precision=prec, optimizer="adamw", impl=impl))
        cases.append(T("llama", method="lora", precision="bf16", optimizer="adamw", impl=impl,
                       grad_checkpointing=True))
    # G. fp16 storage
    cases.append(T("llama", method="full", precision="fp16", optimizer="sgd"))
    cases.append(T("llama", method="lora", precision="fp16", optimizer="adamw", grad_checkpointing=True))
    cases.append(T("llama", method="qlora", precision="fp16", optimizer="adamw", grad_checkpointing=True))
    # H. LoRA / QLoRA knobs, accumulation
    cases.append(T("llama", method="lora", precision="bf16", optimizer="adamw", lora=LoraSpec(r=64, alpha=64)))
    cases.append(T("llama", method="lora", precision="bf16", optimizer="adamw",
                   lora=LoraSpec(targets="q_proj,v_proj")))
    cases.append(T("llama", method="lora", precision="bf16", optimizer="adamw", lora=LoraSpec(dropout=0.1)))
    cases.append(T("llama", method="qlora", precision="bf16", optimizer="adamw", grad_checkpointing=True,
                   double_quant=False))
    cases.append(T("llama", method="lora", precision="bf16", optimizer="adamw", grad_accum=2))
    # H. beyond the grid: every family in fp32 with plain SGD and no checkpointing (the Phi-3 case)
    for fam in ("phi3", "gpt_neox", "gemma2", "qwen2"):
        cases.append(T(fam, method="full", precision="fp32", optimizer="sgd"))
    for fam in ("phi3", "llama"):  # deep enough that simulate extrapolates from 2, 3 and 4 layers
        cases.append(T(fam, 2, 256, layers=6, method="full", precision="fp32", optimizer="sgd"))
        cases.append(T(fam, 2, 128, layers=6, method="lora", precision="bf16", optimizer="adamw",
                       grad_checkpointing=True))
    # H. beyond the grid: wide experts (intermediate 8 x hidden; Mixtral's is 3.5 x, the tiny one's 2 x)
    for gc_ in (False, True):
        cases.append(T("mixtral", 2, 256, inter=1024, method="lora", precision="bf16", optimizer="adamw",
                       grad_checkpointing=gc_))
    cases.append(T("mixtral", 2, 256, inter=1024, method="qlora", precision="bf16", optimizer="adamw",
                   grad_checkpointing=True))
    cases.append(T("mixtral", 2, 256, inter=1024, method="full", precision="fp32", optimizer="sgd",
                   grad_checkpointing=True))
    cases.append(T("mixtral", 2, 256, inter=1024, layers=3, method="lora", precision="bf16", optimizer="adamw"))
    # frozen experts (attention-only LoRA, as most published MoE runs): the grouped matmuls save no input
    for m in ("lora", "qlora"):
        for gc_ in (False, True):
            cases.append(T("mixtral", 2, 256, inter=1024, method=m, precision="bf16", optimizer="adamw",
                           grad_checkpointing=gc_, lora=LoraSpec(targets=["q_proj", "k_proj", "v_proj", "o_proj"])))
    # I. inference: generate with KV cache
    for fam in ("llama", "mistral", "qwen2", "gemma2", "gpt2", "mixtral"):
        for prec in ("bf16", "fp32"):
            cases.append(I(fam, 2, 256, precision=prec))
    for b, s in ((1, 128), (4, 128), (1, 512), (4, 512)):
        cases.append(I("llama", b, s, precision="bf16"))
    cases.append(I("llama", 2, 256, precision="bf16", weight_quant="nf4"))
    # prompt/generate splits: from a short prompt to a prompt of all but a few tokens
    for prompt in (8, 32, 128, 224, 250, 254):
        cases.append(I("llama", 2, 256, prompt, precision="bf16"))
    for fam in ("mistral", "qwen2", "gpt2", "gemma2", "falcon", "phi3"):
        for prompt in (16, 252):
            cases.append(I(fam, 2, 256, prompt, precision="bf16"))
    cases.append(I("llama", 4, 512, 508, precision="bf16"))
    cases.append(I("llama", 1, 512, 16, precision="fp32"))
    cases.append(I("llama", 2, 256, 252, precision="bf16", weight_quant="nf4"))
    unique: dict[str, dict] = {}
    for c in cases:
        unique.setdefault(case_id(c), c)
    return list(unique.values())


def case_id(c: dict) -> str:
    s = c["spec"]
    if c["task"] == "inference":
        split = "" if s.prompt_len == max(1, c["seq"] // 2) else f"/p{s.prompt_len}"
        return f"{c['family']}/infer/{s.precision}/{s.weight_quant}/b{c['batch']}s{c['seq']}{split}"
    extra = []
    if c.get("impl", "default") != "default":
        extra.append(c["impl"])
    ov = c.get("overrides") or {}
    if "num_hidden_layers" in ov or "n_layer" in ov:
        extra.append(f"L{ov.get('num_hidden_layers', ov.get('n_layer'))}")
    if "intermediate_size" in ov:
        extra.append(f"i{ov['intermediate_size']}")
    if "num_local_experts" in ov:
        extra.append(f"E{ov['num_local_experts']}")
    if s.lora.r != 16 or s.lora.targets != "all-linear" or s.lora.dropout:
        extra.append(f"r{s.lora.r}-{'all' if s.lora.targets == 'all-linear' else '+'.join(s.lora.targets)}"
                     f"-d{s.lora.dropout}")
    if not s.double_quant and s.method == "qlora":
        extra.append("nodq")
    if s.grad_accum > 1:
        extra.append(f"ga{s.grad_accum}")
    return "/".join([c["family"], s.method, s.precision, s.optimizer, "gc" if s.grad_checkpointing else "nogc",
                     s.attn_impl, f"b{c['batch']}s{c['seq']}"] + extra)


def run_case(c: dict, steps: int) -> dict:
    model_dir = build_tiny(c["family"], **c.get("overrides", {}))
    spec = c["spec"]
    info: dict = {}

    def train_work():
        with memtrace.phase("load"):
            model = build.load_for_training(model_dir, spec)
            opt = build.make_optimizer(model, spec.optimizer, spec.learning_rate, impl=c.get("impl", "default"))
        info["weights"] = build.weight_bytes(model)
        info["counts"] = build.param_counts(model)
        info["impl"] = build.optimizer_impl(opt)
        info["attn"] = build.attn_impl_of(model)
        batch = build.make_batch(model.config.get_text_config().vocab_size, c["batch"], c["seq"], seed=0)
        for _ in range(steps):
            loss = build.train_step(model, batch, opt, spec)
        info["loss"] = float(loss)
        with memtrace.phase("gc_check"):
            info["gc_bytes"] = memtrace.gc_live_tensor_bytes()
        return None

    def infer_work():
        with memtrace.phase("load"):
            model = build.load_for_inference(model_dir, spec)
        info["weights"] = build.weight_bytes(model)
        info["counts"] = build.param_counts(model)
        info["attn"] = build.attn_impl_of(model)
        info["impl"] = None
        for _ in range(2):  # the second generate is the measured one
            out = build.generate_step(model, spec, spec.prompt_len)
        info["out_shape"] = list(out.shape)
        del out
        with memtrace.phase("gc_check"):
            info["gc_bytes"] = memtrace.gc_live_tensor_bytes()
        return None

    gc.collect()
    baseline = memtrace.gc_live_tensor_bytes()
    t0 = time.perf_counter()
    trace = memtrace.measure(train_work if c["task"] == "training" else infer_work)
    secs = time.perf_counter() - t0
    last = trace.last
    w = info["weights"]
    measured = {
        "peak_bytes": last.peak_bytes,
        "step_start_bytes": last.start_bytes,
        "step_end_bytes": last.end_bytes,
        "phase_peaks": last.phase_peaks,
        "phase_start_bytes": last.phase_start,
        "peak_phase": last.peak_phase,
        "step_peaks": [s.peak_bytes for s in trace.steps],
        "trace_peak_bytes": trace.peak_bytes,
        "load_bytes": trace.marks["load"]["end"],
        "load_peak_bytes": trace.marks["load"]["peak"],
        "weights_bytes": w["total"],
        "weights_by_dtype": {k: v for k, v in w.items() if k != "total"},
        "trainable_params": info["counts"]["trainable"] if c["task"] == "training" else 0,
        "total_params": info["counts"]["total"],
        "quantized_params": info["counts"]["quantized_4bit"],
        "untracked_bytes": info["gc_bytes"] - baseline - trace.marks["gc_check"]["start"],
        "seconds": round(secs, 2),
    }
    cfg = make_config(c["family"], **c.get("overrides", {})).to_dict()
    out = {
        "id": case_id(c), "family": c["family"], "model_dir": str(model_dir.relative_to(REPO_ROOT))
        if model_dir.is_relative_to(REPO_ROOT) else str(model_dir),
        "config": cfg, "task": c["task"], "spec": spec.model_dump(), "batch": c["batch"], "seq": c["seq"],
        "optimizer_impl": info["impl"], "attn_impl": info["attn"], "measured": measured,
    }
    if c["task"] == "inference":
        out["prompt_len"] = spec.prompt_len
        out["generated_shape"] = info["out_shape"]
    else:
        out["final_loss"] = info["loss"]
    return out


def stack_info(threads: int) -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "threads": threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="six representative cases (about a minute)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON list")
    ap.add_argument("--only", default=None, help="run only cases whose id contains this substring")
    ap.add_argument("--steps", type=int, default=3, help="training steps per case; the last is measured")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: no OpenMP worker can allocate unseen by the profiler)")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    cases = quick_matrix() if args.quick else full_matrix()
    if args.only:
        cases = [c for c in cases if args.only in case_id(c)]
    stack = stack_info(args.threads)
    for fam in {c["family"] for c in cases}:
        build_tiny(fam)
    results = []
    t0 = time.perf_counter()
    for i, c in enumerate(cases, 1):
        cid = case_id(c)
        try:
            r = run_case(c, args.steps)
            m = r["measured"]
            print(f"[{i:3d}/{len(cases)}] {cid:70s} peak {m['peak_bytes'] / 2**20:8.2f} MiB "
                  f"({m['peak_phase']}) {m['seconds']:5.1f}s", flush=True)
        except Exception as err:  # keep going; the failure is part of the record
            r = {"id": cid, "family": c["family"], "task": c["task"], "spec": c["spec"].model_dump(),
                 "batch": c["batch"], "seq": c["seq"], "error": f"{type(err).__name__}: {err}",
                 "traceback": traceback.format_exc(limit=4)}
            print(f"[{i:3d}/{len(cases)}] {cid:70s} ERROR {r['error'][:120]}", flush=True)
        r["stack"] = stack
        results.append(r)
        gc.collect()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    n_err = sum("error" in r for r in results)
    print(f"{len(results)} cases, {n_err} errors, {time.perf_counter() - t0:.0f}s -> {args.out}")
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
