"""Serving on the command line: `estimate --task inference --engine vllm|transformers` and `recommend
--serving`. The numbers come from advisor.service (serve, rank_serving); the tables from advisor.present.

The flags carry vLLM's own names (`--gpu-memory-utilization`, `--max-model-len`, `--tensor-parallel-size`,
`--kv-cache-dtype`, `--max-num-seqs`, `--enable-lora`, `--max-lora-rank`), so what is estimated here is what
`vllm serve` is started with.
"""

from __future__ import annotations

import argparse
import json

from advisor.problems import Problem, Problems
from advisor.service import (
    DEFAULT_CONCURRENCY,
    DEFAULT_CONTEXT,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    ENGINES,
    KV_CACHE_DTYPES,
    SERVING_WEIGHTS,
)
from advisor.serving import VLLM_LORA_RANKS, lora_rank_problem

# estimate: the engine's flags (None: not given) -> the words of its help
VLLM_FLAGS = ("gpu_memory_utilization", "max_model_len", "tensor_parallel", "max_num_seqs", "enable_lora",
              "max_lora_rank", "max_loras")
# recommend --serving: its own question; the training advice's flags are not read there
SERVING_FLAGS = ("context", "concurrency", "weights", "kv_cache_dtype", "gpu_memory_utilization", "enable_lora",
                 "max_lora_rank")
TRAINING_FLAGS = ("seq", "batch", "examples", "avg_tokens", "epochs", "budget", "optimizer", "lora_r",
                  "transformers", "save")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _add_vllm_knobs(p: argparse._ActionsContainer) -> None:  # a parser or an argument group
    """The flags estimate and recommend --serving share (vLLM's names)."""
    p.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                   help=f"vLLM: share of the GPU's memory it takes (default {DEFAULT_GPU_MEMORY_UTILIZATION:g})")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="vLLM's KV cache: auto (the model's dtype, default) or fp8 (1 byte)")
    p.add_argument("--enable-lora", action="store_true", default=None,
                   help="vLLM: serve LoRA adapters beside the base (preallocates their slots)")
    p.add_argument("--max-lora-rank", type=int, metavar="R", help="vLLM: the largest adapter rank, one of "
                   f"{', '.join(map(str, VLLM_LORA_RANKS))} (vLLM's choices; default 16)")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """estimate's serving flags (read with --task inference)."""
    g = p.add_argument_group("inference engine (--task inference)")
    g.add_argument("--engine", choices=ENGINES,
                   help="which engine serves it: vllm (default when a GPU is named: vLLM's start-up sizing, "
                   "KV cache in blocks and the requests it holds at once) or transformers (the default without a "
                   "GPU, with --mode simulate or --max: Hugging Face generate, prefill and a cache of --seq tokens "
                   "for --batch sequences)")
    _add_vllm_knobs(g)
    g.add_argument("--max-model-len", type=int, metavar="N", help="vLLM: tokens per request (default: --seq)")
    g.add_argument("--tensor-parallel", "--tensor-parallel-size", dest="tensor_parallel", type=int, metavar="N",
                   help="vLLM: GPUs the model is split over (default: --gpus)")
    g.add_argument("--max-num-seqs", type=int, metavar="N",
                   help="vLLM: most requests scheduled at once (default: vLLM's for the card, 1024 on >= 70 GiB "
                   "cards other than the A100, else 256)")
    g.add_argument("--max-loras", type=int, metavar="N", help="vLLM: adapters in one batch (default 1)")


def add_serving_arguments(p: argparse.ArgumentParser) -> None:
    """recommend --serving's question: model, context, requests at once, weight precision."""
    g = p.add_argument_group("serving (--serving: vLLM)")
    g.add_argument("--serving", action="store_true",
                   help="answer a serving question instead: which GPU (and how many, tensor parallel) serves the "
                   "model with vLLM at --context tokens, --concurrency requests at once, cheapest first; with "
                   "--gpu, that card")
    g.add_argument("--context", type=int, metavar="N", help=f"tokens per request, prompt + output (default "
                   f"{DEFAULT_CONTEXT:,}, or the model's maximum when shorter)")
    g.add_argument("--concurrency", type=int, metavar="N",
                   help=f"requests of --context tokens served at once (default {DEFAULT_CONCURRENCY})")
    g.add_argument("--weights", choices=list(SERVING_WEIGHTS),
                   help="weight precision served: bf16 (default), fp8, int8 (w8a8), awq, gptq (int4), nf4 "
                   "(bitsandbytes)")
    _add_vllm_knobs(g)


# --- estimate --task inference ---------------------------------------------------------------------

def kv_cache_into_plan(a: argparse.Namespace, data: dict) -> None:
    """--kv-cache-dtype is the plan's inference.kv_cache_dtype (both engines size the cache with it)."""
    if getattr(a, "kv_cache_dtype", None) is not None and data.get("task") == "inference":
        data.setdefault("inference", {})["kv_cache_dtype"] = a.kv_cache_dtype


def engine_of(a: argparse.Namespace, ctx) -> str | None:
    """The engine estimate models: None for a training plan; the named one, or the default
    (service.default_engine; transformers with --mode simulate or --max). Flags that the chosen engine
    does not read are a problem, all at once."""
    from advisor import service

    given = [d for d in (*VLLM_FLAGS, "engine", "kv_cache_dtype") if getattr(a, d, None) not in (None, False)]
    if ctx.plan.task != "inference":
        if given:
            raise Problems(Problem(f"{', '.join(_flag(d) for d in given)}: for serving, not training", None,
                                   "add --task inference"))
        return None
    engine = a.engine
    if engine is None:
        engine = "transformers" if (a.mode != "analytic" or a.max) else service.default_engine(ctx)
    problems = []
    if engine == "transformers":
        vllm_only = [_flag(d) for d in VLLM_FLAGS if getattr(a, d, None) not in (None, False)]
        if vllm_only:
            problems.append(Problem(f"{', '.join(vllm_only)}: vLLM's settings, and the estimate is for "
                                    "transformers' generate (--engine transformers)", None,
                                    "add --engine vllm (and --gpu)" if ctx.gpu is None else "add --engine vllm"))
    else:
        if a.max_lora_rank is not None and (bad_rank := lora_rank_problem(a.max_lora_rank, "serving.max_lora_rank")):
            problems.append(bad_rank)  # vLLM's parser refuses it, with --enable-lora or without
        if a.mode != "analytic":
            problems.append(Problem("--mode simulate traces transformers' generate; vLLM's estimate is analytic",
                                    None, "drop --mode simulate, or use --engine transformers"))
        if a.max:
            problems.append(Problem("--max searches transformers' generate; vLLM's estimate gives the longest "
                                    "--max-model-len itself", None, "drop --max, or use --engine "
                                    "transformers"))
    if problems:
        raise Problems(problems)
    return engine


def estimate_vllm(a: argparse.Namespace, ctx) -> int:
    """estimate --task inference --engine vllm: vLLM's start-up budget, KV cache and concurrency; a model it
    cannot hold (or one request of --max-model-len) is one problem, exit 2."""
    from advisor import present, service

    res = service.serve(ctx, gpu_memory_utilization=a.gpu_memory_utilization, max_model_len=a.max_model_len,
                        tensor_parallel=a.tensor_parallel, max_num_seqs=a.max_num_seqs,
                        enable_lora=bool(a.enable_lora), max_lora_rank=a.max_lora_rank, max_loras=a.max_loras)
    if res.problem is not None:
        raise Problems(res.problem)
    if a.json:
        print(json.dumps(res.as_json(), indent=2))
    else:
        from rich.console import Console

        present.print_serve(res, Console())
    return 0


# --- recommend --serving -----------------------------------------------------------------------------

def serving_flags_without_serving(a: argparse.Namespace) -> list[Problem]:
    """recommend's serving flags given without --serving: a problem (they would be ignored)."""
    given = [_flag(d) for d in ("context", "concurrency", "weights", "kv_cache_dtype", "gpu_memory_utilization",
                                "enable_lora", "max_lora_rank") if getattr(a, d, None) not in (None, False)]
    if given:
        return [Problem(f"{', '.join(given)}: serving flags, not read by the training advice", None,
                        "add --serving to ask the serving question")]
    return []


def cmd_recommend_serving(a: argparse.Namespace) -> int:
    """recommend --serving: without --gpu, the cheapest cards and counts that serve --concurrency requests of
    --context tokens with vLLM; with --gpu, that card at 1, 2, 4, 8 GPUs (--gpus: that count). Exit 0 when
    something serves it, 1 when nothing does."""
    from advisor import present, service
    from advisor.cli.common import take_model

    take_model(a)
    problems: list[Problem] = []
    if not a.model:
        problems.append(Problem("no model given", "model.ref", "name it: `tuneplan recommend MODEL --serving`"))
    training = [_flag(d) for d in TRAINING_FLAGS if getattr(a, d, None) is not None]
    if getattr(a, "methods", None) not in (None, "full,lora,qlora"):
        training.append("--methods")
    if training:
        problems.append(Problem(f"{', '.join(training)}: the training job's flags, not read with --serving", None,
                                "give the serving question with --context (tokens per request) and --concurrency "
                                "(requests at once)"))
    bad_rank = lora_rank_problem(a.max_lora_rank, "serving.max_lora_rank") if a.max_lora_rank is not None else None
    if bad_rank is not None:  # vLLM's parser refuses it, with --enable-lora or without
        problems.append(bad_rank)
    gpu = shape = None
    if a.gpu is not None:
        try:
            gpu = service.find_gpu(a.gpu)
        except Problems as e:
            problems += e.items
    if a.model:
        try:
            shape = service.resolve_model(a.model, a.revision, a.trust_remote_code)
        except Problems as e:
            problems += e.items
    advice = None
    if shape is not None:  # the question's own mistakes, with the rest
        try:
            advice = service.rank_serving(shape, a.model, context=a.context, concurrency=a.concurrency,
                                          weights=a.weights or "bf16", kv_cache_dtype=a.kv_cache_dtype or "auto",
                                          gpu_memory_utilization=a.gpu_memory_utilization, gpu=gpu, gpus=a.gpus,
                                          enable_lora=bool(a.enable_lora),
                                          max_lora_rank=None if bad_rank else a.max_lora_rank)  # said above
        except Problems as e:
            problems += e.items
    if problems or advice is None:
        raise Problems(problems)
    if a.json:
        print(json.dumps(advice.as_json(), indent=2))
    else:
        from rich.console import Console

        present.print_serving_advice(advice, Console())
    return 0 if advice.choice is not None else 1


def print_engine(engine: str) -> None:
    """Which engine a transformers estimate models, and how to get the other."""
    from rich.console import Console

    Console().print(f"[dim]engine: {engine} (Hugging Face generate: the prefill, and a cache of --seq tokens for "
                    "--batch sequences); --engine vllm --gpu NAME sizes vLLM's KV cache[/]")
