"""Serving estimate for vLLM: what its start-up memory profiling leaves for the KV cache.

vLLM (V1 engine) sizes its KV cache once, at start-up, and prints the result::

    Model loading took 14.99 GiB memory ...
    Available KV cache memory: 58.11 GiB
    GPU KV cache size: 476,016 tokens
    Maximum concurrency for 8,192 tokens per request: 58.11x

This module predicts those numbers from a ModelShape, one function per term, each citing the vLLM code
it follows (vllm-project/vllm; files and commits in docs/serving.md):

    requested   = total GPU memory x gpu_memory_utilization          (gpu_worker.init_device)
    available   = requested - (weights + peak activation + non-torch) (gpu_worker.determine_available_memory,
                                                                       utils/mem_utils.memory_profiling)
    num_blocks  = available // (page_size x layers per group)         (kv_cache_utils.get_num_blocks)
    tokens      = num_blocks // groups x block_size                   (kv_cache_utils._report_kv_cache_config)
    concurrency = num_blocks / blocks one max_model_len request needs (get_max_concurrency_for_kv_cache_config)

Everything is per GPU (tensor parallelism splits weights and KV heads). Bytes are ints. Two terms are
not derivable from the model alone and carry constants fitted on calibration rows of published vLLM
0.19.0 start-up logs (benchmarks/vllm_startup.py --fit): the sampler's share of the profile run's
activation peak and the non-torch memory; every other published row is validation
(docs/accuracy.md, "Serving: vLLM KV cache at start-up").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from advisor.breakdown import nf4_bytes
from advisor.families import family_of
from advisor.model import ModelShape
from advisor.problems import Problem, Problems
from advisor.units import GIB

if TYPE_CHECKING:
    from collections.abc import Iterable

    from advisor.gpus import Gpu


VLLM_VERSION = "0.19.0"  # the release the calibrated constants come from
WeightQuant = Literal["none", "fp8", "int8", "awq", "gptq", "bnb-nf4"]
KvCacheDtype = Literal["auto", "fp8"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
Status = Literal["fits", "weights_too_big", "no_kv_room", "max_model_len_too_long"]
# --max-lora-rank takes one of these: vLLM's MaxLoRARanks (vllm/config/lora.py, vllm-project/vllm@01230b4),
# a Literal that its argument parser turns into the flag's choices, so `vllm serve` refuses any other rank
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

BLOCK_SIZE = 16  # CacheConfig.block_size on CUDA (the logs: num_gpu_blocks x 16 = the printed tokens)
VOCAB_PADDING = 64  # vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE
INT4_GROUP = 128  # AWQ/GPTQ group size: one fp16 scale and one packed 4-bit zero per 128 weights

# --- calibrated on the calibration rows (benchmarks/vllm_startup.py --fit; vLLM 0.19.0, H100) ---------
# The dummy sampler run of the profile: besides the logits in the model dtype, this many fp32 copies of
# the max_num_seqs x vocab logits are alive at its peak (row C1: 1.89 GiB at 1024 x 128,256).
SAMPLER_FP32_COPIES = 3.36
# non_torch_increase: memory outside torch's allocator that appears between the start-up snapshot and
# the end of the profile run (rows C1, C2). With several GPUs it holds the all-reduce buffers.
NON_TORCH_BYTES_ONE_GPU = round(0.25 * GIB)
NON_TORCH_BYTES_TP = round(2.07 * GIB)
# CUDA context (+ NCCL with several GPUs) taken *before* vLLM's start-up snapshot: not in the KV budget,
# but vLLM refuses to start when the free memory left is below the requested memory (rows C1, C2).
CONTEXT_BYTES_ONE_GPU = round(0.51 * GIB)
CONTEXT_BYTES_TP = round(1.51 * GIB)

# Total memory as torch.cuda.mem_get_info reports it (vLLM's total_memory), where a log printed it;
# other cards: the nvidia-smi total less the median gap of these (see cuda_total_bytes).
CUDA_TOTAL_GIB = {
    "h100-sxm": 79.19,  # llm-d-planner PR #205 logs, "worker init memory snapshot: total_memory=79.19GiB"
    "rtx-3090": 23.58,  # vllm-project/vllm#10517, "total_gpu_memory=23.58GiB"
    "a100-80gb-sxm": 85_056_798_720 / GIB,  # profiles/GPU-SOURCES.md (torch total_memory)
}
NVIDIA_SMI_GAP_BYTES = round(0.46 * GIB)  # median of the three gaps above: 0.46, 0.42, 0.79 GiB


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _text_config(shape: ModelShape) -> dict:
    cfg = shape.config or {}
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


# --- the budget ------------------------------------------------------------------------------------

def requested_bytes(total_bytes: int, gpu_memory_utilization: float) -> int:
    """requested_memory = total_memory x gpu_memory_utilization (vllm/v1/worker/gpu_worker.py,
    Worker.init_device): the whole card's share, not the free memory's."""
    return int(total_bytes * gpu_memory_utilization)


def default_batch_limits(total_bytes: int, gpu_name: str | None) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) that `vllm serve` picks when they are not given
    (vllm/engine/arg_utils.py, EngineArgs.get_batch_defaults, OPENAI_API_SERVER context): 8192 and 1024
    on a card of at least 70 GiB that is not an A100, else 2048 and 256."""
    if total_bytes >= 70 * GIB and "a100" not in (gpu_name or "").lower():
        return 8192, 1024
    return 2048, 256


# --- weights ---------------------------------------------------------------------------------------

_ROW_PARALLEL = frozenset({"o_proj", "down_proj", "dense", "fc2", "c_proj", "out_proj", "w2", "wo", "dense_4h_to_h"})
_KV_PROJ = frozenset({"k_proj", "v_proj"})


def _quantizable(g) -> bool:
    """vLLM quantizes every decoder linear, fused MoE experts included; the router (an unquantized
    ReplicatedLinear) and the output head stay in the model dtype."""
    return g.quantized or g.experts > 1


def quant_weight_bytes(numel: int, out_features: int, weight_quant: str) -> int:
    """Stored bytes of one quantized weight matrix:
    fp8 / int8 (compressed-tensors w8a8, --quantization fp8): 1 byte a weight + an fp32 scale per output
    channel; awq / gptq (int4, group 128): packed 4-bit weights + per group an fp16 scale and a packed
    4-bit zero point (an approximation of both layouts); bnb-nf4: advisor.breakdown.nf4_bytes (packed
    4-bit + double-quantized absmax constants)."""
    if weight_quant in ("fp8", "int8"):
        return numel + 4 * out_features
    if weight_quant in ("awq", "gptq"):
        groups = _cdiv(numel, INT4_GROUP)
        return (numel + 1) // 2 + groups * 2 + (groups + 1) // 2
    if weight_quant == "bnb-nf4":
        return nf4_bytes(numel, True)
    raise ValueError(weight_quant)


def rope_cache_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """The rotary cos/sin cache every vLLM model with rotary positions keeps (one instance, shared by all
    layers: rotary_embedding.get_rope caches it): max positions x rotary dim in the model dtype
    (RotaryEmbedding._compute_cos_sin_cache; YaRN scales the positions by its factor). Learned positions
    (GPT-2) have none. Llama-3.1-8B: 131,072 x 128 x 2 B = 32 MiB, the 0.03 GiB between its 14.96 GiB of
    parameters and the 14.99 GiB vLLM prints."""
    if shape.model_type in ("gpt2",):
        return 0
    cfg = _text_config(shape)
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    positions: float = shape.max_position or 0
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "yarn":
        positions = int(scaling.get("original_max_position_embeddings") or positions) * float(scaling.get("factor", 1))
    if cfg.get("kv_lora_rank"):
        rotary = int(cfg.get("qk_rope_head_dim") or shape.head_dim)
    else:
        rotary = int(shape.head_dim * float(cfg.get("partial_rotary_factor") or 1.0))
    return int(positions) * rotary * dtype_bytes


def kv_heads_per_gpu(shape: ModelShape, tensor_parallel: int) -> int:
    """KV heads one GPU holds: split over the tensor-parallel ranks, or replicated (one each) when there
    are fewer KV heads than ranks (QKVParallelLinear: num_kv_head_replicas = tp // num_kv_heads)."""
    return max(1, shape.num_kv_heads // tensor_parallel)


def weights_bytes(shape: ModelShape, *, weight_quant: str = "none", dtype_bytes: int = 2,
                  tensor_parallel: int = 1) -> int:
    """Per GPU, what vLLM's "Model loading took X GiB" counts for the model:
    - decoder linears (quantized per weight_quant), split over tensor parallelism: column-parallel
      outputs and row-parallel inputs are divided by tp, except the k/v projections when KV heads are
      replicated (each rank keeps whole heads); biases of row-parallel layers are kept whole;
    - token embeddings and an untied output head, vocab padded to 64 and split over tp
      (VocabParallelEmbedding / ParallelLMHead);
    - everything else (norms, routers) replicated, in the model dtype;
    - the rotary cache (rope_cache_bytes)."""
    a, tp = dtype_bytes, tensor_parallel
    kv_rank = kv_heads_per_gpu(shape, tp)
    total = 0
    linear_params = 0
    for g in shape.linears:
        linear_params += g.params
        numel = g.in_features * g.out_features * g.experts
        out = g.out_features * g.experts
        leaf = g.leaf
        if leaf in _KV_PROJ and shape.num_kv_heads < tp:
            share = kv_rank * shape.head_dim / g.out_features  # whole heads on every rank
        elif not _quantizable(g) and g.experts == 1:
            share = 1.0  # the router: replicated
        else:
            share = 1 / tp
        per_rank = int(numel * share)
        if weight_quant != "none" and _quantizable(g):
            w = quant_weight_bytes(per_rank, max(1, int(out * (1 if leaf in _ROW_PARALLEL else share))), weight_quant)
        else:
            w = per_rank * a
        bias = (g.out_features if leaf in _ROW_PARALLEL else int(g.out_features * share)) * a if g.bias else 0
        total += g.count * (w + bias)
    vocab = _cdiv(shape.vocab_size, VOCAB_PADDING) * VOCAB_PADDING
    emb_rows = vocab * shape.hidden_size
    extra_emb = max(shape.params_embedding - shape.vocab_size * shape.hidden_size, 0)  # learned positions
    heads = 1 if shape.params_lm_head else 0
    total += _cdiv(emb_rows, tp) * a * (1 + heads) + extra_emb * a
    rest = shape.params_total - shape.params_embedding - shape.params_lm_head - linear_params
    total += max(rest, 0) * a
    return total + rope_cache_bytes(shape, a)


def lora_buffer_bytes(shape: ModelShape, *, max_loras: int, max_lora_rank: int, dtype_bytes: int = 2,
                      tensor_parallel: int = 1) -> int:
    """--enable-lora: vLLM preallocates, at model load (so inside "Model loading took"), max_loras slots of
    rank max_lora_rank for every LoRA-capable linear (vllm/lora/layers/base_linear.py,
    BaseLinearLayerWithLoRA.create_lora_weights): lora_a_stacked (max_loras, 1, rank, input) and
    lora_b_stacked (max_loras, 1, output, rank) per slice in the LoRA dtype (the model's). A
    column-parallel layer keeps its whole input in A and its output share in B; a row-parallel layer the
    reverse. The slices (q, k, v; gate, up) are the modules peft wraps, so the sum is
    max_loras x peft's r x (in + out) over the linears, each side split as above."""
    tp = tensor_parallel
    total = 0
    for g in shape.lora_groups("all-linear"):
        if not _quantizable(g):
            continue  # the router
        leaf = g.leaf
        r = max_lora_rank * g.rank_mult
        if leaf in _ROW_PARALLEL:
            per = r * (_cdiv(g.in_features, tp) + g.out_features)
        else:
            per = r * (g.in_features + _cdiv(g.out_features, tp))
        total += g.count * per
    return max_loras * total * dtype_bytes


# --- the profile run ---------------------------------------------------------------------------------

def non_torch_bytes(tensor_parallel: int) -> int:
    """non_torch_increase of utils/mem_utils.memory_profiling: device memory used outside torch's
    allocator that appears between the start-up snapshot and the end of the profile run (CUDA module
    loading, attention workspaces; with tp > 1 the custom all-reduce / NCCL buffers). Calibrated:
    NON_TORCH_BYTES_ONE_GPU, NON_TORCH_BYTES_TP."""
    return NON_TORCH_BYTES_ONE_GPU if tensor_parallel == 1 else NON_TORCH_BYTES_TP


def sampler_bytes(shape: ModelShape, max_num_seqs: int, max_num_batched_tokens: int, dtype_bytes: int = 2) -> int:
    """The dummy sampler run closing the profile run (gpu_model_runner.profile_run -> _dummy_sampler_run):
    logits for min(max_num_seqs, max_num_batched_tokens) requests over the whole padded vocabulary (the
    logits are gathered on every rank) in the model dtype, and SAMPLER_FP32_COPIES fp32 copies of them
    alive at the sampler's peak (calibrated)."""
    reqs = min(max_num_seqs, max_num_batched_tokens)
    vocab = _cdiv(shape.vocab_size, VOCAB_PADDING) * VOCAB_PADDING
    return int(reqs * vocab * (dtype_bytes + 4 * SAMPLER_FP32_COPIES))


def _moe_intermediate(shape: ModelShape) -> int:
    cfg = _text_config(shape)
    return int(cfg.get("moe_intermediate_size") or shape.intermediate_size)


def forward_bytes(shape: ModelShape, max_num_batched_tokens: int, tensor_parallel: int = 1,
                  dtype_bytes: int = 2) -> int:
    """The dummy forward of max_num_batched_tokens tokens (gpu_model_runner.profile_run -> _dummy_run),
    no autograd: one layer's widest moment beside the hidden-sized tensors. Per token: the gated MLP's
    gate_up output and activation output (3 x intermediate / tp; a plain MLP 2 x) or q, k, v and the
    attention output, whichever is wider, plus four hidden-sized tensors (the layer input, the residual,
    the normed input and the layer output)."""
    tp = tensor_parallel
    gated = family_of(shape.model_type)[0].gated_mlp
    mlp = 0 if shape.num_experts else (3 if gated else 2) * _cdiv(shape.intermediate_size, tp)
    attn = (2 * _cdiv(shape.num_heads, tp) + 2 * kv_heads_per_gpu(shape, tp)) * shape.head_dim
    return max_num_batched_tokens * (max(mlp, attn) + 4 * shape.hidden_size) * dtype_bytes


def moe_workspace_bytes(shape: ModelShape, max_num_batched_tokens: int, tensor_parallel: int = 1,
                        dtype_bytes: int = 2) -> int:
    """Fused-MoE layers (model_executor/layers/fused_moe): the expert computation runs on workspaces
    sized for tokens x top-k -- one shared by the gate_up output and the final output
    (max(2 x moe_intermediate / tp, hidden)) and one for the activation output (moe_intermediate / tp).
    They are kept for reuse, so they add to the sampler's peak instead of passing before it."""
    if not shape.num_experts:
        return 0
    i = _cdiv(_moe_intermediate(shape), tensor_parallel)
    topk = max(shape.experts_per_token, 1)
    return max_num_batched_tokens * topk * (max(2 * i, shape.hidden_size) + i) * dtype_bytes


def activation_peak_bytes(shape: ModelShape, *, max_num_seqs: int, max_num_batched_tokens: int,
                          tensor_parallel: int = 1, dtype_bytes: int = 2) -> int:
    """torch_peak_increase of memory_profiling: the larger of the dummy forward and the dummy sampler
    (they run one after the other), plus the MoE workspaces that stay allocated."""
    fwd = forward_bytes(shape, max_num_batched_tokens, tensor_parallel, dtype_bytes)
    samp = sampler_bytes(shape, max_num_seqs, max_num_batched_tokens, dtype_bytes)
    return max(fwd, samp) + moe_workspace_bytes(shape, max_num_batched_tokens, tensor_parallel, dtype_bytes)


# --- the KV cache ------------------------------------------------------------------------------------

def is_mla(shape: ModelShape) -> bool:
    return bool(_text_config(shape).get("kv_lora_rank"))


def kv_bytes_per_token_layer(shape: ModelShape, *, tensor_parallel: int = 1, kv_cache_dtype: str = "auto",
                             dtype_bytes: int = 2) -> int:
    """One token of one layer on one GPU (vllm/v1/kv_cache_interface.py, page_size_bytes / block_size):
    full attention 2 (K and V) x KV heads on this GPU x head_dim x bytes; MLA (kv_lora_rank in the
    config: MLAAttentionSpec) one latent of kv_lora_rank + qk_rope_head_dim per token, whole on every
    rank. fp8 KV cache: 1 byte."""
    kb = 1 if kv_cache_dtype == "fp8" else dtype_bytes
    if is_mla(shape):
        cfg = _text_config(shape)
        return (int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)) * kb
    return 2 * kv_heads_per_gpu(shape, tensor_parallel) * shape.head_dim * kb


def layer_attention(shape: ModelShape) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as vLLM reads the HF config: an explicit
    layer_types list; Gemma-2 slides on every other layer from the first and Gemma-3 on all but every
    sliding_window_pattern-th (their transformers configs build layer_types so). Other configs with a
    sliding_window and no layer_types are taken as full attention (vLLM's llama.py reads layer_types):
    never fewer blocks per request than vLLM asks."""
    cfg = _text_config(shape)
    window = cfg.get("sliding_window")
    n = shape.num_layers
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return [int(window) if t == "sliding_attention" and window else None for t in types]
    if not window:
        return [None] * n
    if shape.model_type == "gemma2":
        return [int(window) if (i + 1) % 2 else None for i in range(n)]
    if shape.model_type in ("gemma3", "gemma3_text"):
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return [int(window) if (i + 1) % pattern else None for i in range(n)]
    return [None] * n


@dataclass(frozen=True)
class KvGroups:
    """vLLM's KV cache groups (kv_cache_utils.get_kv_cache_groups): layers of one attention type share a
    block table; with several types, layers are split into groups of group_size layers each
    (_get_kv_cache_groups_uniform_page_size), padding the last group of a type."""

    group_size: int  # layers sharing one physical block (tensors per block)
    windows: tuple[int | None, ...]  # one entry per group: its sliding window or None


def kv_groups(shape: ModelShape) -> KvGroups:
    """One group of all layers when they share one attention type; else group_size = the fewest layers
    of a type (the most when that is under 1.5 x the fewest) and cdiv(layers of a type, group_size)
    groups per type (kv_cache_utils._get_kv_cache_groups_uniform_page_size)."""
    per_type: dict[int | None, int] = {}
    for w in layer_attention(shape):
        per_type[w] = per_type.get(w, 0) + 1
    if len(per_type) == 1:
        ((w, n),) = per_type.items()
        return KvGroups(n, (w,))
    lo, hi = min(per_type.values()), max(per_type.values())
    size = hi if hi < lo * 1.5 else lo
    windows: list[int | None] = []
    for w, n in per_type.items():
        windows += [w] * _cdiv(n, size)
    return KvGroups(size, tuple(windows))


def blocks_per_request(groups: KvGroups, *, max_model_len: int, max_num_batched_tokens: int,
                       block_size: int = BLOCK_SIZE) -> int:
    """Blocks one request of max_model_len tokens takes across the groups: full attention
    cdiv(max_model_len, block_size) (FullAttentionSpec.max_memory_usage_bytes); a sliding window keeps
    its last window - 1 tokens plus a chunk of max_num_batched_tokens, and one block more because the
    window need not start on a block boundary (SlidingWindowSpec.max_memory_usage_bytes)."""
    total = 0
    for w in groups.windows:
        if w is None:
            total += _cdiv(max_model_len, block_size)
        else:
            total += _cdiv(min(w - 1 + max_num_batched_tokens, max_model_len), block_size) + 1
    return total


def num_blocks(available: int, page_bytes: int, group_size: int) -> int:
    """num_blocks = available // page_size // group_size (kv_cache_utils.get_num_blocks): one block holds
    block_size tokens of group_size layers."""
    return max(int(available // page_bytes // group_size), 0)


def max_model_len_that_fits(groups: KvGroups, page_bytes: int, available: int, *, max_model_len: int,
                            max_num_batched_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """The longest max_model_len one request can have in `available` bytes (vLLM's binary search,
    kv_cache_utils._estimate_max_model_len_from_groups); 0 when not even one token fits."""
    def need(n: int) -> int:
        return groups.group_size * page_bytes * blocks_per_request(
            groups, max_model_len=n, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size)

    if need(1) > available:
        return 0
    lo, hi = 1, max_model_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- the estimate ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VllmEstimate:
    """vLLM's start-up memory on one GPU of a tensor-parallel group. The budget splits exactly into
    weights + LoRA buffers + activation peak + non-torch + CUDA graphs + available KV memory."""

    model: str
    gpu_name: str | None
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    tensor_parallel: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    dtype_bytes: int
    weight_quant: str
    kv_cache_dtype: str
    budget_bytes: int  # requested memory: total x utilization
    weights_bytes: int
    lora_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    cuda_graph_bytes: int  # 0: vLLM 0.19 captures CUDA graphs after sizing the cache and does not count them
    available_bytes: int  # budget - the rest; negative when nothing is left
    kv_bytes_per_token: int  # all layers on this GPU
    num_blocks: int
    kv_cache_tokens: int
    blocks_per_request: int
    max_concurrency: float  # requests of max_model_len the cache holds at once
    max_model_len_fit: int  # the longest max_model_len one request could have
    status: Status
    problem: Problem | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        parts = (self.weights_bytes + self.lora_bytes + self.activation_bytes + self.non_torch_bytes
                 + self.cuda_graph_bytes + self.available_bytes)
        assert parts == self.budget_bytes, "serving budget does not add up"

    @property
    def kv_cache_bytes(self) -> int:
        """The memory vLLM gives the KV cache on this GPU ("Available KV cache memory"; 0 when none is left)."""
        return max(self.available_bytes, 0)

    @property
    def non_kv_bytes(self) -> int:
        return self.budget_bytes - self.available_bytes

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    def as_json(self) -> dict:
        d = asdict(self)
        d["problem"] = self.problem.as_json() if self.problem else None
        d["notes"] = list(self.notes)
        d["kv_cache_bytes"] = self.kv_cache_bytes
        d["non_kv_bytes"] = self.non_kv_bytes
        d["fits"] = self.fits
        d["vllm_version"] = VLLM_VERSION
        return d


def lora_rank_for(r: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of rank ``r``; None above the largest."""
    return next((x for x in VLLM_LORA_RANKS if x >= r), None)


def lora_rank_problem(rank, field: str = "max_lora_rank") -> Problem | None:
    """A --max-lora-rank vLLM refuses (not one of VLLM_LORA_RANKS): one problem listing the ranks it takes."""
    if not isinstance(rank, bool) and rank in VLLM_LORA_RANKS:
        return None
    allowed = ", ".join(map(str, VLLM_LORA_RANKS))
    up = lora_rank_for(rank) if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1 else None
    fix = (f"{up} holds an adapter of rank {rank}" if up is not None else
           f"an adapter above rank {VLLM_LORA_RANKS[-1]} cannot be served beside the base: serve the merged model"
           if isinstance(rank, int) and not isinstance(rank, bool) and rank > VLLM_LORA_RANKS[-1] else None)
    return Problem(f"vLLM accepts only {allowed} (got {rank!r})", field, fix)


def _check_inputs(shape: ModelShape, total: int, util: float, tp: int, mml: int, weight_quant: str,
                  kv_cache_dtype: str, dtype: str, max_num_seqs: int | None, max_num_batched_tokens: int | None,
                  block_size: int, enable_lora: bool, max_lora_rank: int, max_loras: int) -> None:
    """Every input mistake at once, each with its fix (vLLM's own rules where it has them)."""
    bad: list[Problem] = []
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        bad.append(Problem(f"GPU memory must be a positive number of bytes (got {total!r})", "gpu_memory_bytes"))
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
        bad.append(Problem(f"gpu_memory_utilization must be in (0, 1] (got {util!r})", "gpu_memory_utilization",
                           "vLLM's default is 0.9"))
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        bad.append(Problem(f"tensor_parallel must be a whole number of GPUs, at least 1 (got {tp!r})",
                           "tensor_parallel"))
    elif shape.num_heads % tp:
        bad.append(Problem(f"{shape.num_heads} attention heads do not divide over {tp} GPUs", "tensor_parallel",
                           "vLLM needs the head count divisible by --tensor-parallel-size; pick a divisor "
                           f"of {shape.num_heads}"))
    elif not is_mla(shape) and (shape.num_kv_heads % tp if shape.num_kv_heads >= tp else tp % shape.num_kv_heads):
        bad.append(Problem(f"{shape.num_kv_heads} KV heads do not split over {tp} GPUs", "tensor_parallel",
                           "vLLM needs the KV heads divisible by the GPU count, or the GPU count by the KV heads"))
    if isinstance(mml, bool) or not isinstance(mml, int) or mml < 1:
        bad.append(Problem(f"max_model_len must be a positive number of tokens (got {mml!r})", "max_model_len"))
    elif shape.max_position and mml > shape.max_position:
        bad.append(Problem(f"max_model_len {mml:,} is beyond the model's {shape.max_position:,} positions",
                           "max_model_len", f"use at most {shape.max_position:,} (vLLM refuses longer unless "
                           "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)"))
    for name, value, choices in (("weight_quant", weight_quant, WeightQuant), ("kv_cache_dtype", kv_cache_dtype,
                                 KvCacheDtype), ("dtype", dtype, Dtype)):
        if value not in get_args(choices):
            bad.append(Problem(f"unknown {name} {value!r}", name, f"one of: {', '.join(get_args(choices))}"))
    for limit, count in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            bad.append(Problem(f"{limit} must be a positive whole number (got {count!r})", limit))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        bad.append(Problem(f"block_size must be a positive whole number of tokens (got {block_size!r})", "block_size"))
    if enable_lora:
        for limit, count in (("max_lora_rank", max_lora_rank), ("max_loras", max_loras)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                bad.append(Problem(f"{limit} must be a positive whole number (got {count!r})", limit))
    if enable_lora and isinstance(max_lora_rank, int) and not isinstance(max_lora_rank, bool) and max_lora_rank >= 1:
        rank_problem = lora_rank_problem(max_lora_rank)
        if rank_problem is not None:
            bad.append(rank_problem)
    if bad:
        raise Problems(bad)


def serving_estimate(shape: ModelShape, gpu_memory_bytes: int, *, gpu_memory_utilization: float = 0.9,
                     max_model_len: int | None = None, tensor_parallel: int = 1, weight_quant: str = "none",
                     kv_cache_dtype: str = "auto", dtype: str = "auto", max_num_seqs: int | None = None,
                     max_num_batched_tokens: int | None = None, block_size: int = BLOCK_SIZE,
                     enable_lora: bool = False, max_lora_rank: int = 16, max_loras: int = 1,
                     gpu_name: str | None = None) -> VllmEstimate:
    """What `vllm serve` (0.19) finds at start-up on each GPU of `tensor_parallel` GPUs with
    `gpu_memory_bytes` each (the total torch.cuda.mem_get_info reports: cuda_total_bytes for a GPU
    profile). max_model_len None: the model's maximum positions (vLLM's default); max_num_seqs /
    max_num_batched_tokens None: vLLM's defaults for the card (default_batch_limits). Bad inputs raise
    Problems; a model that does not fit comes back with status and problem set."""
    if max_model_len is None and not shape.max_position:
        raise Problems(Problem(f"{shape.name}'s config gives no maximum length", "max_model_len",
                               "pass max_model_len (vLLM's --max-model-len)"))
    mml = max_model_len if max_model_len is not None else int(shape.max_position or 0)
    _check_inputs(shape, gpu_memory_bytes, gpu_memory_utilization, tensor_parallel, mml, weight_quant,
                  kv_cache_dtype, dtype, max_num_seqs, max_num_batched_tokens, block_size, enable_lora,
                  max_lora_rank, max_loras)
    tp, a = tensor_parallel, DTYPE_BYTES[dtype]
    d_tokens, d_seqs = default_batch_limits(gpu_memory_bytes, gpu_name)
    tokens_batch = max_num_batched_tokens or d_tokens
    seqs = max_num_seqs or d_seqs
    budget = requested_bytes(gpu_memory_bytes, gpu_memory_utilization)
    w = weights_bytes(shape, weight_quant=weight_quant, dtype_bytes=a, tensor_parallel=tp)
    lora = lora_buffer_bytes(shape, max_loras=max_loras, max_lora_rank=max_lora_rank, dtype_bytes=a,
                             tensor_parallel=tp) if enable_lora else 0
    act = activation_peak_bytes(shape, max_num_seqs=seqs, max_num_batched_tokens=tokens_batch,
                                tensor_parallel=tp, dtype_bytes=a)
    nt = non_torch_bytes(tp)
    available = budget - w - lora - act - nt
    groups = kv_groups(shape)
    per_token_layer = kv_bytes_per_token_layer(shape, tensor_parallel=tp, kv_cache_dtype=kv_cache_dtype, dtype_bytes=a)
    page = block_size * per_token_layer
    per_req = blocks_per_request(groups, max_model_len=mml, max_num_batched_tokens=tokens_batch, block_size=block_size)
    blocks = num_blocks(available, page, groups.group_size) if available > 0 else 0
    fit_len = 0 if available <= 0 else max_model_len_that_fits(
        groups, page, available, max_model_len=mml, max_num_batched_tokens=tokens_batch, block_size=block_size)
    context = CONTEXT_BYTES_ONE_GPU if tp == 1 else CONTEXT_BYTES_TP
    gib = GIB
    status: Status = "fits"
    problem = None
    notes: list[str] = []
    if w + lora > gpu_memory_bytes - context:
        status = "weights_too_big"
        problem = Problem(
            f"the weights take {(w + lora) / gib:.2f} GiB per GPU, more than the "
            f"{(gpu_memory_bytes - context) / gib:.2f} GiB a GPU has free after the CUDA context: vLLM runs out of "
            "memory while loading",
            "tensor_parallel", "use more GPUs (--tensor-parallel-size), quantized weights, or a larger GPU")
    elif available <= 0:
        status = "no_kv_room"
        problem = Problem(
            f"no memory is left for the KV cache: {budget / gib:.2f} GiB requested ({gpu_memory_utilization:g} of the "
            f"GPU) minus {(budget - available) / gib:.2f} GiB of weights, activations and buffers (vLLM: \"No "
            "available memory for the cache blocks\")", "gpu_memory_utilization",
            "raise --gpu-memory-utilization, use more GPUs or quantized weights, or lower --max-num-seqs")
    elif groups.group_size * page * per_req > available:
        status = "max_model_len_too_long"
        need = groups.group_size * page * per_req
        problem = Problem(
            f"one request of max_model_len {mml:,} needs {need / gib:.2f} GiB of KV cache, more than the "
            f"{available / gib:.2f} GiB available (vLLM refuses to start)", "max_model_len",
            f"lower --max-model-len to at most {fit_len:,}, raise --gpu-memory-utilization, or use more GPUs")
    if context + budget > gpu_memory_bytes:
        notes.append(f"vLLM checks at start-up that the free memory covers the {gpu_memory_utilization:g} requested; "
                     f"after the CUDA context (~{context / gib:.2f} GiB) only {(gpu_memory_bytes - context) / gib:.2f} "
                     "GiB are free: lower --gpu-memory-utilization")
    if enable_lora:
        notes.append(f"LoRA: {max_loras} slot(s) of rank {max_lora_rank} preallocated ({lora / gib:.2f} GiB per GPU)")
    kv_tokens = blocks // len(groups.windows) * block_size
    return VllmEstimate(
        model=shape.name, gpu_name=gpu_name, gpu_memory_bytes=gpu_memory_bytes,
        gpu_memory_utilization=float(gpu_memory_utilization), tensor_parallel=tp, max_model_len=mml,
        max_num_seqs=seqs, max_num_batched_tokens=tokens_batch, block_size=block_size, dtype_bytes=a,
        weight_quant=weight_quant, kv_cache_dtype=kv_cache_dtype, budget_bytes=budget, weights_bytes=w,
        lora_bytes=lora, activation_bytes=act, non_torch_bytes=nt, cuda_graph_bytes=0, available_bytes=available,
        kv_bytes_per_token=per_token_layer * shape.num_layers, num_blocks=blocks, kv_cache_tokens=kv_tokens,
        blocks_per_request=per_req, max_concurrency=blocks / per_req if per_req else 0.0,
        max_model_len_fit=fit_len, status=status, problem=problem, notes=tuple(notes))


# --- which GPUs to rent for a serving question ---------------------------------------------------------

def cuda_total_bytes(gpu: Gpu) -> int:
    """The total memory vLLM sees on a card (torch.cuda.mem_get_info): measured where a log printed it
    (CUDA_TOTAL_GIB), else the nvidia-smi total of profiles/gpus.yaml less NVIDIA_SMI_GAP_BYTES."""
    if gpu.id in CUDA_TOTAL_GIB:
        return int(CUDA_TOTAL_GIB[gpu.id] * GIB)
    return gpu.memory_bytes - NVIDIA_SMI_GAP_BYTES


@dataclass(frozen=True)
class ServingOption:
    """count x gpu serving the model with tensor parallelism over the count."""

    gpu: Gpu
    count: int
    estimate: VllmEstimate
    usd_per_hour: float | None

    def as_json(self) -> dict:
        return {"gpu": self.gpu.id, "gpu_name": self.gpu.name, "count": self.count,
                "usd_per_hour": self.usd_per_hour, "estimate": self.estimate.as_json()}


def rank_serving_setups(shape: ModelShape, *, max_model_len: int, concurrency: int, weight_quant: str = "none",
                        kv_cache_dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                        counts: Iterable[int] = (1, 2, 4, 8), gpus: Iterable[Gpu] | None = None,
                        enable_lora: bool = False, max_lora_rank: int = 16, max_loras: int = 1,
                        limit: int = 5) -> list[ServingOption]:
    """The cheapest setups (count x card, tensor parallel over the count, within one node) whose KV cache
    holds `concurrency` requests of `max_model_len` at once, cheapest per hour first (fewer GPUs on a
    tie). Rented NVIDIA cards with a price only (advisor.gpus' table, prices as of prices_as_of())."""
    from advisor.gpus import gpu_table

    bad = []
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        bad.append(Problem(f"concurrency must be a positive number of requests (got {concurrency!r})", "concurrency"))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        bad.append(Problem(f"limit must be a positive whole number (got {limit!r})", "limit"))
    if bad:
        raise Problems(bad)
    options: list[ServingOption] = []
    checked = False
    for gpu in (gpu_table().values() if gpus is None else gpus):
        if gpu.vendor != "nvidia" or gpu.unified_memory or gpu.price_usd_hour is None:
            continue
        for n in counts:
            if n > gpu.gpus_per_node or shape.num_heads % n or (
                    not is_mla(shape) and (shape.num_kv_heads % n if shape.num_kv_heads >= n
                                           else n % shape.num_kv_heads)):
                continue
            est = serving_estimate(shape, cuda_total_bytes(gpu), gpu_memory_utilization=gpu_memory_utilization,
                                   max_model_len=max_model_len, tensor_parallel=n, weight_quant=weight_quant,
                                   kv_cache_dtype=kv_cache_dtype, enable_lora=enable_lora,
                                   max_lora_rank=max_lora_rank, max_loras=max_loras, gpu_name=gpu.name)
            checked = True
            if est.fits and est.max_concurrency >= concurrency:
                options.append(ServingOption(gpu, n, est, round(n * gpu.price_usd_hour, 4)))
                break  # more of the same card only costs more
    if not checked:
        raise Problems(Problem("no rented NVIDIA GPU with a price could be checked", "gpu",
                               "add one with a price_usd_hour in a YAML file named by TUNEPLAN_GPUS"))
    options.sort(key=lambda o: (o.usd_per_hour or math.inf, o.count, -o.estimate.max_concurrency))
    return options[:limit]
