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

from dataclasses import dataclass


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
    "phi3": Family(attn_out_copy=True, q_proj=("qkv_proj",), up_proj=("gate_up_proj",)),
    "gemma": Family(norm="rms_fp32"),
    "gemma2": Family(norm="rms_fp32", norms_per_layer=4, attn_softcap_attr="attn_logit_softcapping",
                     logit_softcap_attr="final_logit_softcapping"),
    "gemma3_text": Family(norm="rms_fp32", norms_per_layer=4, qk_norm=True,
                          attn_softcap_attr="attn_logit_softcapping",
                          logit_softcap_attr="final_logit_softcapping"),
    "mixtral": Family(moe=True),
    "gpt_neox": Family(norm="layernorm", shared_norm_input=True, gated_mlp=False, attn_out_copy=True,
                       q_proj=("query_key_value",), o_proj="dense", up_proj=("dense_h_to_4h",),
                       down_proj="dense_4h_to_h", dropout_attr=("attention_dropout", "hidden_dropout")),
    "falcon": Family(norm="layernorm", single_norm=True, gated_mlp=False, attn_out_copy=True,
                     cpu_math_attention=True, q_proj=("query_key_value",), o_proj="dense",
                     up_proj=("dense_h_to_4h",), down_proj="dense_4h_to_h",
                     dropout_attr=("attention_dropout", "hidden_dropout")),
    "gpt2": Family(norm="layernorm", gated_mlp=False, act_saved=4, attn_out_copy=True, eager_softmax_fp32=False,
                   cpu_math_attention=True, q_proj=("c_attn",), o_proj="c_proj", up_proj=("c_fc",),
                   down_proj="c_proj", dropout_attr=("attn_pdrop", "resid_pdrop", "embd_pdrop")),
}


def family_of(model_type: str) -> tuple[Family, bool]:
    """(family, known): unknown model types are estimated as llama-style and flagged."""
    fam = FAMILIES.get(model_type)
    return (fam, True) if fam is not None else (LLAMA, False)
