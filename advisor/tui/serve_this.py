""""Serve this" for a tuned run (the Chat screen): the `tuneplan export` command, the `vllm serve` command for
the export (or for the base with the run's adapter, --enable-lora), and the GPU it needs.

The numbers are advisor.service's vLLM start-up estimate (service.rank_serving: the cheapest card and count
that holds one request of the run's sequence length, or the count of the card the run trained on) for the
run's base model's shape: merging an adapter does not change the shape, and a full fine-tune keeps it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text

from advisor import present, service
from advisor.serving import VLLM_LORA_RANKS, lora_rank_for
from advisor.units import mib_or_gib
from runner import api as runner_api


@dataclass
class ServeThis:
    context: int  # max_model_len: the run's training sequence length (at most the model's positions)
    export_cmd: list[str]
    export_dir: Path
    merged: Any  # advisor.service.ServingAdvice for the merged export (16-bit weights)
    kind: str = "adapter"  # the run's weights: "adapter" (LoRA / QLoRA) or "model" (full fine-tune)
    adapter: Any = None  # the same for the base with --enable-lora (LoRA / QLoRA runs), None otherwise
    lora_module: str | None = None  # NAME=PATH for --lora-modules
    notes: list[str] = field(default_factory=list)
    exported: str | None = None  # what the export wrote (the app's Export tab), once it has

    @property
    def serve_cmd(self) -> list[str] | None:
        """`vllm serve EXPORT_DIR ...` on the card it needs, or None when nothing holds it."""
        m = self.merged
        return m.command(m.choice) if m.choice is not None else None

    @property
    def lora_cmd(self) -> list[str] | None:
        """`vllm serve BASE ... --enable-lora --max-lora-rank R --lora-modules NAME=ADAPTER`, or None."""
        a = self.adapter
        if a is None or a.choice is None or self.lora_module is None:
            return None
        return [*a.command(a.choice), "--lora-modules", self.lora_module]


def serve_this(run, export_dir: str | Path | None = None, exported: str | None = None) -> ServeThis:
    """What to run to serve ``run`` (a runner.tuned.TunedRun) with vLLM: its export in ``export_dir`` (default:
    where `tuneplan export` writes; ``exported`` says what was written there). Problems when the base model's
    shape cannot be read (advisor.service.resolve_model) or the question is one vLLM refuses."""
    plan = run.plan
    shape = service.resolve_model(plan.model.ref, plan.model.revision, plan.model.trust_remote_code)
    context = plan.training.seq_len
    if shape.max_position and context > shape.max_position:
        context = shape.max_position
    gpu = None
    if plan.hardware.device == "cuda" and plan.hardware.gpu:
        gpu = service.find_gpu(plan.hardware.gpu)
    run_dir = Path(run.run_dir).absolute()
    defaults = runner_api.export_defaults(run)
    out = Path(export_dir if export_dir is not None else defaults["out"]).absolute()
    dtype = defaults["dtype"]
    export_cmd = ["tuneplan", "export", str(run_dir)]
    if export_dir is not None and out != Path(defaults["out"]).absolute():
        export_cmd += ["--out", str(out)]
    notes = []
    if dtype == "fp32":  # vLLM serves 16-bit weights (its "auto" casts fp32 down): half the disk
        export_cmd += ["--dtype", "bf16"]
        if exported is None:
            notes.append("the run computed in fp32; vLLM serves 16-bit weights, so export in bf16 (half the disk)")
    merged = service.rank_serving(shape, str(out), context=context, concurrency=1, gpu=gpu)
    res = ServeThis(context, export_cmd, out, merged, run.kind, notes=notes, exported=exported)
    if run.kind == "adapter":
        r = plan.training.lora.r
        rank = lora_rank_for(r)  # vLLM refuses any other --max-lora-rank: the next one up holds rank r
        if rank is None:
            notes.append(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; this adapter's r is {r}: serve the "
                         "merged export")
        else:
            res.adapter = service.rank_serving(shape, plan.model.ref, context=context, concurrency=1, gpu=gpu,
                                               enable_lora=True, max_lora_rank=rank)
            res.lora_module = f"{run_dir.name}={Path(run.weights).absolute()}"
    return res


def _gpu_line(advice, what: str) -> Text:
    text = Text()
    text.append(f"{what}: ", style="bold")
    c = advice.choice
    if c is None:
        where = f"no count of {present.short_gpu(advice.gpu.name)}" if advice.gpu else \
            "no priced NVIDIA card at 1, 2, 4 or 8 GPUs"
        text.append(f"{where} holds one request of {advice.context:,} tokens\n", style="bold red")
        return text
    e = c.estimate
    gpus = f"{c.count} × {present.short_gpu(c.gpu.name)}" if c.count > 1 else present.short_gpu(c.gpu.name)
    text.append(gpus, style="bold green")
    if c.usd_per_hour is not None:
        text.append(f" · {present.money(c.usd_per_hour)}/h")
    text.append(f" · weights {mib_or_gib(e.weights_bytes)}, KV cache {mib_or_gib(e.kv_cache_bytes)} per GPU = "
                f"{e.kv_cache_tokens:,} tokens · {present.at_once(e)}\n")
    return text


def serve_text(s: ServeThis) -> Text:
    """The panel: export first, then serve the export; or the adapter beside the base."""
    m = s.merged
    text = Text()
    how = (f"on the card it trained on ({present.short_gpu(m.gpu.name)})" if m.gpu is not None else
           f"the cheapest card (prices as of {m.prices_as_of})")
    text.append(f"vLLM {m.vllm_version}, one request of {s.context:,} tokens (the run's sequence length), "
                f"{how}, as vLLM sizes its KV cache at start-up\n", style="dim")
    what = "merges the adapter into the base" if s.kind == "adapter" else "a standalone folder"
    text.append(f"1. export ({what}, with the run's tokenizer and chat template):\n", style="bold")
    if s.exported:
        text.append(f"   done: {s.exported}\n", style="green")
    else:
        text.append(f"   {shlex.join(s.export_cmd)}\n", style="cyan")
    text.append("2. serve the export:\n", style="bold")
    if s.serve_cmd is not None:
        text.append(f"   {shlex.join(s.serve_cmd)}\n", style="cyan")
    text.append_text(_gpu_line(m, "   GPU"))
    if s.adapter is not None:
        text.append("or, without exporting, the adapter beside the base:\n", style="bold")
        if s.lora_cmd is not None:
            text.append(f"   {shlex.join(s.lora_cmd)}\n", style="cyan")
        text.append_text(_gpu_line(s.adapter, "   GPU"))
    for n in s.notes:
        text.append(f"note: {n}\n", style="dim")
    return text
