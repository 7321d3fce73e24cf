"""What nvidia-smi shows beyond the live tensors: the GPU-only terms of ``peak_reserved_bytes``.

Pure and fast (no torch import): every analytic estimate calls :func:`reserved_terms`.

Terms (docs/memory-model.md "GPU memory"):

* ``cuda_context`` -- the CUDA context of the process (driver state, loaded kernels of torch,
  cuBLAS, NCCL, flash-attention), outside torch's allocator. Fitted per GPU generation on published
  ``nvidia-smi`` peaks (CUDA 12 with lazy module loading); generations without calibration data use
  the Ampere value and a wider band.
* ``cublas_workspace`` -- torch allocates one cuBLAS workspace per (handle, stream) through its
  caching allocator (``CublasHandlePool.cpp``: ``:4096:2:16:8`` = 8.125 MiB, 32 MiB on sm90+), and
  the forward (main thread) and backward (autograd's device thread) each get a handle; cuBLASLt
  adds its own 1 MiB workspace per handle (``CUBLASLT_WORKSPACE_SIZE`` default).
* ``attention_workspace`` -- flash-attention's backward accumulates dQ in fp32
  (``dq_accum``: batch x seq rounded to 128 x heads x head_dim x 4 B) for the layer in backward.
* ``nccl_buffers`` -- with several GPUs, NCCL's communicator (channels' buffers, proxy state) per
  process, outside torch's allocator. Fitted on published 2-GPU FSDP runs.
* ``allocator_cache`` -- what the caching allocator keeps reserved beyond the live blocks at the
  peak: freed blocks of one phase that the next cannot reuse (advisor/allocator.py replays this
  exactly in simulate mode). Analytic: ``max(K_FRAG x transient, first_step - peak)`` where the
  transient is the peak minus what lives across steps (weights, adapters, optimizer states), and
  ``first_step = persistent + M_FIRST_STEP x step``, ``step`` being what the optimizer step holds
  beyond the persistent part (gradients + the step's temporaries): at the first optimizer step the
  states are created while the gradients and the step's temporaries are alive, in blocks the activations
  left behind. Both constants fitted on published A100 runs (benchmarks/published.py --fit).

The band: ``high`` adds the 90th percentile of the fit's relative residuals (at least
``BAND_MIN``), widened by ``BAND_UNCALIBRATED`` for a generation without calibration data. That is the
band of tuneplan's own runner; a plan run by another harness (``training.harness``: the HF Trainer / TRL
path, or another) gets the band of that harness (``HARNESS_BANDS``: low and high shares of the expected
peak, from the spread of published runs of it, benchmarks/harness_band.py --fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from advisor.units import MIB

# GPU generation of each GPU profile id (most specific pattern first); sm major version beside it.
ARCH_OF_ID: tuple[tuple[str, str], ...] = (
    ("gh200", "hopper"), ("h100", "hopper"), ("h200", "hopper"), ("b200", "blackwell"),
    ("rtx-50", "blackwell"), ("rtx-6000-ada", "ada"), ("rtx-40", "ada"), ("l40", "ada"), ("l4", "ada"),
    ("a100", "ampere"), ("a10", "ampere"), ("a40", "ampere"), ("rtx-a", "ampere"), ("rtx-30", "ampere"),
    ("t4", "turing"), ("v100", "volta"), ("mi", "cdna"), ("apple", "apple"),
)
SM_MAJOR = {"volta": 7, "turing": 7, "ampere": 8, "ada": 8, "hopper": 9, "blackwell": 10}

# -- fitted on ../shared/calibration (benchmarks/published.py --fit); see docs/accuracy.md ------------
# outside torch, per process: CUDA context + libraries (+ the NCCL init of a 1-process FSDP group)
CUDA_CONTEXT_BYTES = {"ampere": 1180 * MIB}
NCCL_BYTES = 850 * MIB  # per process with several GPUs
K_FRAG = 0.32  # cached-but-free share of the peak's transient
M_FIRST_STEP = 2.0  # times the optimizer step's own bytes the first step reserves beyond the persistent
BAND_P90 = 0.0125  # 90th percentile of |relative residual| of nvidia-smi on the fitting rows
CALIBRATED_ARCHS = frozenset({"ampere"})
# --------------------------------------------------------------------------------------------------
BAND_MIN = 0.04
BAND_UNCALIBRATED = 0.05
# -- the band per harness: (low, high) shares of the expected nvidia-smi peak that published runs of it fell
# below / above it (the 10th and 90th percentiles of the calibration rows' residuals, at least BAND_MIN and at
# least the narrower harness's); fitted by benchmarks/harness_band.py --fit, sources in docs/accuracy.md ("The
# band for the harness you run"). tuneplan's own runner keeps the band of the fit above.
HARNESS_BANDS: dict[str, tuple[float, float]] = {
    "tuneplan": (BAND_MIN, max(BAND_P90, BAND_MIN)),
    "hf-trainer": (0.04, 0.07),  # refitted when the Liger-Kernel rows were re-planned as mixed-bf16 (issue 30)
    "other": (0.68, 0.51),
}
HARNESS_WORDS = {"tuneplan": "tuneplan's own runner", "hf-trainer": "the HF Trainer / TRL path",
                 "other": "another harness"}
# --------------------------------------------------------------------------------------------------
CUBLAS_WORKSPACE = {True: 4096 * 8 * 1024, False: 4096 * 1024 * 2 + 16 * 1024 * 8}  # sm90+ : others
CUBLASLT_WORKSPACE = 1024 * 1024
HANDLES_TRAINING = 2  # main thread (forward, optimizer) + autograd's device thread (backward)


@lru_cache(maxsize=64)
def arch_of(gpu_name: str | None) -> str | None:
    """The GPU generation of a profile name ('A100 80GB' -> 'ampere'); None if unknown."""
    if not gpu_name:
        return None
    try:
        from advisor.gpus import GpuError, find_gpu

        gid = find_gpu(gpu_name).id
    except (GpuError, OSError, ValueError):
        return None
    for pattern, arch in ARCH_OF_ID:
        if gid.startswith(pattern):
            return arch
    return None


def cuda_context_bytes(arch: str | None) -> int:
    return CUDA_CONTEXT_BYTES.get(arch or "", CUDA_CONTEXT_BYTES["ampere"])


def cublas_workspace_bytes(arch: str | None, training: bool) -> int:
    big = SM_MAJOR.get(arch or "", 8) >= 9
    handles = HANDLES_TRAINING if training else 1
    return handles * (CUBLAS_WORKSPACE[big] + CUBLASLT_WORKSPACE)


def attention_workspace_bytes(micro_batch: int, seq_len: int, heads: int, head_dim: int, attn_impl: str) -> int:
    """flash-attention backward's fp32 dQ accumulator (sdpa on CUDA takes the flash kernel too)."""
    if attn_impl == "eager":
        return 0
    s = 128 * -(-seq_len // 128)
    d = 32 * -(-head_dim // 32)
    return micro_batch * s * heads * d * 4


def nccl_bytes(gpus: int) -> int:
    return NCCL_BYTES if gpus > 1 else 0


def allocator_cache_bytes(peak: int, persistent: int, step: int) -> int:
    """Reserved-but-free bytes at the peak (see the module docstring)."""
    transient = max(peak - persistent, 0)
    first_step = persistent + M_FIRST_STEP * step
    return int(max(K_FRAG * transient, first_step - peak, 0))


def harness_band(harness: str = "tuneplan") -> tuple[float, float]:
    """(low, high) shares of the expected peak for a plan run by ``harness`` (training.harness)."""
    return HARNESS_BANDS.get(harness, HARNESS_BANDS["other"])


def band(arch: str | None, harness: str = "tuneplan") -> float:
    """The high end's share above the expected peak: the harness's, widened for an uncalibrated GPU."""
    return harness_band(harness)[1] + (0 if arch in CALIBRATED_ARCHS else BAND_UNCALIBRATED)


def band_low(arch: str | None, harness: str = "tuneplan") -> float:
    """The low end's share below the expected peak, widened alike."""
    return harness_band(harness)[0] + (0 if arch in CALIBRATED_ARCHS else BAND_UNCALIBRATED)


def band_words(arch: str | None, harness: str = "tuneplan") -> str:
    """The band in words, for the estimate's 'modelled' line."""
    return (f"band for {HARNESS_WORDS.get(harness, harness)} (training.harness={harness}): "
            f"-{band_low(arch, harness):.0%} to +{band(arch, harness):.0%} of the expected peak")


@dataclass(frozen=True)
class Reserved:
    """The GPU-only terms of one estimate."""

    overhead: dict[str, int]
    high_extra: int  # p90 minus expected
    model: str  # which reserved model produced it
    low_extra: int = 0  # expected minus the band's low end
    harness: str = "tuneplan"  # whose band (training.harness)


def reserved_terms(peak: int, persistent: int, step: int, *, gpu: str | None, gpus: int,
                   training: bool, attention: int = 0, replayed_reserved: int | None = None,
                   harness: str = "tuneplan") -> Reserved:
    """The overhead of a GPU estimate. ``peak``: live tensor bytes at the peak; ``persistent``: the
    part that lives across steps; ``step``: what the optimizer step holds beyond it; ``attention``: the
    attention backward workspace. ``replayed_reserved``: simulate's allocator replay of the real
    sequence (max reserved of the tensors), used instead of the fitted cache term. ``harness``: what runs
    the job (training.harness), whose band the estimate carries."""
    arch = arch_of(gpu)
    over = {
        "cuda_context": cuda_context_bytes(arch),
        "cublas_workspace": cublas_workspace_bytes(arch, training),
    }
    if attention:
        over["attention_workspace"] = attention
    if gpus > 1:
        over["nccl_buffers"] = nccl_bytes(gpus)
    if replayed_reserved is not None:
        over["allocator_cache"] = max(replayed_reserved - peak, 0)
        model = "allocator replay of the simulated allocation sequence (advisor/allocator.py)"
    else:
        over["allocator_cache"] = allocator_cache_bytes(peak, persistent, step)
        model = "calibrated analytic terms (advisor/gpu_memory.py)"
    if arch not in CALIBRATED_ARCHS:
        model += f"; {arch or 'this GPU'} has no calibration data: Ampere's context, wider band"
    model += f"; {band_words(arch, harness)}"
    total = peak + sum(over.values())
    return Reserved({k: int(v) for k, v in over.items() if v}, int(band(arch, harness) * total), model,
                    int(band_low(arch, harness) * total), harness)


# What validation shows where the model is known to be short (docs/accuracy.md, "Validation only:
# Mistral-7B, Mixtral-8x7B, Llama-2-70B"; fms-acceleration's A100 runs, never fitted): said to the user
# in the estimate's notes, never added to the numbers or the band (that would be fitting on those rows).
# tests/test_gpu_validate.py checks them against what benchmarks/gpu_validate.py computes now.
SHARDED_ADAPTER_TENSOR_SHORT = (0.06, 0.19)  # dense LoRA / QLoRA sharded over 2 GPUs: tensor peak, least-most
SHARDED_MOE_NVSMI_SHORT = 0.20  # a mixture of experts, LoRA / QLoRA sharded over 2 GPUs: nvidia-smi, most


def known_error(method: str, moe: bool, gpus: int, zero: int, device: str) -> tuple[str, float] | None:
    """The most the estimate was short on held-out published runs of this kind, as (what, share): the
    tensor peak ("allocated", dense LoRA / QLoRA sharded) or the nvidia-smi peak ("reserved", a mixture
    of experts). None where no such runs found it short. What the advice adds before it calls a plan
    fitting (never added to the estimate itself: that would be fitting on validation rows)."""
    if device != "cuda" or gpus < 2 or zero < 3 or method not in ("lora", "qlora"):
        return None
    return ("reserved", SHARDED_MOE_NVSMI_SHORT) if moe else ("allocated", SHARDED_ADAPTER_TENSOR_SHORT[1])


def validation_note(method: str, moe: bool, gpus: int, zero: int, device: str) -> str | None:
    """Words for a plan of the kind where published GPU runs found the estimate short."""
    if device != "cuda" or gpus < 2 or zero < 3 or method not in ("lora", "qlora"):
        return None
    where = ("on published A100 runs of LoRA / QLoRA sharded over 2 GPUs (docs/accuracy.md, validation only, "
             "never fitted)")
    if moe:
        return (f"known error: {where} Mixtral's nvidia-smi peak was up to {SHARDED_MOE_NVSMI_SHORT:.0%} above "
                "this kind of estimate (its allocator reserve is not understood); the band does not include "
                "that: keep the headroom")
    lo, hi = SHARDED_ADAPTER_TENSOR_SHORT
    return (f"known error: {where} the tensor peak was {lo:.0%}-{hi:.0%} above this kind of estimate, more with "
            "a larger micro-batch and the most for a 70B model (the cause is not found); the band does not "
            "include that: keep the headroom")


def modelled_stack(transformers: str | None = None) -> dict[str, str]:
    """The versions of the stack the estimate models: those installed here (importlib.metadata;
    no import of the packages themselves), or 'not installed'; ``transformers``: the plan's
    training.transformers, named instead of the installed release when their rules differ."""
    from importlib import metadata

    from advisor.software import same_rules

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    here = out["transformers"]
    if transformers and (here == "not installed" or not same_rules(transformers, here)):
        out["transformers"] = f"{transformers} (training.transformers; {here} installed)"
    return out
