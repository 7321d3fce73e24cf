"""Units, dtypes of a plan, the GPU overhead terms and the Breakdown every estimator returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from advisor.spec import TrainSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}

NF4_BLOCK = 64  # bitsandbytes 4-bit block size (QLoRA paper: 64)
NF4_NESTED_BLOCK = 256  # double quantization: absmax constants quantized in blocks of 256
ADAM8_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer states
ADAM8_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this


def param_bytes(precision: str) -> int:
    """Bytes per stored (trainable or frozen, unquantized) weight: fp32 for fp32 and AMP."""
    return 2 if precision in ("bf16", "fp16") else 4


def compute_bytes(precision: str) -> int:
    """Bytes per activation element: half for bf16/fp16 and AMP, 4 for fp32."""
    return 4 if precision == "fp32" else 2


def residual_bytes(t: TrainSpec) -> int:
    """Dtype of the hidden states between layers. QLoRA: prepare_model_for_kbit_training casts
    norms and embeddings to fp32 and bitsandbytes returns its matmul output in the input's dtype,
    so the residual stream is fp32 whatever the compute dtype. AMP: fp32 residual adds."""
    if t.method == "qlora" or t.precision.startswith("amp"):
        return 4
    return compute_bytes(t.precision)



@dataclass
class Breakdown:
    """Bytes alive at the peak moment, by component; the parts add up to the peak."""

    components: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    overhead: dict[str, int] = field(default_factory=dict)  # GPU-only terms (advisor/gpu_memory.py)
    notes: list[str] = field(default_factory=list)
    overhead_high: int = 0  # the band: p90 nvidia-smi peak minus the expected one
    reserved_model: str = "tensors only (CPU RAM: no CUDA context, no caching allocator)"
    overhead_low: int = 0  # the band's low side: the expected nvidia-smi peak minus its low end
    band: dict = field(default_factory=dict)  # whose band: {"harness", "low", "high"} (shares; none on the CPU)
    host: dict[str, int] = field(default_factory=dict)  # host RAM the step holds beside the device (offloaded inputs)

    def __post_init__(self) -> None:
        assert self.phases[self.peak_phase] == sum(self.components.values()), "breakdown does not add up"
        assert self.phases[self.peak_phase] == max(self.phases.values())

    @property
    def peak_allocated_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def peak_reserved_bytes(self) -> int:
        """The expected nvidia-smi peak (GPU) or the tensors (CPU)."""
        return self.peak_allocated_bytes + sum(self.overhead.values())

    @property
    def peak_reserved_high_bytes(self) -> int:
        """The high end (p90) of the nvidia-smi band; equals peak_reserved_bytes on the CPU."""
        return self.peak_reserved_bytes + self.overhead_high

    @property
    def peak_reserved_low_bytes(self) -> int:
        """The low end of the nvidia-smi band (the harness's, training.harness); the tensors on the CPU."""
        return self.peak_reserved_bytes - self.overhead_low


def gpu_terms(peak: int, comps: dict[str, int], hw, *, training: bool, step: int = 0, attention: int = 0,
              replayed_reserved: int | None = None, harness: str = "tuneplan") -> dict:
    """Breakdown keyword arguments for the GPU-only terms (advisor.gpu_memory); none on the CPU.
    ``step``: what the optimizer step holds beyond weights, adapters and states (gradients +
    the step's temporaries), per GPU. ``harness``: what runs the job (training.harness), whose band."""
    if hw.device != "cuda":
        return {}
    from advisor.gpu_memory import arch_of, band, band_low, reserved_terms

    persistent = sum(comps.get(k, 0) for k in PERSISTENT)
    r = reserved_terms(peak, persistent, step, gpu=hw.gpu, gpus=hw.gpus, training=training,
                       attention=attention, replayed_reserved=replayed_reserved, harness=harness)
    arch = arch_of(hw.gpu)
    return {"overhead": r.overhead, "overhead_high": r.high_extra, "reserved_model": r.model,
            "overhead_low": r.low_extra, "band": {"harness": harness, "low": round(band_low(arch, harness), 4),
                                                  "high": round(band(arch, harness), 4)}}


# the components alive for the whole run (from the first optimizer step on), whatever the moment
PERSISTENT = ("weights", "master_weights", "lora_adapters", "optimizer_states")


def shard(x: int, n: int) -> int:
    return -(-x // n)


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """4-bit NF4 storage of one weight matrix (Dettmers et al. 2023, QLoRA, sec. 3):
    packed 4-bit values (numel/2 bytes) + one absmax per 64-weight block: fp32 (4 B) without
    double quantization; with it, 8-bit absmax (1 B) + fp32 second-level constants per 256 blocks
    + the 256-entry fp32 code book of the second level and its offset."""
    packed = (numel + 1) // 2
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return packed + 4 * blocks + 16 * 4
    return packed + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 256 * 4 + 16 * 4 + 4


# what each component is called on every screen (advisor.present, the advice's reasons)
COMPONENT_LABELS = {
    "weights": "weights", "master_weights": "fp32 master weights", "lora_adapters": "LoRA adapters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states", "activations": "activations",
    "logits_and_loss": "logits + loss", "transient": "transient buffers", "kv_cache": "KV cache",
    "prefill_activations": "prefill activations", "zero3_gathered_params": "ZeRO-3 gathered params",
    "ddp_buckets": "DDP gradient buckets", "zero_buckets": "ZeRO reduce buckets", "cuda_context": "CUDA context",
    "cublas_workspace": "cuBLAS workspace", "attention_workspace": "attention workspace",
    "nccl_buffers": "NCCL buffers", "allocator_cache": "allocator cache", "inputs": "input batch",
    "logits": "logits", "offloaded_activations": "offloaded activations",
}


def label(component: str) -> str:
    return COMPONENT_LABELS.get(component, component.replace("_", " "))
