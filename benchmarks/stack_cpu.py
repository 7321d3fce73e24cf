"""Calibration on an older stack: the same real steps as benchmarks/calibrate.py, measured on transformers 4.x.

    make .venv-tf4                                           # a side environment: transformers 4.48.1, peft 0.13.2
    .venv-tf4/bin/python benchmarks/stack_cpu.py --measure   # 1 minute: benchmarks/results/measured_cpu_tf4.json
    .venv-tf4/bin/python benchmarks/stack_cpu.py --measure --validation   # the held-out cases: ..._validation.json
    python benchmarks/stack_cpu.py [--write docs/accuracy.md]   # the analytic estimate with training.transformers

Why: published GPU runs (the fms-acceleration tables, Unsloth's context lengths) ran transformers
4.43-4.48, and two things that decide memory changed since, in transformers' own source:

* ``ForCausalLMLoss`` in 4.46-4.48 makes a contiguous fp32 copy of the shifted logits
  (``logits[..., :-1, :].contiguous()``) beside the fp32 upcast; 4.49 shifts the labels instead
  (``nn.functional.pad(labels, (0, 1))``), so the copy is gone.
* Mixture-of-experts layers in 4.x keep one ``nn.Linear`` per expert (Mixtral's ``w1``/``w2``/``w3``),
  which bitsandbytes quantizes; transformers 5 fuses them into 3-D tensors, which it does not.

``training.transformers`` tells the estimate which release the run uses. This script measures the
difference on the real 4.x stack: each case is a calibrate.py case (same tiny models, same
advisor.stack step, same profiler), run in an environment with transformers 4.48.1, peft 0.13.2 and
accelerate 1.0.1 (the stack of the fms-acceleration tables; torch stays the CPU build of this
project). transformers 4.x takes ``torch_dtype=`` where 5 takes ``dtype=``: ``--measure`` renames
the keyword in the measuring process only. The tiny models are saved by the 4.x release itself (its
own cache directory), so Mixtral's experts are per-expert linears on disk as in a 4.x checkpoint.

These are our own CPU measurements, i.e. calibration data; the GPU rows of that stack stay
validation (benchmarks/gpu_validate.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.docblock import write_between  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "measured_cpu_tf4.json"
VAL = ROOT / "benchmarks" / "results" / "measured_cpu_tf4_validation.json"  # validation_cases()


def cases() -> list[dict]:
    from advisor.spec import LoraSpec
    from benchmarks.calibrate import T

    out = []
    for fam in ("llama", "mistral", "qwen2", "gemma2", "phi3", "mixtral"):
        out.append(T(fam, method="full", precision="bf16", optimizer="adamw"))
        out.append(T(fam, method="lora", precision="bf16", optimizer="adamw", grad_checkpointing=True))
        out.append(T(fam, method="qlora", precision="bf16", optimizer="adamw", grad_checkpointing=True))
        out.append(T(fam, method="full", precision="fp32", optimizer="sgd", grad_checkpointing=True))
    for b, s in ((1, 64), (2, 256), (4, 128)):
        out.append(T("llama", b, s, method="lora", precision="bf16", optimizer="adamw", grad_checkpointing=True))
        out.append(T("mistral", b, s, method="qlora", precision="bf16", optimizer="adamw", grad_checkpointing=True))
    out.append(T("llama", method="lora", precision="amp-bf16", optimizer="adamw", grad_checkpointing=True))
    out.append(T("llama", method="qlora", precision="amp-bf16", optimizer="adamw", grad_checkpointing=True))
    out.append(T("llama", method="lora", precision="fp32", optimizer="adamw"))
    out.append(T("mixtral", 2, 256, method="qlora", precision="bf16", optimizer="adamw", grad_checkpointing=True))
    # wide experts (intermediate 8 x hidden), all-linear and attention-only LoRA (the fms Mixtral runs)
    qkvo = LoraSpec(targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    for m in ("lora", "qlora"):
        out.append(T("mixtral", 2, 256, inter=1024, method=m, precision="bf16", optimizer="adamw",
                     grad_checkpointing=True))
        for gc_ in (False, True):
            out.append(T("mixtral", 2, 256, inter=1024, method=m, precision="bf16", optimizer="adamw",
                         grad_checkpointing=gc_, lora=qkvo))
    # few tokens per expert: the recomputation's last down projection, with its dequantized weight, is the
    # peak (_per_expert_recompute_end_bytes); first measured as validation, then used to find that moment
    out.append(T("mixtral", 1, 64, inter=1024, method="qlora", precision="bf16", optimizer="adamw",
                 grad_checkpointing=True, lora=qkvo))
    return out


def validation_cases() -> list[dict]:
    """Mixtral steps beyond the table above, measured after 4.x's per-expert terms
    (``advisor.activations.per_expert_full_backward``, ``per_expert_dequant_bytes``,
    ``_per_expert_recompute_end_bytes``) were derived from it: validation of those terms, never used to
    choose them. Other batches and lengths, 8 experts, wide and narrow experts, so that the first expert is
    the widest moment in some and the last in others; few tokens per expert, where the dequantized weight
    decides. (One case of the first set, QLoRA b1 x 64 with wide experts, found a moment the estimate
    missed: it moved to cases(), and the last three here were added after that moment was modelled.)"""
    from advisor.spec import LoraSpec
    from benchmarks.calibrate import T

    qkvo = LoraSpec(targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    e8 = {"num_local_experts": 8}
    out = [
        T("mixtral", 2, 256, inter=1024, method="full", precision="bf16", optimizer="adamw"),
        T("mixtral", 1, 64, method="full", precision="fp32", optimizer="sgd", grad_checkpointing=True),
        T("mixtral", 4, 128, method="full", precision="bf16", optimizer="adamw", grad_checkpointing=True),
        T("mixtral", 2, 128, inter=512, method="full", precision="fp32", optimizer="adamw"),
        T("mixtral", 4, 128, method="qlora", precision="bf16", optimizer="adamw"),
        T("mixtral", 2, 128, inter=512, method="qlora", precision="bf16", optimizer="adamw",
          grad_checkpointing=True),
        T("mixtral", 1, 128, inter=1024, method="qlora", precision="bf16", optimizer="adamw",
          grad_checkpointing=True, lora=qkvo),
        T("mixtral", 1, 32, inter=512, method="qlora", precision="bf16", optimizer="adamw",
          grad_checkpointing=True),
        T("mixtral", 1, 64, inter=1024, method="qlora", precision="bf16", optimizer="adamw", lora=qkvo),
    ]
    for c in out[2:5] + out[6:7]:
        c.setdefault("overrides", {}).update(e8)
    return out


def _rename_dtype(f):
    @functools.wraps(f)
    def g(*a, **k):
        if "dtype" in k:
            k["torch_dtype"] = k.pop("dtype")
        return f(*a, **k)
    return g


def shim_transformers4() -> None:
    """What the 4.x release needs to run this project's harness, in this process only: ``torch_dtype=``
    where the harness passes ``dtype=``, no bitsandbytes backend check (4.48's predates bitsandbytes'
    CPU backend and calls .discard on a frozenset: the check only, not the quantization), and the
    tiny models in a cache directory of the release's own (saved by it: Mixtral's experts are
    per-expert linears on disk, as in a 4.x checkpoint)."""
    import transformers
    from transformers import integrations, modeling_utils
    from transformers.models.auto import auto_factory

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit(f"this is for a transformers 4.x environment (make .venv-tf4); this one has "
                         f"{transformers.__version__}")
    auto = auto_factory._BaseAutoModelClass
    auto.from_config = classmethod(_rename_dtype(auto.from_config.__func__))
    auto.from_pretrained = classmethod(_rename_dtype(auto.from_pretrained.__func__))
    pre = modeling_utils.PreTrainedModel
    pre.from_pretrained = classmethod(_rename_dtype(pre.from_pretrained.__func__))
    integrations.validate_bnb_backend_availability = lambda **_: True
    from benchmarks import tiny_models

    tiny_models.DEFAULT_CACHE = ROOT / ".tuneplan-cache" / f"tiny-tf{transformers.__version__}"


def measure(steps: int, validation: bool = False) -> int:
    """Run the cases (``validation``: validation_cases) on the installed transformers 4.x; write OUT (VAL)."""
    import gc
    import time

    shim_transformers4()
    import torch

    from benchmarks import calibrate

    torch.set_num_threads(1)
    stack = calibrate.stack_info(1)
    results, t0 = [], time.perf_counter()
    for i, c in enumerate(validation_cases() if validation else cases(), 1):
        r = calibrate.run_case(c, steps)
        r["stack"] = stack
        m = r["measured"]
        print(f"[{i:3d}] {r['id']:60s} peak {m['peak_bytes'] / 2**20:8.2f} MiB ({m['peak_phase']})", flush=True)
        results.append(r)
        gc.collect()
    out = VAL if validation else OUT
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{len(results)} cases, {time.perf_counter() - t0:.0f}s -> {out}")
    return 0


def release(case: dict) -> str:
    """'4.48' from the measured stack's version."""
    return ".".join(case["stack"]["transformers"].split(".")[:2])


def compare(case: dict) -> dict:
    """The analytic estimate of the case with training.transformers set to the measured release, and
    (for the contrast) with the default, transformers 5."""
    from benchmarks import accuracy

    c = dict(case, spec=dict(case["spec"], transformers=release(case)))
    row = accuracy.compare(c)
    default = accuracy.compare(dict(case, spec=dict(case["spec"], transformers="5")))
    return {**row, "as_5": default["analytic"], "error_as_5": default["error"]}


def table(rows: list[dict], stack: dict, validation: bool = False) -> str:
    """The markdown table of compare() rows: the calibration cases, or (``validation``) the held-out ones."""
    rel = ".".join(stack["transformers"].split(".")[:2])
    errs = [abs(r["error"]) for r in rows]
    e5 = [abs(r["error_as_5"]) for r in rows]
    what = ("Validation: cases measured after the per-expert terms were chosen, never used to choose them. "
            if validation else "")
    flag = " --validation" if validation else ""
    lines = [f"{what}Measured on transformers {stack['transformers']}, peft {stack['peft']}, torch {stack['torch']} "
             f"(CPU, the calibrate.py harness); estimate with `training.transformers: "
             f"\"{rel}\"`, and with the default (5) for contrast. "
             "`python benchmarks/stack_cpu.py --write docs/accuracy.md` regenerates this; "
             f"`.venv-tf4/bin/python benchmarks/stack_cpu.py --measure{flag}` re-measures.", "",
             f"| case | measured | estimate ({rel}) | error | estimate as 5 | error |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['id']}` | {r['measured'] / 2**20:.2f} MiB | {r['analytic'] / 2**20:.2f} MiB | "
                     f"{100 * r['error']:+.1f}% | {r['as_5'] / 2**20:.2f} MiB | {100 * r['error_as_5']:+.1f}% |")
    lines += ["", f"{len(rows)} cases: as {rel}, mean |error| {100 * sum(errs) / len(errs):.2f}%, "
              f"max {100 * max(errs):.2f}%, {sum(e <= 0.03 for e in errs)} within 3%; estimated as transformers 5, "
              f"mean {100 * sum(e5) / len(e5):.2f}%, max {100 * max(e5):.2f}%."]
    return "\n".join(lines)


def load(validation: bool = False) -> list[dict]:
    return json.loads((VAL if validation else OUT).read_text())


def tables() -> dict[str, str]:
    """The doc blocks: tf4cpu (calibration) and tf4val (validation)."""
    out = {}
    for block, val in (("tf4cpu", False), ("tf4val", True)):
        measured = load(val)
        out[block] = table([compare(c) for c in measured], measured[0]["stack"], val)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", action="store_true", help="measure (in a transformers 4.x environment)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--write", help="markdown file with the tf4cpu and tf4val blocks (docs/accuracy.md)")
    ap.add_argument("--validation", action="store_true",
                    help="with --measure: the validation cases (benchmarks/results/measured_cpu_tf4_validation.json)")
    a = ap.parse_args()
    if a.measure:
        sys.exit(measure(a.steps, a.validation))
    for block, md in tables().items():
        print(md, end="\n\n")
        if a.write:
            write_between(a.write, block, md)
