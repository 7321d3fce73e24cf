"""Which transformers release the run uses, and what that changes in memory (``training.transformers``).

tuneplan runs and is calibrated on transformers 5 (the runner's own stack); many published runs and
many users' machines are on 4.x. Two differences decide memory, each read from transformers' source
and measured on the CPU on both stacks (benchmarks/stack_cpu.py, docs/accuracy.md):

* The loss. ``ForCausalLMLoss`` (transformers/loss/loss_utils.py, 4.46-4.48) upcasts the logits to
  fp32 and then makes a contiguous fp32 copy of the shifted logits (``logits[..., :-1, :].contiguous()``)
  before the cross-entropy; from 4.49 on it shifts the labels instead (``nn.functional.pad(labels, (0, 1))``).
  So on 4.46-4.48 the forward holds one more fp32 copy of the logits: 4 bytes per token and vocabulary
  entry (:func:`shifted_logits_copy`).
* Mixture-of-experts layers. 4.x keeps one ``nn.Linear`` per expert (Mixtral's ``w1``/``w3``/``w2`` in an
  ``nn.ModuleList``), which bitsandbytes quantizes and peft adapts one by one; transformers 5 fuses the
  experts into 3-D tensors (``gate_up_proj``, ``down_proj``), which bitsandbytes leaves unquantized
  (bitsandbytes issue #1849). :func:`layout` turns the fused groups that the shape counts on the installed
  transformers 5 back into the 4.x per-expert linears.

Releases before 4.46 computed the loss inside each model's forward (and kept fp32 logits in the output):
not modelled, refused with a message. Pure: no torch, no transformers.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace

DEFAULT = "5"
# the transformers releases whose code the analytic rules were checked against: every decoder-only causal LM
# they register (tests/test_registry.py) and the measured calibration cases; an estimate on a newer installed
# release says so (release_note)
CHECKED = ("5.24", "5.25")
OLDEST = (4, 46)
NEWEST_4X = (4, 57)  # the last 4.x release (4.57, 2025); 5.0 followed
SUPPORTED = "5 (the default, what `tuneplan run` uses) or 4.46 to 4.57"

# model types whose 4.x code keeps an nn.ModuleList of per-expert MLPs (names of their linears:
# gate / up / down); others (gpt-oss, granitemoe) had fused expert parameters already in 4.x
PER_EXPERT_LINEARS = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                      "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                      "olmoe": ("gate_proj", "up_proj", "down_proj"),
                      "phimoe": ("w1", "w3", "w2")}


def has_fused_experts(shape) -> bool:
    """The shape counts transformers 5's fused 3-D expert tensors (:func:`layout` has not unfused them)."""
    return any(g.experts > 1 for g in shape.linears)


def expert_leaves(model_type: str) -> tuple[str, str, str]:
    """Names of a per-expert MLP's gate / up / down linears on 4.x."""
    return PER_EXPERT_LINEARS.get(model_type, ("gate_proj", "up_proj", "down_proj"))


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '4.48', '4.48.1' or '5'."""
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)?(?:[.-]?\w+)?\s*", str(version))
    if not m:
        raise ValueError(f"{version!r} is not a transformers version; use {SUPPORTED}")
    return int(m.group(1)), int(m.group(2) or 0)


def problem(version: str) -> str | None:
    """Why this release is not modelled, or None."""
    try:
        major, minor = release(version)
    except ValueError as e:
        return str(e)
    if major >= 6 or (major, minor) < OLDEST or (major == 4 and (major, minor) > NEWEST_4X):
        older = (" (earlier releases compute the loss inside each model's forward and keep fp32 logits in "
                 "the output, which tuneplan does not model)") if (major, minor) < OLDEST else \
            (" (there is no such 4.x release: 4.57 was the last)" if major == 4 else "")
        return f"transformers {version} is not modelled{older}; use {SUPPORTED}"
    return None


def shifted_logits_copy(version: str) -> bool:
    """4.46-4.48: the loss copies the shifted fp32 logits (one more fp32 logits tensor in the forward)."""
    return release(version) < (4, 49)


def fuses_experts(version: str) -> bool:
    """transformers 5 fuses MoE experts into 3-D tensors; 4.x keeps one nn.Linear per expert."""
    return release(version) >= (5, 0)


def softcap_refuses_sdpa(version: str) -> bool:
    """transformers 5 marks Gemma 2 (attention logit soft-capping) as not supporting sdpa
    (``Gemma2PreTrainedModel._supports_sdpa = False``, checked in 5.24), so a request for sdpa loads eager
    attention; 4.48 has ``_supports_sdpa = True`` and runs sdpa as asked, without the attention soft-capping
    (checked in 4.48.1; the 4.x releases in between are assumed to do the same)."""
    return release(version) >= (5, 0)


def masks_only_when_padded(version: str) -> bool:
    """transformers 5 (masking_utils) gives sdpa no mask for an unpadded causal batch and then uses sdpa's
    grouped-query attention; a padded batch gets a boolean mask and k, v repeated to every head. 4.x
    (checked in 4.48.1) always repeats k and v (``repeat_kv`` in its sdpa integration) and builds one
    float mask per forward for a padded batch (``_prepare_4d_causal_attention_mask_with_cache_position``)."""
    return release(version) >= (5, 0)


def effective(version: str) -> str:
    """The release a plan's ``training.transformers`` means: a bare major ("5", the default) is the installed
    release of that major (what the runner and simulate run), else the newest checked one; a full version is
    itself."""
    if re.fullmatch(r"\s*\d+\s*", str(version)):
        here = installed()
        if here and not problem(here) and release(here)[0] == int(version):
            return here
        if int(version) == release(CHECKED[-1])[0]:
            return CHECKED[-1]
    return str(version)


def falcon_attention_interface(version: str) -> bool:
    """transformers 5.25 rewrote Falcon's attention onto the shared attention interface (modeling_falcon.py:
    ``ALL_ATTENTION_FUNCTIONS`` with ``eager_attention_forward``, ALiBi through the mask): sdpa gets the query,
    key and value split from the fused projection, with ``enable_gqa`` for the single multi-query key/value
    head, so the CPU takes its fused kernel instead of the math path. Up to 5.24 (and on 4.x) Falcon called
    ``scaled_dot_product_attention`` itself with one key/value head and no ``enable_gqa``, which sends torch to
    the math path (fp32 copies and the score matrix). Checked in 5.24.0 and 5.25.0."""
    return release(effective(version)) >= (5, 25)


def _rules(v: str) -> tuple[bool, ...]:
    return (shifted_logits_copy(v), fuses_experts(v), softcap_refuses_sdpa(v), masks_only_when_padded(v),
            falcon_attention_interface(v))


def same_rules(a: str, b: str) -> bool:
    """Whether two releases get the same memory rules here."""
    return _rules(a) == _rules(b)


def expert_width(shape) -> int:
    """The MLP width of one routed expert, read off the fused down_proj tensor (experts, hidden, width): the
    config's moe_intermediate_size where a family has one (Qwen3-MoE, OLMoE's dense intermediate_size is not the
    experts'), else intermediate_size (Mixtral)."""
    for g in shape.linears:
        if g.experts > 1 and g.leaf == "down_proj":
            return g.in_features
    return shape.intermediate_size


def layout(shape, version: str):
    """The shape as ``version`` builds the model: its MoE layers' MLP width is the experts' (:func:`expert_width`);
    on 4.x the fused expert tensors (and the router) become per-expert nn.Linear layers, quantized under QLoRA
    and adapted one by one by LoRA. Unchanged on 5 and for models without fused experts."""
    if shape.num_experts and expert_width(shape) != shape.intermediate_size:
        shape = replace(shape, intermediate_size=expert_width(shape))
    names = PER_EXPERT_LINEARS.get(shape.model_type)
    if fuses_experts(version) or not names or not has_fused_experts(shape):
        return shape
    gate, up, down = names
    out = []
    for g in shape.linears:
        base = g.path.rsplit(".", 1)[0]
        if g.experts > 1 and g.leaf == "gate_up_proj":  # (experts, 2 x inter, hidden): gate and up
            for leaf in (gate, up):
                out.append(replace(g, path=f"{base}.*.{leaf}", out_features=g.out_features // 2,
                                   count=g.count * g.experts, experts=1, rank_mult=1, quantized=True))
        elif g.experts > 1:  # down_proj: (experts, hidden, inter)
            out.append(replace(g, path=f"{base}.*.{down}", count=g.count * g.experts, experts=1, rank_mult=1,
                               quantized=True))
        elif not g.quantized and g.path.endswith((".gate", ".router")):  # the router: an nn.Linear on 4.x
            out.append(replace(g, quantized=True))
        else:
            out.append(g)
    return replace(shape, linears=tuple(out))


@functools.lru_cache(maxsize=1)
def installed() -> str | None:
    """The transformers version installed here (package metadata, read once; nothing is imported), or None."""
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def newer_than_checked() -> str | None:
    """The installed transformers when it is newer than every release the analytic rules were checked on."""
    here = installed()
    if here is None or problem(here):
        return None
    return here if release(here) > max(release(v) for v in CHECKED) else None


def release_note(mode: str) -> str | None:
    """One line for an estimate made with ``mode`` ("analytic" or "simulate") on a transformers newer than the
    releases the analytic rules were checked on, or None."""
    here = newer_than_checked()
    if here is None:
        return None
    upto = CHECKED[-1]
    if mode == "simulate":
        return (f"simulated with the installed transformers {here}, its own code (the analytic rules were checked "
                f"up to {upto})")
    return (f"analytic rules checked on transformers up to {upto}; the installed {here} is newer and not yet "
            "checked: --mode simulate runs its own code")


def mismatch(version: str, what: str) -> str | None:
    """Why ``what`` (a step that runs the installed transformers) cannot follow a plan made for ``version``,
    or None when the installed release gets the same memory rules."""
    here = installed()
    if here is None or problem(here) or same_rules(version, here):
        return None
    return (f"the plan models transformers {version} (training.transformers) but {what} runs the installed "
            f"transformers {here}, whose memory differs")
