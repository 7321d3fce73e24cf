"""Padded batches on the CPU: the measured step against the estimate of a padded plan.

    python benchmarks/padding_cpu.py --measure            # transformers 5 (.venv): results/padding_cpu.json
    .venv-tf4/bin/python benchmarks/padding_cpu.py --measure   # 4.48: results/padding_cpu_tf4.json
    python benchmarks/padding_cpu.py [--simulate] [--write docs/accuracy.md]   # the tables

The runner right-pads every batch to its longest example (advisor.spec.padded_batches), and the
attention mask then changes what sdpa keeps (advisor/activations.py ``_sdpa_mask_terms``,
``padding_kept_bytes``). Each case trains the calibrate.py tiny model three steps on one batch whose
first sequence is full length and whose others end in a quarter of padding (the shape of the runner's
longest batch: the fail-fast batch) and records the profiler's peak of live tensor bytes in the last
step (runner.memtrace). The estimate is the same plan with padding (``data.padded: true``); the
unpadded estimate is shown for the contrast. These are this machine's measurements; the padding terms
are counted from the source, not fitted. The two Llama rows with a 256 vocabulary at 2 x 512 told the
in-flight residual stream and forward mask apart (calibration for those terms); the three small-vocabulary
rows after them were measured only after those terms were in (validation; docs/accuracy.md, "Padding").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.docblock import write_between  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


TF4_FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "mixtral")  # those of the 4.48 table (stack_cpu.py)


def cases(release: str = "5") -> list[dict]:
    """The padded cases; on transformers 4.x only the families the 4.x rules were measured on."""
    from benchmarks.calibrate import T

    bf = {"precision": "bf16", "optimizer": "adamw"}
    out = [
        T("llama", method="lora", **bf),
        T("llama", 4, 256, method="lora", **bf),
        T("llama", method="lora", grad_checkpointing=True, **bf),
        T("llama", 4, 256, method="lora", grad_checkpointing=True, **bf),
        T("llama", 2, 512, method="lora", grad_checkpointing=True, **bf),
        T("llama", method="full", precision="fp32", optimizer="adamw"),
        T("llama", method="qlora", grad_checkpointing=True, **bf),
        T("llama", method="lora", precision="amp-bf16", optimizer="adamw"),
        T("mistral", method="lora", **bf),
        T("qwen2", method="lora", **bf),
        T("phi3", method="lora", **bf),
        T("gemma2", method="lora", grad_checkpointing=True, **bf),
        T("gpt2", method="full", precision="fp32", optimizer="adamw"),
        T("falcon", method="lora", **bf),
        T("llama", 2, 256, layers=6, method="full", precision="bf16", optimizer="sgd", grad_checkpointing=True),
    ]
    # a small vocabulary: the peak moves from the loss into the layers' backward (checkpointing: the
    # recomputed layer's mask and repeated k, v beside the kept boolean mask)
    for gc_ in (True, False):
        c = T("llama", 2, 512, method="lora", grad_checkpointing=gc_, **bf)
        c["overrides"] = {"vocab_size": 256}
        out.append(c)
    # measured after the MLP-stream and forward-mask terms were read off simulate's live set for the two
    # cases above: other shapes and families with a small vocabulary, validation only
    for fam, b, s, gc_, vocab in (("llama", 4, 256, False, 256), ("mistral", 2, 512, False, 256),
                                  ("qwen2", 2, 512, True, 512)):
        c = T(fam, b, s, method="lora", grad_checkpointing=gc_, **bf)
        c["overrides"] = {"vocab_size": vocab}
        out.append(c)
    # the demo's plan (runner/demo.py): QLoRA fp32 on all linear layers, batch 4 x 128, no checkpointing
    from advisor.spec import LoraSpec

    out.append(T("llama", 4, 128, method="qlora", precision="fp32", optimizer="adamw",
                 lora=LoraSpec(r=16, alpha=32, targets="all-linear")))
    if not release.startswith("5"):
        out = [c for c in out if c["family"] in TF4_FAMILIES]
    return out


def padded_batch(vocab: int, batch: int, seq: int) -> dict:
    """advisor.stack.make_batch with the last quarter of every sequence but the first padded."""
    from advisor import stack

    b = stack.make_batch(vocab, batch, seq, seed=0)
    k = seq // 4
    b["attention_mask"][1:, -k:] = 0
    b["labels"][1:, -k:] = -100
    return b


def measure_case(c: dict, steps: int = 3) -> dict:
    import transformers

    from advisor import stack
    from benchmarks.calibrate import case_id
    from benchmarks.tiny_models import build_tiny, make_config
    from runner import memtrace

    model_dir = build_tiny(c["family"], **c.get("overrides", {}))
    spec = c["spec"]

    def work():
        model = stack.load_for_training(model_dir, spec)
        opt = stack.make_optimizer(model, spec.optimizer, spec.learning_rate)
        batch = padded_batch(model.config.get_text_config().vocab_size, c["batch"], c["seq"])
        for _ in range(steps):
            stack.train_step(model, batch, opt, spec)

    trace = memtrace.measure(work)
    release = ".".join(transformers.__version__.split(".")[:2])
    over = c.get("overrides", {})
    vocab = over.get("vocab_size")
    return {"id": case_id(c) + (f"/v{vocab}" if vocab else ""), "family": c["family"],
            "config": make_config(c["family"], **over).to_dict(),
            "spec": {**spec.model_dump(), "transformers": release if release < "5" else "5"},
            "batch": c["batch"], "seq": c["seq"], "peak_bytes": trace.last.peak_bytes,
            "peak_phase": trace.last.peak_phase}


def out_path(release: str) -> Path:
    return RESULTS / ("padding_cpu.json" if release.startswith("5") else "padding_cpu_tf4.json")


def measure() -> Path:
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        from benchmarks import stack_cpu

        stack_cpu.shim_transformers4()
    rows = []
    for c in cases(transformers.__version__):
        rows.append(measure_case(c))
        print(f"{rows[-1]['id']}: {rows[-1]['peak_bytes']:,} bytes ({rows[-1]['peak_phase']})", flush=True)
    path = out_path(transformers.__version__)
    path.write_text(json.dumps({"transformers": transformers.__version__, "cases": rows}, indent=1) + "\n")
    return path


def plan_of(row: dict, padded: bool = True):
    from advisor.spec import Plan

    return Plan.model_validate({"training": row["spec"], "hardware": {"gpu": None, "device": "cpu"},
                                "data": {"padded": padded}})


def compare(row: dict, with_simulate: bool = False) -> dict:
    from advisor.memory import estimate
    from benchmarks import accuracy

    shape = accuracy.shape_for(row)
    padded = estimate(plan_of(row), shape)
    out = {"id": row["id"], "measured": row["peak_bytes"], "ours": padded.peak_allocated_bytes,
           "unpadded": estimate(plan_of(row, False), shape).peak_allocated_bytes, "moment": padded.peak_phase}
    if with_simulate:
        from advisor.simulate import SimulateError, simulate

        try:
            out["simulate"] = simulate(plan_of(row), shape).peak_allocated_bytes
        except SimulateError:
            out["simulate"] = None
    return out


def table(path: Path, with_simulate: bool = False) -> tuple[str, list[float]]:
    data = json.loads(path.read_text())
    rows = [compare(r, with_simulate) for r in data["cases"]]
    sim = with_simulate and any(r.get("simulate") for r in rows)
    head = ("| case (padded) | measured | tuneplan | error | unpadded estimate | error | tuneplan moment |"
            + (" simulate | error |" if sim else ""))
    lines = [head, "|---|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if sim else "")]
    errs, serrs = [], []
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    for r in rows:
        e, u = r["ours"] / r["measured"] - 1, r["unpadded"] / r["measured"] - 1
        errs.append(abs(e))
        line = (f"| `{r['id']}` | {mib(r['measured'])} | {mib(r['ours'])} | {100 * e:+.1f}% | {mib(r['unpadded'])} | "
                f"{100 * u:+.1f}% | {r['moment'].replace('_', ' ')} |")
        if sim:
            s = r.get("simulate")
            if s:
                serrs.append(abs(s / r["measured"] - 1))
                line += f" {mib(s)} | {100 * (s / r['measured'] - 1):+.1f}% |"
            else:
                line += " declines | |"
        lines.append(line)
    unp = [abs(r["unpadded"] / r["measured"] - 1) for r in rows]
    lines += ["", f"{len(rows)} cases on transformers {data['transformers']}: mean |error| "
              f"{100 * sum(errs) / len(errs):.2f}%, max {100 * max(errs):.2f}%, {sum(e <= 0.03 for e in errs)} "
              f"within 3% (estimated as unpadded: max {100 * max(unp):.1f}%)"
              + (f"; simulate max {100 * max(serrs):.2f}%, {sum(e <= 0.02 for e in serrs)} of {len(serrs)} within 2%"
                 if serrs else "") + "."]
    return "\n".join(lines), errs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="measure on the installed transformers")
    ap.add_argument("--simulate", action="store_true", help="add the simulate column (transformers 5 table)")
    ap.add_argument("--write", metavar="MD", help="write both tables between the padding markers of MD")
    a = ap.parse_args()
    if a.measure:
        print(f"wrote {measure()}")
        return 0
    blocks = []
    for rel, name in (("5", "padding"), ("4.48", "padding4")):
        path = out_path(rel)
        if path.exists():
            text, _ = table(path, a.simulate and rel == "5")
            print(text + "\n")
            blocks.append((name, text))
    if a.write:
        for name, text in blocks:
            write_between(Path(a.write), name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
