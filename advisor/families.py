"""What each architecture family's decoder layer saves for backward, as data.

The activation estimate walks a layer as a list of tensors and asks, for each, whether autograd
keeps it (see ``memory.layer_activation_bytes``). The walk is the same for every family; what
differs is recorded here: the norm (llama-style RMSNorm upcasts to fp32; gemma keeps the whole
norm in fp32; LayerNorm saves its input), how many norms a layer has, whether q/k/v come from one
fused projection, the MLP shape, the activation function's saved tensors, dropout, and softcapping.

Each entry was read off the transformers 5 modelling code and checked tensor by tensor with
``torch.autograd.graph.saved_tensors_hooks`` on small models (see docs/memory-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from advisor.software import falcon_attention_interface


@dataclass(frozen=True)
class Family:
    norm: str = "rms"  # rms (llama), rms_fp32 (gemma: (1 + w) in fp32), layernorm
    norms_per_layer: int = 2  # gemma2/3: 4 (pre/post around attention and MLP)
    shared_norm_input: bool = False  # parallel residual: both norms read the same x (gpt_neox)
    single_norm: bool = False  # falcon-7b: one norm feeds attention and MLP
    gated_mlp: bool = True  # SwiGLU / GeGLU: gate, act, up, product saved
    act_saved: int = 1  # tensors of width i the activation function saves (python gelu_new: 4)
    attn_out_copy: bool = False  # attention output copied before the output projection
    cpu_math_attention: bool = False  # CPU sdpa takes the math path (mask/dropout): fp32 q,k,v + s^2
    dropout_attr: tuple[str, ...] = ()  # config fields holding dropout probabilities used in training
    attn_softcap_attr: str | None = None  # needs eager/flash attention (sdpa has no softcap)
    logit_softcap_attr: str | None = None
    qk_norm: bool = False  # qwen3/gemma3: RMSNorm on q and k per head
    moe: bool = False
    learned_positions: bool = False  # position embeddings (GPT-2's wpe) instead of rotary cos / sin
    always_masked: bool = False  # the model builds its attention mask even for unpadded batches (no is_causal skip)
    eager_softmax_fp32: bool = True  # eager attention upcasts the softmax (GPT-2 keeps the input dtype)
    q_proj: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    o_proj: str = "o_proj"
    up_proj: tuple[str, ...] = ("gate_proj", "up_proj")
    down_proj: str = "down_proj"


LLAMA = Family()
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": Family(qk_norm=True),
    # Llama's decoder layer under other names (checked in the registry test, tests/test_registry.py): the same
    # modelling code (exaone, internlm3 and iquestcoder build LlamaForCausalLM), or a copy of it that adds only
    # scalar multipliers (granite), layers without rotary embeddings (smollm3) or sliding-window layer_types
    # (cwm, ministral, ministral3: activations.masked_layer)
    **{mt: LLAMA for mt in ("exaone", "internlm3", "iquestcoder", "granite", "smollm3", "cwm", "ministral",
                            "ministral3")},
    "phi3": Family(attn_out_copy=True, q_proj=("qkv_proj",), up_proj=("gate_up_proj",)),
    "gemma": Family(norm="rms_fp32"),
    "gemma2": Family(norm="rms_fp32", norms_per_layer=4, attn_softcap_attr="attn_logit_softcapping",
                     logit_softcap_attr="final_logit_softcapping"),
    "gemma3_text": Family(norm="rms_fp32", norms_per_layer=4, qk_norm=True,
                          attn_softcap_attr="attn_logit_softcapping",
                          logit_softcap_attr="final_logit_softcapping"),
    "mixtral": Family(moe=True),
    "qwen3_moe": Family(qk_norm=True, moe=True),
    "gpt_neox": Family(norm="layernorm", shared_norm_input=True, gated_mlp=False, attn_out_copy=True,
                       q_proj=("query_key_value",), o_proj="dense", up_proj=("dense_h_to_4h",),
                       down_proj="dense_4h_to_h", dropout_attr=("attention_dropout", "hidden_dropout")),
    "falcon": Family(norm="layernorm", single_norm=True, gated_mlp=False, attn_out_copy=True,
                     cpu_math_attention=True, q_proj=("query_key_value",), o_proj="dense",
                     up_proj=("dense_h_to_4h",), down_proj="dense_4h_to_h",
                     dropout_attr=("attention_dropout", "hidden_dropout")),
    "gpt2": Family(norm="layernorm", gated_mlp=False, act_saved=4, learned_positions=True, attn_out_copy=True,
                   eager_softmax_fp32=False, cpu_math_attention=True, q_proj=("c_attn",), o_proj="c_proj",
                   up_proj=("c_fc",), down_proj="c_proj", dropout_attr=("attn_pdrop", "resid_pdrop", "embd_pdrop")),
    # GPT-J style: attention and MLP in parallel on one LayerNorm's output, a GELU MLP (gelu_new: 4 tensors)
    "gptj": Family(norm="layernorm", single_norm=True, gated_mlp=False, act_saved=4, o_proj="out_proj",
                   up_proj=("fc_in",), down_proj="fc_out", dropout_attr=("attn_pdrop", "resid_pdrop", "embd_pdrop")),
    "codegen": Family(norm="layernorm", single_norm=True, gated_mlp=False, act_saved=4, q_proj=("qkv_proj",),
                      o_proj="out_proj", up_proj=("fc_in",), down_proj="fc_out",
                      dropout_attr=("attn_pdrop", "resid_pdrop", "embd_pdrop")),
    "phi": Family(norm="layernorm", single_norm=True, gated_mlp=False, act_saved=4, o_proj="dense", up_proj=("fc1",),
                  down_proj="fc2", dropout_attr=("attention_dropout", "resid_pdrop", "embd_pdrop")),
}
FAMILIES["gpt-sw3"] = FAMILIES["gpt2"]  # GPT2LMHeadModel


# multimodal wrappers checked with text-only batches (registry test): their language model's family, with the
# towers' parameters left out of what trains (memory.trained_params)
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]


def family_key(model) -> str:
    """The model type whose family applies (a model type, or a ModelShape's own). A multimodal wrapper is only
    covered where it is listed itself (Gemma 3 4B-27B): others (GOT-OCR2, MOSS) differ from their language
    model in what a text-only step keeps."""
    return model if isinstance(model, str) else model.model_type


# transformers 5.25's Falcon: the shared attention interface (software.falcon_attention_interface), whose sdpa
# call takes the fused CPU kernel, and whose model always materializes the causal mask (create_causal_mask with
# allow_is_causal_skip=False, for ALiBi): every layer's sdpa gets a mask, as a padded batch's
FALCON_SHARED_ATTENTION = replace(FAMILIES["falcon"], cpu_math_attention=False, always_masked=True,
                                  attn_out_copy=False)


def family_of(model, version: str = "5") -> tuple[Family, bool]:
    """(family, known) of a model type or a ModelShape on transformers ``version`` (a plan's
    training.transformers; "5" is the installed 5.x): unknown model types are estimated as llama-style and
    flagged (and routed to simulate: :func:`analytic_coverage`)."""
    key = family_key(model)
    fam = FAMILIES.get(key)
    if key == "falcon" and falcon_attention_interface(version):
        fam = FALCON_SHARED_ATTENTION
    return (fam, True) if fam is not None else (LLAMA, False)


# layer kinds of layer_types / layers_block_type that are attention over the cached keys (the analytic rules);
# anything else (mamba, linear_attention, conv, ...) is a recurrent or state-space mixer
_ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "attention", "global", "local",
                              "chunked_attention", "full", "sliding", "indexed_attention", "sparse_attention"})


def _structure(text: dict) -> str:
    """What sets a model apart, in words, from its resolved language-model config (for the routed note)."""
    kinds = set()
    for key in ("layer_types", "layers_block_type", "layers_block_types"):
        if isinstance(text.get(key), list):
            kinds |= {str(k) for k in text[key]}
    recurrent = sorted(kinds - _ATTENTION_KINDS - {"mlp", "moe", "dense", "sparse"})
    if recurrent or any(k.startswith(("mamba_", "ssm_", "linear_num_", "time_step_")) for k in text):
        named = f" ({', '.join(recurrent)})" if recurrent else ""
        return f"recurrent / state-space or linear-attention layers{named}"
    if text.get("kv_lora_rank"):
        return "multi-head latent attention (MLA)"
    if text.get("index_topk") or text.get("index_n_heads"):
        return "sparse attention with a token indexer"
    return ""


def analytic_coverage(shape) -> str | None:
    """None where the analytic rules were checked for this architecture against simulate, which runs the real
    code (tests/test_registry.py: every decoder-only causal LM of the installed transformers, LoRA, full
    fine-tuning and inference within 3%); else why not, in one sentence. Where it says why, the estimate needs
    ``--mode simulate``: the analytic numbers of such a model can be off by tens of percent."""
    fam, known = family_of(shape)
    if known:
        return None
    what = _structure(getattr(shape, "text_config", None) or {})
    kind = f"{shape.model_type!r} ({what})" if what else repr(shape.model_type)
    return (f"{kind} is not modelled analytically: no activation profile of this architecture was checked "
            "against its real code; use --mode simulate, which runs it")


def lora_problem(shape, targets="all-linear") -> str | None:
    """Why peft refuses LoRA with these targets on this model, or None. peft's own check runs (on a stand-in
    with the model's config), so what it refuses here is what it refuses in a real run: all-linear on a
    Mamba-based model (falcon_h1, mamba, mamba2, falcon_mamba, nemotron_h) reaches the mixer's out_proj and
    conv1d, which its LoRA cannot wrap (peft raises "incompatible with Mamba-based models")."""
    try:
        from peft import LoraConfig
        from peft.tuners import tuners_utils
    except Exception:  # noqa: BLE001 - no peft: nothing to ask
        return None
    check = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    if check is None:
        return None
    class _Stub:
        class config:  # noqa: N801 - the attribute peft reads
            model_type = shape.model_type
    wanted = shape.lora_groups(targets)
    cfg = LoraConfig(r=8, target_modules=targets if targets == "all-linear" else list(targets))
    for g in wanted:
        try:
            check(cfg, _Stub, g.leaf)
        except ValueError as e:
            first = str(e).splitlines()[0]
            return (f"peft refuses LoRA on {shape.model_type}'s {g.leaf!r} ({first}); name the targets it can wrap, "
                    "e.g. --lora-targets q_proj,k_proj,v_proj,o_proj")
    return None
