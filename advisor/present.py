"""Presenters: the tables and lines that both the CLI and the TUI show, built once from the service's
typed results (rich renderables; the CLI prints them, the TUI puts them in widgets). No formula here:
numbers come from :mod:`advisor.service`, units and words from :mod:`advisor.policy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.breakdown import COMPONENT_LABELS, label
from advisor.policy import STATUS_WORDS
from advisor.units import gib, gib_str

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

    from advisor.service import EstimateResult, Variant
    from advisor.spec import Plan

_ORDER = list(COMPONENT_LABELS)

BADGE_STYLES = {"fits": "bold black on green", "tight": "bold black on yellow", "oom": "bold white on red",
                "no-bf16": "bold black on #888888"}
BADGE_WORDS = {**STATUS_WORDS, "no-bf16": "no bf16"}
STATUS_COLOURS = {"fits": "green", "tight": "yellow", "oom": "red", "no-bf16": "bright_black"}


def ordered(parts: dict[str, int]) -> list[tuple[str, int]]:
    """Components in the reading order of the memory model (unknown ones last)."""
    return sorted(parts.items(), key=lambda kv: _ORDER.index(kv[0]) if kv[0] in _ORDER else 99)


def plan_line(plan: Plan) -> str:
    """One line of what is estimated: 'qlora · bf16 · adamw · batch 1 × seq 2048 · grad-ckpt on · ...'."""
    hw = plan.hardware
    if plan.task == "training":
        t = plan.training
        what = (f"{t.method} · {t.precision} · {t.optimizer} · batch {t.micro_batch} × seq {t.seq_len} · "
                f"grad-ckpt {'on' if t.grad_checkpointing else 'off'}")
        if t.method != "full":
            targets = t.lora.targets if isinstance(t.lora.targets, str) else ",".join(t.lora.targets)
            what += f" · LoRA r={t.lora.r} on {targets}"
    else:
        i = plan.inference
        what = f"inference · {i.precision} · weights {i.weight_quant} · batch {i.batch} × seq {i.seq_len}"
    multi = f" × {hw.gpus} GPUs, ZeRO-{hw.zero}" if hw.gpus > 1 else ""
    return f"{what} · device {hw.device}{multi}"


def model_line(res: EstimateResult) -> str:
    s = res.shape
    return f"{s.name} ({s.architecture}, {s.params_total:,} parameters, {res.params_trainable:,} trainable)"


def badge(status: str | None, short: bool = False) -> Text:
    """The fit badge: fits / tight / out of memory (OOM when short) / no bf16."""
    from rich.text import Text

    if status is None:
        return Text(" no GPU chosen ", style="dim")
    word = "OOM" if short and status == "oom" else BADGE_WORDS[status]
    return Text(f" {word} ", style=BADGE_STYLES[status])


def verdict_line(res: EstimateResult) -> Text | None:
    """'NVIDIA GeForce RTX 4090: 23.99 GiB → fits (headroom 10.1 GiB)'; None without a GPU."""
    from rich.text import Text

    v = res.verdict
    if v is None or res.gpu is None:
        return None
    line = Text(f"{res.gpu.name}: {gib_str(v.capacity_bytes)} → ")
    line.append(STATUS_WORDS[v.status], style=STATUS_COLOURS[v.status])
    if v.cache_limited:
        line.append(f" (the allocator's cache would outgrow the card; the tensors and workspaces need "
                    f"{gib_str(v.floor_bytes or 0)}, so PyTorch frees cached blocks and retries: it runs at the card's "
                    "limit, with slower allocations)")
        return line
    line.append(f" ({'headroom' if v.headroom_bytes >= 0 else 'short by'} {gib_str(abs(v.headroom_bytes))}")
    if v.high_bytes > v.need_bytes:
        line.append(f"; high end of the band {gib_str(v.high_bytes)}")
    line.append(")")
    return line


def breakdown_table(res: EstimateResult, title: str | None = None, compact: bool = False) -> Table:
    """Tensors alive at the peak, the peak allocated, the GPU overhead and the peak reserved (nvidia-smi).
    ``compact``: the TUI's borderless variant."""
    from rich.table import Table
    from rich.text import Text

    bd = res.breakdown
    title = title or f"Peak memory (at {bd.peak_phase.replace('_', ' ')})"
    kw: dict[str, Any] = {"expand": True, "box": None, "padding": (0, 1), "header_style": "bold"} if compact else {}
    t = Table(title=title, title_justify="left", **kw)
    t.add_column("component")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    total = bd.peak_reserved_bytes or 1
    for k, size in ordered(bd.components):
        t.add_row(label(k), gib(size), f"{100 * size / total:.0f}%")
    allocated, reserved = ("peak allocated", "peak reserved") if compact else \
        ("peak allocated (tensors)", "peak reserved (nvidia-smi)")
    t.add_row(Text(allocated, style="bold"), Text(gib(bd.peak_allocated_bytes), style="bold"), "")
    for k, size in bd.overhead.items():
        t.add_row(label(k), gib(size), f"{100 * size / total:.0f}%")
    v = res.verdict
    if bd.overhead and v is not None and v.need_bytes > v.capacity_bytes:
        # nvidia-smi never shows more than the card: what it will read, and the need with no card limit
        t.add_row(Text("peak reserved, no card limit", style="bold"), Text(gib(bd.peak_reserved_bytes)), "")
        if v.cache_limited:
            t.add_row(Text("nvidia-smi (at the card's limit)", style="bold"),
                      Text(gib(v.on_card_bytes), style="bold"), "")
        else:
            t.add_row(Text("on this card", style="bold"), Text("out of memory", style="bold red"), "")
    elif bd.overhead:
        t.add_row(Text(reserved, style="bold"), Text(gib(bd.peak_reserved_bytes), style="bold"), "")
    for k, size in bd.host.items():  # beside the device peak, in the host's RAM (offloaded activations)
        t.add_row(Text(f"host RAM: {label(k)}", style="italic"), Text(gib(size), style="italic"), "host")
    return t


def compare_table(variants: list[Variant], current: str | None) -> Table:
    """Columns = variants (Full / LoRA / QLoRA); rows = components in GiB, trainable parameters, fit."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title="same plan, three ways (GiB)", title_justify="left", expand=True, box=None,
              padding=(0, 1), header_style="bold")
    t.add_column("", no_wrap=True)
    for v in variants:
        t.add_column(Text(v.label + (" ◀" if v.label.lower() == (current or "").lower() else "")), justify="right")
    keys: list[str] = []
    for v in variants:
        for k, _ in ordered(v.result.breakdown.components if v.result else {}):
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: _ORDER.index(k) if k in _ORDER else 99)
    for k in keys:
        t.add_row(label(k), *[gib(v.result.breakdown.components.get(k, 0)) if v.result else "-" for v in variants])
    t.add_row(Text("peak reserved", style="bold"),
              *[Text(gib(v.result.peak_reserved_bytes), style="bold") if v.result else Text("-") for v in variants])
    t.add_row("trainable", *[f"{v.result.params_trainable / 1e6:,.1f}M" if v.result else "-" for v in variants])
    if any(v.result and v.result.verdict for v in variants):
        t.add_row("on this GPU", *[badge(v.result.status, short=True) if v.result else
                                   Text((v.error or "-")[:20], style="red") for v in variants])
    return t


def time_line(res: EstimateResult) -> Text | None:
    """'time 1.2 h (1.0-1.4 h) · 3,456 tokens/s per GPU · step 0.52 s · $1.23 ($1.05-1.41)', or why none."""
    from rich.text import Text

    from advisor.units import duration

    t = res.time
    if t is None:
        return Text(f"time: {res.time_note}", style="dim") if res.time_note and res.job else None
    line = Text("time ")
    line.append(f"{duration(t.hours)}", style="bold")
    line.append(f" ({duration(t.hours_low)}–{duration(t.hours_high)}) for {t.tokens:,} tokens · "
                f"{t.tokens_per_s_per_gpu:,.0f} tokens/s per GPU · step {t.step_s:.2f} s · ")
    if t.cost_usd is None:
        line.append(t.cost_note or "no cost", style="dim")
    else:
        line.append(money(t.cost_usd), style="bold")
        line.append(f" ({money(t.cost_low)}–{money(t.cost_high)}) at {money(t.price_usd_hour)}/h × {t.num_gpus}")
    return line


LIMIT_WORDS = {"seq_len": ("longest sequence", "tokens"), "micro_batch": ("largest micro-batch", "sequences")}


def limit_line(lim) -> Text:
    """'longest sequence that fits: 12,288 tokens (21.9 GiB, tight); 12,289 would need 24.1 GiB'."""
    from rich.text import Text

    what, unit = LIMIT_WORDS[lim.knob]
    line = Text(f"{what} that fits: ")
    if lim.value == 0:
        line.append("none", style="bold red")
        line.append(f" (even 1 needs {gib_str(lim.need_bytes)} of {gib_str(lim.capacity_bytes)})")
        if lim.launchable_value is not None:
            line.append(f"; 1-{lim.launchable_value:,} may still run at the card's limit (PyTorch frees "
                        "cached blocks and retries; not promised)")
        return line
    digits = 2  # enough digits that the last fitting value and the first failing one read apart
    while lim.next_need_bytes is not None and digits < 4 and \
            gib(lim.need_bytes, digits) == gib(lim.next_need_bytes, digits):
        digits += 1
    line.append(f"{lim.value:,} {unit}", style="bold")
    line.append(f" ({gib_str(lim.need_bytes, digits)} of {gib_str(lim.capacity_bytes, digits)}, "
                f"{STATUS_WORDS.get(lim.status, lim.status)}")
    if lim.tokens_per_s_per_gpu:
        line.append(f", {lim.tokens_per_s_per_gpu:,.0f} tokens/s per GPU")
    line.append(")")
    if lim.launchable_value is not None:
        span = (f"{lim.next_value:,}" if lim.launchable_value == lim.next_value
                else f"{lim.next_value:,}-{lim.launchable_value:,}")
        line.append(f"; {lim.next_value:,} would need {gib_str(lim.next_need_bytes, digits)} with the allocator's "
                    f"cache ({span} may still run at the card's limit: PyTorch frees cached blocks and retries; "
                    "not promised)")
    elif lim.next_value is not None and lim.next_need_bytes is not None:
        line.append(f"; {lim.next_value:,} would not fit ({gib_str(lim.next_need_bytes, digits)})")
    elif lim.capped_by:
        line.append(f"; the search stops at the {lim.capped_by.replace('_', ' ')} ({lim.cap:,})")
    return line


def stack_line(stack: dict[str, str] | None = None, plan=None) -> str:
    """'torch 2.13.0 · transformers 5.23.0 · peft ... ': the stack the estimate models (of ``plan``)."""
    if stack is None:
        from advisor.service import modelled_stack

        stack = modelled_stack(plan)
    return " · ".join(f"{k} {v}" for k, v in stack.items())


MOMENT_WORDS = {"step": "the training step", "loading": "loading", "evaluation": "evaluation",
                "checkpoint": "saving a checkpoint", "merge_export": "merging the adapter"}


def moments_line(res: EstimateResult) -> Text | None:
    """'run peak: the training step (14.19 GiB); loading 9.7 GiB, evaluation ...; host RAM 15.8 GiB'."""
    from rich.text import Text

    if res.run_peak is None:
        return None
    name, peak = res.run_peak
    line = Text("run peak: ")
    line.append(f"{MOMENT_WORDS.get(name, name)} ({gib_str(peak)})", style="bold")
    others = [f"{MOMENT_WORDS.get(k, k)} {gib_str(m.gpu_bytes, 1)}" for k, m in res.moments.items()]
    if others:
        line.append("; " + ", ".join(others))
    if res.host_ram_bytes:
        where = max(res.moments.items(), key=lambda kv: kv[1].host_bytes)[0] if res.moments else "step"
        if sum(res.breakdown.host.values()) >= res.host_ram_bytes:  # the step's offloaded activations
            where = "step"
        line.append(f" · host RAM needed {gib_str(res.host_ram_bytes, 1)} ({MOMENT_WORDS.get(where, where)})")
    return line


def print_estimate(res: EstimateResult, console=None, limits=()) -> None:
    """`tuneplan estimate`'s table output."""
    from rich.console import Console

    con = console or Console()
    con.print(f"[bold]{res.shape.name}[/] ({res.shape.architecture}, {res.shape.params_total:,} parameters, "
              f"{res.params_trainable:,} trainable)")
    con.print(plan_line(res.plan))
    con.print(breakdown_table(res))
    for line in (verdict_line(res), moments_line(res), time_line(res), *[limit_line(lim) for lim in limits]):
        if line is not None:
            con.print(line)
    if res.time is not None:
        con.print(f"[dim]assumed: {res.time.assumptions}[/]")
    con.print(f"[dim]modelled: {res.breakdown.reserved_model}; stack {stack_line(plan=res.plan)}[/]")
    for n in res.notes:
        con.print(f"[dim]note: {n}[/]")


# --- advice ---------------------------------------------------------------------------------------
OPTION_COLUMNS = ("method", "GPU", "×", "strategy", "batch", "ckpt", "GiB / card", "fits", "time", "cost")
RIGHT_ALIGNED = ("×", "GiB / card", "time", "cost")
WRAPPING_COLUMNS = ("GPU", "fits", "why")  # words that may wrap at a space; the rest keep one line
WHY_WIDTH = 40  # the least width a 'why' column reads at; narrower, the whys follow the table as lines


def short_gpu(name: str) -> str:
    """'NVIDIA GeForce RTX 4090 24GB' -> 'RTX 4090 24GB' (display only)."""
    return name.replace("NVIDIA ", "").replace("GeForce ", "")


def money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def nearest_line(n) -> Text:
    """'sequences of 1,201 tokens (longer examples are cut): 12.0 / 12.0 GiB, tight · 2.3 h · $0.18'."""
    from rich.text import Text

    from advisor.units import duration

    line = Text(f"{n.what}: ")
    line.append(f"{gib(n.need_bytes, 1)} / {gib(n.capacity_bytes, 1)} GiB", style="bold")
    line.append(f" on {short_gpu(n.gpu)}" + (f" × {n.num_gpus}" if n.num_gpus > 1 else "") + ", ")
    line.append(STATUS_WORDS.get(n.status, n.status), style=STATUS_COLOURS.get(n.status, ""))
    if n.hours is not None:
        line.append(f" · {duration(n.hours)}")
    if n.cost_usd is not None:
        line.append(f" · {money(n.cost_usd)}")
    return line


def nearest_row(n) -> list[Any]:
    """A nearest plan as table cells (the app's Advice screen)."""
    from advisor.units import duration

    return [n.what + f" ({short_gpu(n.gpu)}" + (f" × {n.num_gpus})" if n.num_gpus > 1 else ")"),
            f"{gib(n.need_bytes, 1)} / {gib(n.capacity_bytes, 1)}", badge(n.status, short=True),
            duration(n.hours) if n.hours is not None else "-", money(n.cost_usd)]


def job_line(adv) -> str:
    j = adv.job
    return (f"{j['model']} ({j['params_total'] / 1e9:.2f}B parameters) · {j['examples']:,} examples × "
            f"{j['avg_tokens']:,} tokens × {j['epochs']:g} epochs · seq {j['seq_len']} · target batch "
            f"{j['target_batch']}" + (f" · budget ${j['budget_usd']:,.2f}" if j["budget_usd"] else ""))


def recommendation_text(adv, notes: bool = True) -> Text:
    """'Recommended: LoRA on 1 × RTX 4090 · micro-batch 4 × grad-accum 4 · ...' with its reasons."""
    from rich.text import Text

    from advisor.recommend import METHOD_WORDS
    from advisor.units import duration

    text = Text()
    c = adv.choice
    if c is None:
        text.append("Nothing fits", style="bold red")
        text.append(" as asked; the nearest plans that fit are listed below.\n" if adv.nearest else ".\n")
        tried = [o for o in adv.options if o.peak_reserved_bytes]
        if tried:  # why, for the way that came closest
            for r in min(tried, key=lambda o: o.peak_reserved_bytes).reasons:
                text.append(f"  • {r}\n")
    else:
        where = f"{c.num_gpus} × {short_gpu(c.gpu)} ({c.strategy})" if c.num_gpus > 1 else short_gpu(c.gpu)
        text.append("Recommended: ", style="bold green")
        text.append(f"{METHOD_WORDS[c.method]} on {where} · micro-batch {c.micro_batch} × grad-accum "
                    f"{c.grad_accum} · checkpointing {'on' if c.gradient_checkpointing else 'off'} · "
                    f"{gib(c.peak_reserved_bytes, 1)} GiB · {duration(c.hours) if c.hours is not None else '-'} · "
                    f"{money(c.cost_usd)}\n", style="bold")
        for r in c.reasons:
            text.append(f"  • {r}\n")
    if notes:
        for n in adv.notes:
            text.append(f"note: {n}\n", style="dim")
    return text


def option_why(o) -> str:
    if not o.fits:
        return o.reasons[0] if o.reasons else ""
    return next((r for r in o.reasons if r.startswith("over budget")), "")


def option_row(o) -> list[Any]:
    """One option as table cells (the CLI's Table and the TUI's DataTable take the same cells)."""
    from rich.text import Text

    from advisor.units import duration

    fit = Text("yes", style="green") if o.fits else Text("no", style="red")
    if o.fits and getattr(o, "status", None) == "tight":
        fit = Text("tight", style="yellow")
    if o.fits and o.within_budget is False:
        fit = Text("over budget", style="yellow")
    return [o.method, short_gpu(o.gpu), str(o.num_gpus), o.strategy, f"{o.micro_batch}×{o.grad_accum}",
            "on" if o.gradient_checkpointing else "off",
            f"{gib(o.peak_reserved_bytes, 1)} / {gib(o.capacity_bytes, 1)}", fit,
            duration(o.hours) if o.hours is not None else "-", money(o.cost_usd)]


def options_table(adv, limit: int | None = None):
    """The options as a table that reads at any width: numbers never wrap (the GPU and the fit words wrap at
    spaces); where the 'why' column would squeeze the rest below their words (80 columns), the whys follow
    the table as lines instead."""
    return _OptionsTable(adv.options[:limit] if limit else adv.options)


class _OptionsTable:
    """A rich renderable: the options table laid out for the width it is printed at."""

    def __init__(self, shown) -> None:
        self.shown = list(shown)
        self.whys = [option_why(o) for o in self.shown]

    def table(self, with_why: bool) -> Table:
        from rich import box
        from rich.table import Table

        t = Table(title="Options", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
        for col in OPTION_COLUMNS + (("why",) if with_why else ()):
            t.add_column(col, justify="right" if col in RIGHT_ALIGNED else "left",
                         no_wrap=col not in WRAPPING_COLUMNS, overflow="fold")
        for o, why in zip(self.shown, self.whys, strict=True):
            t.add_row(*option_row(o), *([why] if with_why else []))
        return t

    def __rich_console__(self, console, options):
        from rich.measure import Measurement
        from rich.text import Text

        narrow = self.table(with_why=False)
        if any(self.whys) and Measurement.get(console, options, narrow).maximum + 1 + WHY_WIDTH <= options.max_width:
            yield self.table(with_why=True)
            return
        yield narrow
        for n, (o, why) in enumerate(zip(self.shown, self.whys, strict=True), 1):
            if why:
                where = f"{o.num_gpus} × {short_gpu(o.gpu)}" if o.num_gpus > 1 else short_gpu(o.gpu)
                yield Text(f"  {n}. {o.method} on {where}: {why}", style="dim")


def guide_text(g) -> Text:
    """The RAG / fine-tune verdict with its reasons and next steps."""
    from rich.text import Text

    text = Text()
    text.append("Verdict: ", style="bold")
    text.append(f"{g.verdict}\n", style="bold green")
    for r in g.reasons:
        text.append(f"  • {r}\n")
    text.append("Next steps\n", style="bold")
    for i, s in enumerate(g.next_steps, 1):
        text.append(f"  {i}. {s}\n")
    return text


def exact_table(analytic: EstimateResult, exact: EstimateResult) -> Table:
    """Analytic vs exact (simulate) estimate of the same plan, component by component."""
    from rich.table import Table
    from rich.text import Text

    a, s = analytic.breakdown, exact.breakdown
    t = Table(title="analytic vs exact (GiB)", title_justify="left", box=None, header_style="bold",
              caption_style="dim")
    for col in ("component", "analytic", "exact"):
        t.add_column(col, justify="left" if col == "component" else "right")
    for k in dict.fromkeys([*a.components, *s.components]):
        t.add_row(label(k), gib(a.components.get(k, 0)), gib(s.components.get(k, 0)))
    t.add_row(Text("peak allocated", style="bold"), gib(a.peak_allocated_bytes), gib(s.peak_allocated_bytes))
    t.add_row(Text("peak reserved", style="bold"), gib(a.peak_reserved_bytes), gib(s.peak_reserved_bytes))
    t.caption = "\n".join(s.notes)
    t.caption_justify = "left"
    return t


# --- serving with vLLM (service.serve, service.rank_serving) ---------------------------------------------
SERVE_LABELS = {"weights": "weights", "lora_adapters": "LoRA slots (--enable-lora)",
                "activations": "activation peak (profile run)", "non_torch": "non-torch (CUDA, NCCL buffers)",
                "kv_cache": "KV cache"}


def at_once(est) -> str:
    """'54 requests of 8,192 tokens at once': whole requests the KV cache holds at max_model_len, capped by
    max_num_seqs (vLLM schedules no more), with vLLM's own 'Maximum concurrency' figure."""
    whole = int(est.max_concurrency)
    words = f"{min(whole, est.max_num_seqs):,} requests of {est.max_model_len:,} tokens at once"
    if whole > est.max_num_seqs:
        return f"{words} (max_num_seqs; the cache would hold {whole:,})"
    return f"{words} (vLLM: {est.max_concurrency:,.2f}x)"


def serve_table(res) -> Table:
    """vLLM's share of one GPU, part by part: the budget, weights, activation and non-torch reserve, KV cache."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    e = res.estimate
    t = Table(title=f"vLLM's share of {'each' if e.tensor_parallel > 1 else 'the'} GPU", title_justify="left",
              box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    t.add_column("part")
    t.add_column("GiB", justify="right")
    t.add_row(Text(f"budget ({e.gpu_memory_utilization:g} × {gib(res.cuda_total_bytes)} GiB)", style="bold"),
              Text(gib(e.budget_bytes), style="bold"))
    for k, v in res.breakdown.items():
        t.add_row(SERVE_LABELS.get(k, k), gib(v), style="bold" if k == "kv_cache" else None)
    return t


def serve_summary(res) -> Text:
    """The KV cache in GiB, blocks and tokens and the requests it holds at once, or why vLLM cannot start."""
    from rich.text import Text

    e = res.estimate
    text = Text()
    where = f"{e.tensor_parallel} × {short_gpu(res.gpu.name)}" if e.tensor_parallel > 1 else short_gpu(res.gpu.name)
    text.append(f"vLLM {res.vllm_version} on {where}: ", style="bold")
    if e.problem is not None:
        text.append("cannot start", style="bold red")
        text.append(f" — {e.problem.message}")
        return text
    text.append(f"KV cache {gib(e.kv_cache_bytes)} GiB = {e.kv_cache_tokens:,} tokens in {e.num_blocks:,} blocks "
                f"of {e.block_size}\n")
    text.append(at_once(e), style="bold green")
    return text


def serve_lines(res) -> Text:
    """serve_summary and, when vLLM can start, the `vllm serve` command (the app shows them for an inference
    plan)."""
    import shlex

    text = serve_summary(res)
    if res.problem is None:
        text.append("\n")
        text.append(shlex.join(res.command), style="cyan")
    return text


def serve_words(res) -> str:
    """'bf16 weights · KV cache bf16 · max_model_len 8,192 · max_num_seqs 1,024 · 1 GPU'."""
    e, i = res.estimate, res.plan.inference
    weights = i.precision if e.weight_quant == "none" else e.weight_quant
    kv = i.precision if e.kv_cache_dtype == "auto" else e.kv_cache_dtype
    return (f"{weights} weights · KV cache {kv} · max_model_len {e.max_model_len:,} · max_num_seqs "
            f"{e.max_num_seqs:,} · {e.tensor_parallel} GPU{'s' * (e.tensor_parallel > 1)}")


def print_serve(res, console) -> None:
    """`tuneplan estimate --task inference --engine vllm`'s output."""
    import shlex

    e, s = res.estimate, res.shape
    console.print(f"[bold]{s.name}[/] ({s.architecture}, {s.params_total:,} parameters)")
    console.print(f"serving with vLLM: {serve_words(res)}")
    console.print(serve_table(res))
    console.print(serve_summary(res))
    console.print(shlex.join(res.command), style="cyan", soft_wrap=True)
    console.print(f"[dim]nvidia-smi: about {gib(e.budget_bytes + res.context_bytes)} GiB per GPU (the budget and "
                  f"the CUDA context; CUDA graphs are captured after the cache is sized and add to it)[/]")
    for n in (*e.notes, *res.notes):
        console.print(f"[dim]note: {n}[/]")


# a VllmEstimate's status in the options table (8 columns wide) and what it means
SERVE_STATUS = {"weights_too_big": ("weights", "the weights do not fit one GPU"),
                "no_kv_room": ("no room", "nothing is left of the budget for the KV cache"),
                "max_model_len_too_long": ("too long", "one request of the context does not fit the KV cache")}


def serving_options_table(advice) -> Table:
    """recommend --serving's options: card × count, price per hour, per-GPU weights and KV cache, the requests
    held at once at the context, and whether that serves the question (80 columns)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, title_justify="left",
              title=f"Options (per GPU; requests of {advice.context:,} tokens)")
    for col in ("GPU", "×", "$/h", "weights", "KV GiB", "KV tokens", "at once", "serves"):
        t.add_column(col, justify="left" if col in ("GPU", "serves") else "right")
    for o in advice.options:
        e = o.estimate
        if advice.serves(o):
            serves = Text("yes", style="green")
        elif e.fits:
            serves = Text("too few", style="yellow")
        else:
            serves = Text(SERVE_STATUS[e.status][0], style="red")
        t.add_row(short_gpu(o.gpu.name), str(o.count), "-" if o.usd_per_hour is None else f"{o.usd_per_hour:.2f}",
                  gib(e.weights_bytes, 1), gib(e.kv_cache_bytes, 1), f"{e.kv_cache_tokens:,}",
                  f"{e.max_concurrency:.1f}" if e.fits else "-", serves)
    shown = {o.estimate.status for o in advice.options if not o.estimate.fits}
    words = [f"{SERVE_STATUS[k][0]}: {SERVE_STATUS[k][1]}" for k in SERVE_STATUS if k in shown]
    if any(o.estimate.fits and not advice.serves(o) for o in advice.options):
        words.insert(0, f"too few: holds fewer than {advice.concurrency:,} at once")
    if words:
        t.caption, t.caption_justify, t.caption_style = "; ".join(words), "left", "dim"
    return t


def print_serving_advice(advice, console) -> None:
    """`tuneplan recommend MODEL --serving`'s output."""
    import shlex

    where = f" on {short_gpu(advice.gpu.name)}" if advice.gpu else ""
    console.print(f"[bold]Serving {advice.model}[/] ({advice.params_total / 1e9:.2f}B parameters) with vLLM "
                  f"{advice.vllm_version}{where}: {advice.concurrency:,} request{'s' * (advice.concurrency != 1)} of "
                  f"{advice.context:,} tokens at once · weights {advice.weights} · KV cache {advice.kv_cache_dtype} "
                  f"· gpu_memory_utilization {advice.gpu_memory_utilization:g}")
    console.print()
    c = advice.choice
    if c is None:
        where = "no count of this card" if advice.gpu else "no priced NVIDIA card at 1, 2, 4 or 8 GPUs"
        console.print(f"[bold red]Nothing serves it:[/] {where} holds that many requests of that length; lower "
                      "--context or --concurrency, serve quantized --weights (fp8, awq), or --kv-cache-dtype fp8.")
    else:
        e = c.estimate
        gpus = f"{c.count} × {short_gpu(c.gpu.name)}" if c.count > 1 else short_gpu(c.gpu.name)
        price = f" · {money(c.usd_per_hour)}/h" if c.usd_per_hour is not None else ""
        console.print(f"[bold green]Recommended:[/] [bold]{gpus}{price}[/] · KV cache {gib(e.kv_cache_bytes)} GiB "
                      f"per GPU = {e.kv_cache_tokens:,} tokens · {at_once(e)}")
        console.print(f"  {shlex.join(advice.command(c))}", style="cyan", soft_wrap=True)
    if advice.options:
        console.print(serving_options_table(advice))
    if advice.gpu is None:
        console.print(f"[dim]assumed: cheapest per hour first (prices as of {advice.prices_as_of}); tensor parallel "
                      "over the count, within one node; the KV cache as vLLM sizes it at start-up "
                      "(docs/serving.md); speed is not modelled (tensor parallelism over PCIe cards is slower than "
                      "over NVLink)[/]")
