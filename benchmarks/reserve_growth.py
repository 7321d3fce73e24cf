"""Reserved memory over a run of varying batch shapes (advisor/fragmentation.py): its one constant G fitted on
the published per-step reserve of one run, the rest of the published runs as validation, never fitted.

    python benchmarks/reserve_growth.py [--fit] [--write docs/accuracy.md]

Rows: benchmarks/data/liger_reserved_steps.csv, copied from Liger-Kernel's HF Trainer example logs (the
``*_use_liger_False_*`` baselines, no Liger; the source of every row is in its ``source`` column: the
logs live on the branch of PR #199 and were deleted in 99f801c2). Each log prints, per optimizer step from
step 2 on, rank 0's ``torch.cuda.max_memory_allocated()`` and ``max_memory_reserved()`` since the step began
(``reset_peak_memory_stats`` at every step's start, in MiB) and ``num_input_tokens_seen`` (padded tokens
of all 4 ranks). The runs: TRL SFTTrainer on tatsu-lab/alpaca padded to each batch's longest (multiple of
16, at most 512), HF Trainer ``--bf16``, FSDP full shard over 4 A100-80GB, FSDP's activation checkpointing,
AdamW, transformers 4.43.3.

Calibration, decided before any fit: the Llama-3-8B batch-32 run only (``set`` column). Validation: every
other baseline (Llama-3-8B at batch 48, Mistral-7B, gemma-7b, Qwen2-7B, gemma-2-2b, Phi-3.5-mini twice).

What the model is given, from each log alone (rank 0 logs, so rank 0's batches are what counts):
- the reserve after step 2 (the first logged), as the start;
- where rank 0 met a new longest batch: a step whose allocated peak is above every earlier logged one by
  more than 1 MiB (the logits set these runs' peaks, so a longer batch has a higher peak; a run whose peak
  is the optimizer step's at every step, Mistral's, shows none);
- that step's shape-dependent bytes D: its allocated peak less what the estimate says holds whatever the
  batch (STILL: weights, optimizer states, gathered shards) for the plan that matches the run: full
  fine-tune, FSDP full shard over 4 GPUs as ZeRO-3, amp-bf16 (fp32 flat parameters,
  bf16 compute), AdamW, transformers 4.46 (the nearest release tuneplan models; its static terms match the
  logs' optimizer-step floor, 38,308 vs 38,291 MiB for Llama-3-8B);
- the limit: an A100-80GB's 81,920 MiB less the CUDA context and NCCL (advisor.gpu_memory): what torch
  can reserve there.
The model: reserved after step k = reserved after step 2 + G x (sum of D at the new longest batches up to
k), at most the limit. G: least squares of the reserve's growth at the calibration run's new longest
batches on their D.

The mechanism is checked apart (tests/test_reserve_growth.py): a synthetic step of a checkpointed 8-layer
model replayed through advisor/allocator.py (PyTorch's caching allocator, rule for rule) grows only at new
longest batches, by ``replay_share`` of their D, and not at all when the longest batch comes first.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "liger_reserved_steps.csv"
CARD_MIB = 81920  # A100 SXM 80GB (profiles/gpus.yaml: a100-80gb-sxm)
NEW_LONGEST_MIB = 1.0  # an allocated peak this much above every earlier one marks a new longest batch
HEADING = "### Reserved memory over a run of varying shapes (Liger-Kernel's HF Trainer + FSDP logs)"


@dataclass
class Step:
    step: int
    tokens: int  # padded tokens of this step, all 4 ranks
    allocated: float | None  # MiB
    reserved: float | None


@dataclass
class Run:
    id: str
    set: str
    model: str
    profile: str
    batch: int
    gpus: int
    source: str
    steps: list[Step] = field(default_factory=list)
    still: float = 0.0  # MiB: the estimate's batch-independent bytes (STILL)

    @property
    def logged(self) -> list[Step]:
        return [s for s in self.steps if s.reserved is not None]


def runs() -> list[Run]:
    out: dict[str, Run] = {}
    prev: dict[str, int] = {}
    with DATA.open() as f:
        for r in csv.DictReader(f):
            run = out.setdefault(r["run"], Run(r["run"], r["set"], r["published_model"], r["profile"],
                                               int(r["per_device_batch"]), int(r["gpus"]), r["source"]))
            seen = int(r["num_input_tokens_seen"])
            run.steps.append(Step(int(r["step"]), seen - prev.get(r["run"], 0),
                                  float(r["step_peak_allocated_mib"]) if r["step_peak_allocated_mib"] else None,
                                  float(r["step_peak_reserved_mib"]) if r["step_peak_reserved_mib"] else None))
            prev[r["run"]] = seen
    return list(out.values())


def plan_of(run: Run):
    from advisor.spec import Plan

    return Plan.model_validate({"training": {"method": "full", "precision": "amp-bf16", "optimizer": "adamw",
                                             "micro_batch": run.batch, "seq_len": 512, "grad_checkpointing": True,
                                             "attn_impl": "sdpa", "transformers": "4.46"},
                                "hardware": {"gpu": "a100-80gb", "gpus": run.gpus, "zero": 3}})


def limit_mib(gpus: int) -> float:
    """What torch can reserve on the card: its memory less the CUDA context and NCCL's buffers."""
    from advisor.gpu_memory import cuda_context_bytes, nccl_bytes
    from advisor.units import MIB

    return CARD_MIB - (cuda_context_bytes("ampere") + nccl_bytes(gpus)) / MIB


# the estimate's components that hold whatever the batch (under FSDP mixed precision there is no autocast
# cache of bf16 weight copies, which tuneplan's amp-bf16 counts among the activations: left out)
STILL = ("weights", "lora_adapters", "optimizer_states", "gradients", "zero3_gathered_params", "zero_buckets")


def with_still(rs: list[Run]) -> list[Run]:
    """Each run's batch-independent bytes (STILL, the estimate's at the run's mean padded length): what a
    logged allocated peak is less its shape-dependent part D."""
    from advisor.fragmentation import at_shape
    from advisor.units import MIB
    from benchmarks.throughput import shape_of

    for r in rs:
        plan, shape = plan_of(r), shape_of(r.profile)
        mean = round(sum(s.tokens for s in r.steps) / len(r.steps) / r.gpus / r.batch)
        bd = at_shape(plan, shape, r.batch, mean)
        r.still = sum(v for k, v in bd.components.items() if k in STILL) / MIB
    return rs


def new_longest(run: Run) -> list[tuple[int, float]]:
    """(step, D in MiB) where rank 0 met a new longest batch, from the logged allocated peaks."""
    out, best = [], None
    for s in run.logged:
        if best is not None and s.allocated > best + NEW_LONGEST_MIB:
            out.append((s.step, s.allocated - run.still))
        best = s.allocated if best is None else max(best, s.allocated)
    return out


def fit(rs: list[Run]) -> float:
    """G: least squares of the reserve's growth at the calibration runs' new longest batches on their D."""
    num = den = 0.0
    for r in rs:
        if r.set != "calibration":
            continue
        reserved = {s.step: s.reserved for s in r.logged}
        for step, d in new_longest(r):
            num += (reserved[step] - reserved[step - 1]) * d
            den += d * d
    return num / den


def predict(run: Run, g: float) -> dict[int, float]:
    """The model's reserve after each logged step (MiB)."""
    cap = limit_mib(run.gpus)
    logged = run.logged
    grow = dict(new_longest(run))
    reserved = logged[0].reserved
    out = {logged[0].step: reserved}
    for s in logged[1:]:
        if s.step in grow:
            reserved = min(reserved + g * grow[s.step], cap)
        out[s.step] = reserved
    return out


def longest_first(run: Run) -> float:
    """The model's reserve had rank 0's longest batch come first (the runner's fail-fast order): the start
    grown as a fixed-shape reserve grows with the transient (1 + K_FRAG per byte, advisor.gpu_memory), no new
    longest batch after it."""
    from advisor.gpu_memory import K_FRAG

    logged = run.logged
    return logged[0].reserved + (1 + K_FRAG) * (max(s.allocated for s in logged) - logged[0].allocated)


# --- the mechanism, replayed: a checkpointed layer stack through advisor/allocator.py -------------------------

TRACE = {"hidden": 4096, "intermediate": 14336, "vocab": 128256, "layers": 8, "rows": 8}


def layer_trace(length: int, rows: int = TRACE["rows"]) -> list[tuple[str, object, int]]:
    """One training step of a checkpointed decoder stack (Llama-3-8B's widths, 8 layers, bf16): forward keeps
    each layer's input and frees its internals, the loss holds bf16 and fp32 logits and their gradient,
    backward recomputes each layer, takes the input's gradient and frees the layer's input."""
    h, i, v, n = TRACE["hidden"], TRACE["intermediate"], TRACE["vocab"], TRACE["layers"]
    t = rows * length
    widths = (h, h, i, i, i, h)
    ev: list[tuple[str, object, int]] = []
    for layer in range(n):
        ev.append(("alloc", ("input", layer), t * h * 2))
        ev += [("alloc", ("fwd", layer, j), t * w * 2) for j, w in enumerate(widths)]
        ev += [("free", ("fwd", layer, j), 0) for j in range(len(widths))]
    ev += [("alloc", ("logits", j), t * v * b) for j, b in enumerate((2, 4, 4))]
    ev += [("free", ("logits", 0), 0), ("alloc", ("dlogits",), t * v * 4), ("free", ("logits", 1), 0),
           ("free", ("logits", 2), 0), ("free", ("dlogits",), 0)]
    for layer in reversed(range(n)):
        ev += [("alloc", ("re", layer, j), t * w * 2) for j, w in enumerate(widths)]
        ev.append(("alloc", ("dinput", layer), t * h * 2))
        ev += [("free", ("re", layer, j), 0) for j in range(len(widths))]
        ev += [("free", ("dinput", layer), 0), ("free", ("input", layer), 0)]
    return ev


def replay(lengths: list[int], persistent: int = 8 << 30):
    """advisor.allocator.replay_steps over steps of these lengths: (reserved after each step, D of each) in bytes."""
    from advisor.allocator import replay_steps

    res = replay_steps([persistent], [layer_trace(n) for n in lengths])
    return [r.peak_reserved_bytes for r in res], [r.peak_allocated_bytes - persistent for r in res]


def replay_share(seed: int = 3, steps: int = 30) -> float:
    """The replay's G: growth at each new longest batch over its D (least squares), shuffled lengths."""
    rng = random.Random(seed)
    lengths = [16 * rng.randint(8, 24) for _ in range(steps)]
    reserved, d = replay(lengths)
    num = den = 0.0
    best = lengths[0]
    for k in range(1, steps):
        if lengths[k] > best:
            num += (reserved[k] - reserved[k - 1]) * d[k]
            den += d[k] * d[k]
            best = lengths[k]
    return num / den


# --- the table ---------------------------------------------------------------------------------------------

def _mib(x: float) -> str:
    return f"{x:,.0f} MiB"


def _pct(pred: float, meas: float) -> str:
    return f"{pred / meas - 1:+.1%}"


def markdown(rs: list[Run], g: float) -> str:
    from advisor.fragmentation import G_GROWTH

    cal = [r for r in rs if r.set == "calibration"]
    val = [r for r in rs if r.set == "validation"]
    lines = [f"G = {g:.4f} fitted on the calibration run's new longest batches (advisor/fragmentation.py holds "
             f"{G_GROWTH}); the same mechanism replayed through advisor/allocator.py on a synthetic checkpointed "
             f"step gives {replay_share():.2f}. Limit: what torch can reserve on an A100-80GB, "
             f"{_mib(limit_mib(4))}. `python benchmarks/reserve_growth.py --write docs/accuracy.md` regenerates "
             "this.", ""]
    for r in cal:
        pred = predict(r, g)
        grow = dict(new_longest(r))
        lines += [f"Calibration: {r.model}, batch {r.batch} per GPU, {r.gpus} GPUs (rank 0, per step):", "",
                  "| step | padded tokens per GPU | published allocated | new longest batch (D) | published reserved "
                  "| tuneplan reserved | error |", "|---:|---:|---:|---|---:|---:|---:|"]
        for s in r.logged:
            new = f"yes ({_mib(grow[s.step])})" if s.step in grow else ""
            lines.append(f"| {s.step} | {s.tokens // r.gpus:,} | {_mib(s.allocated)} | {new} | {_mib(s.reserved)} | "
                         f"{_mib(pred[s.step])} | {_pct(pred[s.step], s.reserved)} |")
        peak = max(s.reserved for s in r.logged)
        lines += ["", f"It settles at step {max(grow) if grow else r.logged[0].step} "
                  f"({_mib(peak)}, {peak / r.logged[0].reserved - 1:+.0%} over step 2). Had rank 0's longest batch "
                  f"come first (the runner's fail-fast order) the model says {_mib(longest_first(r))} from step 1 "
                  f"on ({longest_first(r) / peak - 1:+.0%}): no published run checks that.", ""]
    lines += ["Validation (never fitted): the run's peak reserve, from the reserve after step 2 and rank 0's new "
              "longest batches; *limit*: the model reaches what torch can reserve on the card (the allocator then "
              "gives its cache back and retries), so the row checks the limit more than G:", "",
              "| run | steps | published at step 2 | new longest batches (steps) | published peak | tuneplan peak "
              "| error | published growth | tuneplan growth |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    errors, free, step_errors = [], [], []
    names = [f"{r.model}, b{r.batch}" for r in val]
    for r, name in zip(val, names, strict=True):
        pred = predict(r, g)
        base = r.logged[0].reserved
        peak = max(s.reserved for s in r.logged)
        ours = max(pred.values())
        news = [str(s) for s, _ in new_longest(r)]
        at_limit = ours >= limit_mib(r.gpus) - 0.5
        errors.append(abs(ours / peak - 1))
        if not at_limit:
            free.append(abs(ours / peak - 1))
        step_errors += [abs(pred[s.step] / s.reserved - 1) for s in r.logged[1:]]
        label = name + (f" (log @ {r.source.split('@ ')[1][:8]})" if names.count(name) > 1 else "")
        lines.append(f"| {label} | {len(r.logged) + 1} | {_mib(base)} | {', '.join(news) or 'none seen'} | "
                     f"{_mib(peak)} | {_mib(ours)}{' *limit*' if at_limit else ''} | {_pct(ours, peak)} | "
                     f"{_mib(peak - base)} | {_mib(ours - base)} |")
    lines += ["", f"Validation: the run's peak, median |error| {statistics.median(errors):.1%}, max {max(errors):.1%} "
              f"over {len(val)} runs; the {len(free)} runs that stay under the limit, median |error| "
              f"{statistics.median(free):.1%}, max {max(free):.1%}; every logged step after the second, median "
              f"|error| {statistics.median(step_errors):.1%}, max {max(step_errors):.1%} ({len(step_errors)} steps, "
              "those where the allocator gave its cache back at the limit included)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", action="store_true", help="print the fitted G for advisor/fragmentation.py")
    p.add_argument("--write", metavar="MD", help="replace the reservegrowth block of this markdown file")
    a = p.parse_args(argv)
    rs = with_still(runs())
    g = fit(rs)
    if a.fit:
        print(f"G_GROWTH = {g:.4f}")
    from advisor.fragmentation import G_GROWTH

    md = markdown(rs, G_GROWTH)
    if a.write:
        from benchmarks.docblock import write_between

        write_between(a.write, "reservegrowth", md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
