"""The service's serving questions (re-exported by :mod:`advisor.service`, which the front ends call): a plan
served with vLLM (its KV cache at start-up, advisor.serving) and which GPUs to rent for a serving question."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from advisor.problems import Problem, Problems

if TYPE_CHECKING:
    from advisor.gpus import Gpu
    from advisor.model import ModelShape
    from advisor.service import PlanContext
    from advisor.spec import Plan

# --- serving with vLLM (advisor.serving): its KV cache at start-up, and which GPUs to rent ------------------

ENGINES = ("vllm", "transformers")  # estimate --task inference: vLLM's start-up sizing, or HF generate
KV_CACHE_DTYPES = ("auto", "fp8")
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
DEFAULT_CONTEXT = 8192  # recommend --serving: tokens per request (prompt + output), capped at the model's maximum
DEFAULT_CONCURRENCY = 1
SERVING_COUNTS = (1, 2, 4, 8)  # tensor parallel sizes tried, within one node
# recommend --serving --weights -> advisor.serving's weight_quant (bf16: the checkpoint's 16-bit weights)
SERVING_WEIGHTS = {"bf16": "none", "fp8": "fp8", "int8": "int8", "awq": "awq", "gptq": "gptq", "nf4": "bnb-nf4"}
# the plan's inference.weight_quant (transformers' LLM.int8 / bitsandbytes NF4) as vLLM stores them
_PLAN_WEIGHTS = {"none": "none", "int8": "int8", "nf4": "bnb-nf4"}
_PLAN_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# `vllm serve` flags for each weight storage (awq / gptq / int8 w8a8 are pre-quantized checkpoints: vLLM reads
# the method from their config)
_QUANT_FLAG = {"fp8": ["--quantization", "fp8"], "bnb-nf4": ["--quantization", "bitsandbytes"]}


def default_engine(ctx: PlanContext) -> str:
    """The engine `estimate --task inference` models when none is named: vLLM when the plan names a GPU
    (most people serve with vLLM), transformers' generate otherwise (no card to size vLLM's share of, or an
    Apple GPU, which vLLM does not serve on)."""
    gpu = ctx.gpu
    return "vllm" if gpu is not None and ctx.plan.hardware.device == "cuda" and gpu.vendor != "apple" \
        else "transformers"


def _serving_problems(e: Problems, fields: dict[str, str]) -> Problems:
    """advisor.serving's problems on the fields the question has (its keyword names -> plan or question fields)."""
    return Problems([Problem(p.what, fields.get(p.field or "", f"serving.{p.field}" if p.field else None),
                             p.fix, p.change) for p in e.items])


def vllm_command(model: str, est, *, lora_rank: int | None = None, max_num_seqs: int | None = None,
                 dtype: str = "auto") -> list[str]:
    """The `vllm serve` command the estimate is for, as an argument list (display it with shlex.join);
    ``lora_rank``: with --enable-lora and that --max-lora-rank."""
    cmd = ["vllm", "serve", model, "--max-model-len", str(est.max_model_len), "--gpu-memory-utilization",
           f"{est.gpu_memory_utilization:g}", "--tensor-parallel-size", str(est.tensor_parallel)]
    cmd += _QUANT_FLAG.get(est.weight_quant, [])
    if est.kv_cache_dtype != "auto":
        cmd += ["--kv-cache-dtype", est.kv_cache_dtype]
    if dtype != "auto":
        cmd += ["--dtype", dtype]
    if max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if lora_rank is not None:
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank)]
    return cmd


@dataclass
class ServeResult:
    """What `vllm serve` finds at start-up for a plan (advisor.serving.VllmEstimate, per GPU), with the
    command that starts it and the memory outside vLLM's budget (the CUDA context)."""

    plan: Plan
    shape: ModelShape
    gpu: Gpu
    estimate: Any  # advisor.serving.VllmEstimate
    command: list[str]
    context_bytes: int  # CUDA context (+ NCCL) per GPU, before vLLM takes its share
    cuda_total_bytes: int  # the card's memory as torch sees it (vLLM's total_memory)
    lora_rank: int | None = None
    engine: str = "vllm"
    notes: list[str] = field(default_factory=list)

    @property
    def breakdown(self) -> dict[str, int]:
        """vLLM's share of the card by part (per GPU); with room left they add up to the budget."""
        e = self.estimate
        parts = {"weights": e.weights_bytes, "lora_adapters": e.lora_bytes, "activations": e.activation_bytes,
                 "non_torch": e.non_torch_bytes, "kv_cache": e.kv_cache_bytes}
        return {k: v for k, v in parts.items() if v or k in ("weights", "kv_cache")}

    @property
    def problem(self) -> Problem | None:
        return self.estimate.problem

    @property
    def vllm_version(self) -> str:
        from advisor.serving import VLLM_VERSION

        return VLLM_VERSION

    def as_json(self) -> dict[str, Any]:
        e, s = self.estimate, self.shape
        bd = self.breakdown
        allocated = sum(bd.values())
        return {
            "engine": self.engine,
            "model": {"name": s.name, "model_type": s.model_type, "architecture": s.architecture,
                      "params_total": s.params_total, "params_trainable": 0, "num_layers": s.num_layers,
                      "hidden_size": s.hidden_size, "vocab_size": s.vocab_size},
            "plan": self.plan.model_dump(mode="json"),
            "gpu": {"name": self.gpu.name, "id": self.gpu.id, "memory_bytes": self.gpu.memory_bytes,
                    "cuda_total_bytes": self.cuda_total_bytes, "count": e.tensor_parallel},
            "breakdown": bd,
            "overhead": {"cuda_context": self.context_bytes},
            "peak_allocated_bytes": allocated,
            "peak_reserved_bytes": allocated + self.context_bytes,
            "kv_cache_bytes": e.kv_cache_bytes,
            "kv_cache_tokens": e.kv_cache_tokens,
            "max_concurrency": e.max_concurrency,
            "max_model_len": e.max_model_len,
            "fits": e.fits,
            "status": e.status,
            "problem": e.problem.as_json() if e.problem else None,
            "command": self.command,
            "vllm": e.as_json(),
            "notes": [*e.notes, *self.notes],
        }


def serve(ctx: PlanContext, *, gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
          tensor_parallel: int | None = None, max_num_seqs: int | None = None, enable_lora: bool = False,
          max_lora_rank: int | None = None, max_loras: int | None = None) -> ServeResult:
    """The plan (task inference, on its GPU) served with vLLM: advisor.serving.serving_estimate with the
    plan's precision, weights and KV cache dtype; ``max_model_len`` None: the plan's seq_len;
    ``tensor_parallel`` None: its GPU count. Bad inputs raise Problems on the field they came from (the
    plan's, or ``serving.<name>`` for an argument given here); a model vLLM cannot hold comes back with
    ``estimate.status`` and ``problem`` set, on the same fields."""
    from advisor.serving import CONTEXT_BYTES_ONE_GPU, CONTEXT_BYTES_TP, cuda_total_bytes, serving_estimate

    plan, gpu = ctx.plan, ctx.gpu
    if plan.task != "inference":
        raise Problems(Problem("a serving estimate is for an inference plan", "task", "use --task inference"))
    if gpu is None or plan.hardware.device != "cuda":
        raise Problems(Problem("vLLM sizes its KV cache from the GPU's memory: the plan names no GPU",
                               "hardware.gpu", "name one (--gpu), or use the transformers engine"))
    if gpu.vendor == "apple":
        raise Problems(Problem(f"vLLM does not serve on {gpu.name} (it runs on NVIDIA and AMD GPUs)", "hardware.gpu",
                               "use the transformers engine, or name an NVIDIA or AMD GPU"))
    inf = plan.inference
    fields = {"max_model_len": "serving.max_model_len" if max_model_len is not None else "inference.seq_len",
              "tensor_parallel": "serving.tensor_parallel" if tensor_parallel is not None else "hardware.gpus",
              "weight_quant": "inference.weight_quant", "dtype": "inference.precision", "gpu_memory_bytes":
              "hardware.gpu"}
    tp = plan.hardware.gpus if tensor_parallel is None else tensor_parallel
    dtype = _PLAN_DTYPE[inf.precision]
    rank = 16 if max_lora_rank is None else max_lora_rank
    total = cuda_total_bytes(gpu)
    try:
        est = serving_estimate(
            ctx.shape, total,
            gpu_memory_utilization=DEFAULT_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None
            else gpu_memory_utilization,
            max_model_len=inf.seq_len if max_model_len is None else max_model_len, tensor_parallel=tp,
            weight_quant=_PLAN_WEIGHTS[inf.weight_quant], kv_cache_dtype=inf.kv_cache_dtype, dtype=dtype,
            max_num_seqs=max_num_seqs, enable_lora=enable_lora, max_lora_rank=rank,
            max_loras=1 if max_loras is None else max_loras, gpu_name=gpu.name)
    except Problems as e:
        raise _serving_problems(e, fields) from None
    if est.problem is not None:
        est = _with_problem(est, _serving_problems(Problems(est.problem), fields).items[0])
    cmd = vllm_command(plan.model.ref, est, lora_rank=rank if enable_lora else None, max_num_seqs=max_num_seqs,
                       dtype="auto" if dtype == "bfloat16" else dtype)
    res = ServeResult(plan, ctx.shape, gpu, est, cmd, CONTEXT_BYTES_ONE_GPU if tp == 1 else CONTEXT_BYTES_TP,
                      total, rank if enable_lora else None)
    if inf.weight_quant == "int8":
        res.notes.append("int8 weights: vLLM serves an int8 (w8a8) checkpoint; bitsandbytes' LLM.int8 is "
                         "transformers' way")
    if est.fits and inf.batch > 1 and est.max_concurrency < inf.batch:
        res.notes.append(f"{inf.batch} sequences at once (--batch) do not fit: the KV cache holds "
                         f"{est.max_concurrency:.2f} requests of {est.max_model_len:,} tokens")
    return res


def _with_problem(est, problem: Problem):
    from dataclasses import replace

    return replace(est, problem=problem)


@dataclass
class ServingAdvice:
    """recommend --serving: which GPUs (and how many, tensor parallel) serve the model with vLLM at
    ``context`` tokens per request, ``concurrency`` requests at once; cheapest per hour first. With a GPU
    named: that card at each count (``options`` holds every count checked, fitting or not)."""

    model: str
    params_total: int
    context: int
    concurrency: int
    weights: str
    kv_cache_dtype: str
    gpu_memory_utilization: float
    options: list[Any]  # advisor.serving.ServingOption
    choice: Any = None  # the first option that serves the question
    gpu: Gpu | None = None  # the card asked about (None: every priced card ranked)
    prices_as_of: str = ""
    commands: dict[int, list[str]] = field(default_factory=dict)  # id(option) -> `vllm serve` command

    @property
    def vllm_version(self) -> str:
        from advisor.serving import VLLM_VERSION

        return VLLM_VERSION

    def serves(self, option) -> bool:
        return option.estimate.fits and option.estimate.max_concurrency >= self.concurrency

    def command(self, option) -> list[str]:
        return self.commands[id(option)]

    def as_json(self) -> dict[str, Any]:
        def opt(o):
            return {**o.as_json(), "serves": self.serves(o), "command": self.command(o)}

        return {
            "engine": "vllm", "vllm_version": self.vllm_version,
            "question": {"model": self.model, "params_total": self.params_total, "context": self.context,
                         "concurrency": self.concurrency, "weights": self.weights,
                         "kv_cache_dtype": self.kv_cache_dtype, "gpu_memory_utilization": self.gpu_memory_utilization,
                         "gpu": self.gpu.name if self.gpu else None},
            "choice": opt(self.choice) if self.choice is not None else None,
            "options": [opt(o) for o in self.options],
            "prices_as_of": self.prices_as_of,
        }


def rank_serving(shape: ModelShape, ref: str, *, context: int | None = None, concurrency: int | None = None,
                 weights: str = "bf16", kv_cache_dtype: str = "auto", gpu_memory_utilization: float | None = None,
                 gpu: Gpu | None = None, gpus: int | None = None, enable_lora: bool = False,
                 max_lora_rank: int | None = None, limit: int = 10) -> ServingAdvice:
    """Which GPU serves ``shape`` (hub id or path ``ref``, for the command) with vLLM at ``context`` tokens per
    request (default DEFAULT_CONTEXT, or the model's maximum when shorter), ``concurrency`` at once: without
    ``gpu``, every priced NVIDIA card at 1, 2, 4, 8 GPUs (``gpus``: that count only) through
    advisor.serving.rank_serving_setups, cheapest per hour first; with ``gpu``, that card at each count.
    Problems land on the question's fields (serving.context, serving.concurrency, serving.weights, ...)."""
    from advisor.gpus import gpu_table, prices_as_of
    from advisor.serving import ServingOption, cuda_total_bytes, is_mla, rank_serving_setups, serving_estimate

    fields = {"max_model_len": "serving.context", "concurrency": "serving.concurrency", "tensor_parallel": "job.gpus",
              "weight_quant": "serving.weights", "gpu_memory_bytes": "hardware.gpu"}
    bad = []
    if weights not in SERVING_WEIGHTS:
        bad.append(Problem(f"unknown weights {weights!r}", "serving.weights", f"one of: {', '.join(SERVING_WEIGHTS)}"))
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1):
        bad.append(Problem(f"must be a whole number of GPUs, at least 1 (got {gpus!r})", "job.gpus"))
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        bad.append(Problem(f"must be a positive number of requests (got {concurrency!r})", "serving.concurrency"))
    if context is None:
        context = min(DEFAULT_CONTEXT, shape.max_position) if shape.max_position else DEFAULT_CONTEXT
    concurrency = DEFAULT_CONCURRENCY if concurrency is None else concurrency
    util = DEFAULT_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None else gpu_memory_utilization
    rank = 16 if max_lora_rank is None else max_lora_rank
    kw: dict[str, Any] = dict(gpu_memory_utilization=util, max_model_len=context,
                              weight_quant=SERVING_WEIGHTS.get(weights, "none"), kv_cache_dtype=kv_cache_dtype,
                              enable_lora=enable_lora, max_lora_rank=rank)
    counts = SERVING_COUNTS if gpus is None else (gpus,)
    probe = gpu or next(iter(gpu_table().values()))
    try:  # every mistake in the question at once, before the search (advisor.serving checks its own)
        serving_estimate(shape, cuda_total_bytes(probe), tensor_parallel=gpus if isinstance(gpus, int) and
                         gpus >= 1 else 1, gpu_name=probe.name, **kw)
    except Problems as e:
        bad += _serving_problems(e, fields).items
    if bad:
        raise Problems(bad)
    advice = ServingAdvice(shape.name, shape.params_total, context, concurrency, weights, kv_cache_dtype, util, [],
                           gpu=gpu, prices_as_of=prices_as_of())
    try:
        if gpu is None:
            advice.options = rank_serving_setups(shape, concurrency=concurrency, counts=counts, limit=limit, **kw)
        else:
            for n in counts:
                if gpus is None and (n > gpu.gpus_per_node or shape.num_heads % n or (not is_mla(shape) and (
                        shape.num_kv_heads % n if shape.num_kv_heads >= n else n % shape.num_kv_heads))):
                    continue
                est = serving_estimate(shape, cuda_total_bytes(gpu), tensor_parallel=n, gpu_name=gpu.name, **kw)
                price = round(n * gpu.price_usd_hour, 4) if gpu.price_usd_hour is not None else None
                advice.options.append(ServingOption(gpu, n, est, price))
                if est.fits and est.max_concurrency >= concurrency:
                    break  # more of the same card only costs more
    except Problems as e:
        raise _serving_problems(e, fields) from None
    for o in advice.options:
        advice.commands[id(o)] = vllm_command(ref, o.estimate, lora_rank=rank if enable_lora else None)
    advice.choice = next((o for o in advice.options if advice.serves(o)), None)
    return advice
