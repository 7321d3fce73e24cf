"""Moments outside the training step, measured on the CPU against advisor.lifecycle.

    python benchmarks/lifecycle.py [--families llama,qwen2,mistral] [--write docs/accuracy.md] [--json OUT]
    python benchmarks/lifecycle.py --rows benchmarks/results/lifecycle_cpu.json --write docs/accuracy.md

For each tiny architecture (tests/tiny.py's families, sized up: hidden 256, so per-tensor effects
show) saved in bf16 (as hub checkpoints ship), each case runs the real stack under
runner.memtrace.measure (every CPU allocation and free) in a fresh process:

* loading: advisor.stack.load_for_training (full bf16, LoRA bf16, QLoRA NF4 + double quant), with
  ``tuneplan:prepare`` around peft's prepare_model_for_kbit_training (its peak is device-independent);
* evaluation: one training step (the optimizer states exist), then advisor.stack.eval_loss on the
  plan's micro-batch inside ``tuneplan:eval``;
* merge export: runner.saving.merge_export's calls (from_pretrained on the CPU in the compute dtype,
  PeftModel.from_pretrained, merge_and_unload, save_pretrained), inside ``tuneplan:merge``.

Host RAM: the process RSS (anonymous and file-backed, /proc/self/status) before and after loading
and merging, with the libraries imported first (as runner.recipe._preimport does).

The predictions are advisor.lifecycle on a ``device: cpu`` plan (tensor bytes on the CPU); the
QLoRA prepare peak is compared with ``load_parts(...)["prepare"]``, the same number a GPU plan uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BEGIN, END = "<!-- lifecycle:begin -->", "<!-- lifecycle:end -->"
SIZE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, vocab_size=4096)
# one larger model, so that host RAM's fixed part (library pages first touched) is small beside the weights
LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=16384)
FAMILIES = ("llama", "qwen2", "mistral")
METHODS = ("full", "lora", "qlora")


def make_model(family: str, root: Path, size: dict | None = None) -> Path:
    """tests/tiny.py's family config, sized up, random weights saved in bf16."""
    import torch
    import transformers

    from tests.tiny import TINY

    size = size or SIZE
    out = root / (f"{family}-bf16-" + "-".join(str(v) for v in size.values()))
    if (out / "config.json").exists():
        return out
    cfg = {**TINY[family], **size}
    mt = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(mt, **cfg)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return out


def make_plan(model_dir: Path, method: str, batch: int = 2, seq: int = 64, merge: bool = True):
    from advisor.spec import Hardware, Plan, RunSpec, TrainSpec

    return Plan(training=TrainSpec(method=method, precision="bf16", micro_batch=batch, seq_len=seq,
                                   grad_checkpointing=False, double_quant=True),
                hardware=Hardware(device="cpu", gpu=None), run=RunSpec(merge_export=merge))


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "RssFile", "VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: echo 5 > /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_merge(model_dir: str, adapter_dir: str, precision: str = "bf16") -> dict:
    """runner.saving.merge_export's calls in a fresh process: tensors (memtrace) and peak RSS growth."""
    os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import peft
    import transformers
    import transformers.models.auto.modeling_auto  # noqa: F401

    import advisor  # noqa: F401
    from advisor.stack import compute_dtype
    from runner import memtrace

    with tempfile.TemporaryDirectory() as tmp:
        def merge():
            with memtrace.phase("merge"):
                base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute_dtype(precision))
                merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
                merged.save_pretrained(Path(tmp) / "merged")

        _reset_peak_rss()
        r0 = _rss()
        tr = memtrace.measure(merge)
        r1 = _rss()
    return {"merge_peak": tr.marks["merge"]["peak"], "merge_rss_peak": r1["VmHWM"] - r0["VmRSS"]}


def measure_case(model_dir: str, method: str, batch: int = 2, seq: int = 64, adapter_dir: str | None = None) -> dict:
    """Run one case in this process (call it in a fresh one): loading, a step, evaluation; saves the
    adapter to ``adapter_dir`` for :func:`measure_merge`."""
    os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import peft
    import torch  # noqa: F401

    import advisor  # noqa: F401  (silences bitsandbytes' CPU warning)

    if method == "qlora":
        import bitsandbytes  # noqa: F401
    from advisor import stack
    from runner import memtrace

    plan = make_plan(Path(model_dir), method, batch, seq)
    t = plan.training
    orig = peft.prepare_model_for_kbit_training

    def prepare(*a, **k):
        with memtrace.phase("prepare"):
            return orig(*a, **k)

    out: dict = {}
    _reset_peak_rss()
    r0 = _rss()

    def load():
        with memtrace.phase("load"):
            return stack.load_for_training(model_dir, t)

    peft.prepare_model_for_kbit_training = prepare
    try:
        tr = memtrace.measure(load)
    finally:
        peft.prepare_model_for_kbit_training = orig
    r1 = _rss()
    model = tr.result
    for mod in model.modules():  # as runner.recipe._setup_model does
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    out["load_peak"] = tr.marks["load"]["peak"]
    out["load_end"] = tr.marks["load"]["end"]
    out["weights"] = stack.weight_bytes(model)["total"]
    if "prepare" in tr.marks:
        out["prepare_peak"] = tr.marks["prepare"]["peak"]
    out["load_rss_peak"] = r1["VmHWM"] - r0["VmRSS"]
    out["load_rss_anon"] = r1["RssAnon"] - r0["RssAnon"]
    out["load_rss_file"] = r1["RssFile"] - r0["RssFile"]
    del tr

    vocab = model.config.get_text_config().vocab_size

    def step_and_eval():
        # the model exists already: the trace starts at 0 with it, so add out["load_end"] afterwards
        opt = stack.make_optimizer(model, t.optimizer, 1e-4)
        stack.train_step(model, stack.make_batch(vocab, batch, seq), opt, t)
        model.eval()
        with memtrace.phase("eval"):
            stack.eval_loss(model, stack.make_batch(vocab, batch, seq, seed=1), t.precision)
        model.train()
        return opt

    tr = memtrace.measure(step_and_eval)
    out["eval_peak"] = out["load_end"] + tr.marks["eval"]["peak"]
    del tr
    if method != "full" and adapter_dir:
        model.save_pretrained(adapter_dir)
    return out


def predict(model_dir: Path, method: str, batch: int = 2, seq: int = 64) -> dict:
    from advisor import lifecycle
    from advisor.model import resolve

    plan = make_plan(model_dir, method, batch, seq)
    shape = resolve(str(model_dir / "config.json"))
    m = lifecycle.run_moments(plan, shape)
    parts = lifecycle.load_parts(plan, shape)
    out = {"load_peak": m["loading"].tensor_bytes, "eval_peak": m["evaluation"].tensor_bytes,
           "load_host": m["loading"].host_bytes}
    if "prepare" in parts:
        out["prepare_peak"] = parts["prepare"] + 0
    if "merge_export" in m:
        mp = lifecycle.merge_parts(plan, shape)
        out["merge_peak"] = sum(mp.values())
        out["merge_host"] = m["merge_export"].host_bytes
    return out


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: no dynamic threshold, freed blocks go back to the OS


def _subprocess(call: str, env: dict | None = None) -> dict:
    code = (f"import json,sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
            "from benchmarks.lifecycle import measure_case, measure_merge; "
            f"print('RESULT' + json.dumps({call}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"{call}: {p.stderr[-2000:]}")


def run_case_subprocess(model_dir: Path, method: str) -> dict:
    """measure_case, then measure_merge (LoRA / QLoRA), each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(Path(tmp) / "adapter")
        out = _subprocess(f"measure_case({str(model_dir)!r}, {method!r}, adapter_dir={adapter!r})")
        fixed = _subprocess(f"measure_case({str(model_dir)!r}, {method!r})", FIXED_MMAP)
        out["load_rss_peak_fixed"] = fixed["load_rss_peak"]
        if method != "full":
            out.update(_subprocess(f"measure_merge({str(model_dir)!r}, {adapter!r})"))
            out["merge_rss_peak_fixed"] = _subprocess(f"measure_merge({str(model_dir)!r}, {adapter!r})",
                                                      FIXED_MMAP)["merge_rss_peak"]
    return out


def _kib(b: float) -> str:
    return f"{b / 1024:,.0f}"


def _err(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f}%" if meas else "n/a"


def table(rows: list[dict]) -> str:
    lines = ["| model | method | moment | predicted KiB | measured KiB | error |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        for key, label in (("load_peak", "loading (tensors)"), ("prepare_peak", "QLoRA prepare (fp32 casts)"),
                           ("eval_peak", "evaluation (tensors)"), ("merge_peak", "merge export (tensors)")):
            if key in r["measured"] and key in r["predicted"]:
                p, m = r["predicted"][key], r["measured"][key]
                lines.append(f"| {r['family']} | {r['method']} | {label} | {_kib(p)} | {_kib(m)} | {_err(p, m)} |")
        meas, p = r["measured"], r["predicted"]
        if not r.get("large"):  # host RAM of the h256 models: ~10 MB of library pages dominate (see --json)
            continue
        for key, pkey, label in (("load_rss_peak", "load_host", "loading"),
                                 ("merge_rss_peak", "merge_host", "merge export")):
            if key not in meas or pkey not in p:
                continue
            lines.append(f"| {r['family']} | {r['method']} | {label} (peak RSS growth) | {_kib(p[pkey])} "
                         f"| {_kib(meas[key])}; fixed mmap threshold: {_kib(meas[key + '_fixed'])} "
                         f"| {_err(p[pkey], meas[key])}; {_err(p[pkey], meas[key + '_fixed'])} |")
    return "\n".join(lines)


NOTES = """\
Reading the table:

- Tensors (loading, the QLoRA prepare peak, evaluation, the merge) match within 0-3 %; the QLoRA
  prepare peak (the fp32 casts of prepare_model_for_kbit_training) is the same number a GPU plan uses.
  CPU-only in the loading rows: the stack's copy of each loaded tensor (advisor.stack._own_storage)
  doubles the full/LoRA loading peak, and the whole bf16 file block is alive while QLoRA quantizes;
  on a GPU each tensor is copied to the device on its own (advisor.lifecycle models both).
- Peak RSS growth (the h1024 model only): VmHWM after `clear_refs`, libraries imported first, in a fresh
  process; it varies from run to run by a few MB and includes ~10 MB of library pages touched the first
  time a model loads (which dominate the h256 models: their rows are in `--json`). The second figure
  runs with `MALLOC_MMAP_THRESHOLD_=131072`: by default glibc raises its mmap threshold (up to 32 MiB)
  after freeing a large block, so freed temporaries below it (peft's per-layer merge deltas,
  bitsandbytes' CPU quantization buffers on these tiny models) stay in the heap and in the RSS; with
  the threshold fixed the RSS follows the tensors. A real model's per-layer temporaries are far above
  32 MiB (an 8B's MLP delta: 700 MB), so they go back to the OS.
- Merge export: the base stays memory-mapped; the in-place merge makes the LoRA targets' pages
  anonymous and save_pretrained reads the rest into the page cache, so the whole base ends up resident.
- Not measured here (needs GPUs): the GPU side of loading and of FSDP's full-state-dict gather, and the
  checkpoint's host copies; those formulas rest on the code paths cited in docs/memory-model.md."""


def write_block(doc: Path, body: str) -> None:
    text = doc.read_text()
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n## Moments outside the training step\n\n" + block + "\n"
    doc.write_text(text)


def main(argv=None) -> int:
    import platform

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--large", default="llama", help="families also run at the LARGE size ('' for none)")
    ap.add_argument("--write", type=Path, help="rewrite the lifecycle block of this markdown file")
    ap.add_argument("--json", type=Path, help="write the measured and predicted rows here")
    ap.add_argument("--rows", type=Path, help="render the table from rows a --json run wrote (no measuring)")
    ap.add_argument("--cache", type=Path, default=REPO_ROOT / ".tuneplan-cache" / "lifecycle")
    a = ap.parse_args(argv)
    rows = []
    if a.rows:  # re-render measured rows (re-predicting from the current formulas)
        rows = json.loads(a.rows.read_text())
        for r in rows:
            fam, h = r["family"].split(" h")
            r["large"] = int(h) == LARGE["hidden_size"]
            d = make_model(fam, a.cache, LARGE if r["large"] else SIZE)
            r["predicted"] = predict(d, r["method"])
    cases = [] if a.rows else [(f, SIZE) for f in a.families.split(",")] + [(f, LARGE) for f in a.large.split(",") if f]
    for fam, size in cases:
        d = make_model(fam, a.cache, size)
        for method in a.methods.split(","):
            rows.append({"family": f"{fam} h{size['hidden_size']}", "method": method, "large": size is LARGE,
                         "measured": run_case_subprocess(d, method), "predicted": predict(d, method)})
            print(fam, method, json.dumps(rows[-1]["measured"]), json.dumps(rows[-1]["predicted"]), flush=True)
    import peft
    import torch
    import transformers

    body = ("Measured on the CPU with `python benchmarks/lifecycle.py --write docs/accuracy.md` "
            f"(torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"{platform.machine()}): tiny random-weight models of tests/tiny.py's families sized to "
            f"hidden {SIZE['hidden_size']}, intermediate {SIZE['intermediate_size']}, vocab {SIZE['vocab_size']} "
            f"(h{LARGE['hidden_size']}: intermediate {LARGE['intermediate_size']}, "
            f"{LARGE['num_hidden_layers']} layers, "
            f"vocab {LARGE['vocab_size']}), "
            "saved in bf16; bf16 training, micro-batch 2 x 64 tokens, LoRA r=16 all-linear, QLoRA NF4 with double "
            "quantization. Tensors: runner.memtrace (every CPU allocation); RSS: /proc/self/status. Predictions: "
            "advisor.lifecycle on a `device: cpu` plan. See docs/memory-model.md \"Moments outside the training "
            "step\" for what differs on a GPU.\n\n" + table(rows) + "\n\n" + NOTES)
    if a.write:
        write_block(a.write, body)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
