"""Serving memory: weights (precision, LLM.int8 or NF4), KV cache, prefill and decode moments."""

from __future__ import annotations

from advisor.breakdown import DTYPE_BYTES, Breakdown, gpu_terms, nf4_bytes, shard
from advisor.families import family_of
from advisor.model import ModelShape
from advisor.spec import Hardware, InferSpec


def inference_weights_bytes(shape: ModelShape, s: InferSpec) -> int:
    """Serving weights: the precision's bytes, or LLM.int8 (int8 + an fp32 scale per output row),
    or NF4 with double quantization; embeddings, norms and the head stay in the precision."""
    b = DTYPE_BYTES[s.precision]
    if s.weight_quant == "none":
        return shape.params_total * b
    quant = 0
    for g in shape.linears:
        if not g.quantized:
            continue
        n = g.in_features * g.out_features
        quant += g.count * (n + 4 * g.out_features if s.weight_quant == "int8" else nf4_bytes(n, True))
    return quant + (shape.params_total - shape.params_quantized) * b


def kv_cache_bytes(shape: ModelShape, s: InferSpec) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes."""
    kb = 1 if s.kv_cache_dtype == "fp8" else DTYPE_BYTES[s.precision]
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * s.seq_len * s.batch * kb


# CPU sdpa takes the math path in inference too (a mask is always passed); GPT-2 takes it in training
# only, for its dropout: in eval it gets the CPU flash kernel like the rest
INFER_CPU_MATH = frozenset({"falcon"})


def prefill_activation_bytes(shape: ModelShape, s: InferSpec, attn_impl: str = "sdpa", device: str = "cuda") -> int:
    """No autograd: only one layer's temporaries are alive at once, beside the hidden-sized tensors
    that outlive them. The widest moment of the last layer is the larger of
    - the MLP: gated (SwiGLU/GeGLU): act output, up output and their product (3 x i; a fused
      gate_up projection keeps its 2i output alive as the two halves' storage: 4 x i); plain MLPs:
      fc output + activation (exact GELU: 2 x i; GPT-2's Python gelu_new: 4 x i),
    - the attention: q, k, v and output; eager attention adds the nh x s scores, their fp32 softmax
      and its cast (+ the tanh chain under softcapping); CPU math-path SDPA upcasts q, k, v to fp32
      and holds two fp32 nh x s matrices,
    - a norm (fp32 copy of x and the cast back),
    and hidden-sized tensors: the layer input (held by the model's loop), the embedding output
    (held by the model's forward from the second layer on), the residual and the normed input -- 4
    of them (3 with one layer; GPT-2 holds its token and position embeddings apart: 5). Rotary
    models add cos and sin (prompt x head_dim, not per sequence), GPT-2 its position embeddings.
    generate() computes logits for the last position only (+ an fp32 copy)."""
    fam, _ = family_of(shape.model_type)
    a = DTYPE_BYTES[s.precision]
    prompt = s.prompt_len or s.seq_len
    tokens = s.batch * prompt
    h, nh = shape.hidden_size, shape.num_heads
    qd, kvd = nh * shape.head_dim, shape.num_kv_heads * shape.head_dim
    i = shape.intermediate_size * (shape.experts_per_token if shape.num_experts else 1)
    if fam.moe:  # per routed expert: gathered input, gate_up output, act output, product; + accumulator
        k = max(shape.experts_per_token, 1)
        mlp = k * a * (h + 4 * shape.intermediate_size) + a * h
    elif fam.gated_mlp:
        mlp = (4 if len(fam.up_proj) == 1 else 3) * a * i
    else:
        mlp = (4 if fam.act_saved > 1 else 2) * a * i
    softcap = bool(fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr))
    if softcap and attn_impl == "sdpa":
        attn_impl = "eager"
    if attn_impl == "eager":
        attn = 3 * a * qd + nh * prompt * (4 + a + (2 * a if softcap else 0))
    elif device == "cpu" and shape.model_type in INFER_CPU_MATH:
        attn = 3 * 4 * qd + 2 * 4 * nh * prompt
    else:
        attn = a * (2 * qd + 2 * kvd) + 4 * nh
    norm = 4 * h + a * h if fam.norm != "layernorm" else a * h
    hidden = (4 if shape.num_layers > 1 else 3) * a * h
    if shape.model_type == "gpt2":
        # learned positions: the model holds the token embeddings, the position embeddings (one
        # sequence's worth) and their sum, which is the first layer's input
        hidden += a * h
        positions = prompt * h * a
    else:
        positions = 2 * prompt * shape.head_dim * a  # rotary cos and sin
    per_token = max(mlp, attn, norm) + hidden
    return tokens * per_token + positions + s.batch * shape.vocab_size * (a + 4)


def estimate_inference(shape: ModelShape, s: InferSpec, hw: Hardware, attn_impl: str = "sdpa") -> Breakdown:
    """Two moments: the prefill (cache holds the prompt, one layer's temporaries) and the last
    decode step (cache holds seq_len tokens, and the larger of: DynamicCache's torch.cat briefly
    holding one layer's old keys beside the new, or choosing the token from one position's logits)."""
    w = inference_weights_bytes(shape, s)
    kv = kv_cache_bytes(shape, s)
    prompt = s.prompt_len or s.seq_len
    kv_prompt = kv * prompt // s.seq_len
    pre = prefill_activation_bytes(shape, s, attn_impl, hw.device)
    # DynamicCache grows by torch.cat, keys then values: one layer's old keys (or values) coexist
    # with the new ones for a moment
    grow = kv // max(shape.num_layers, 1) // 2
    # choosing the next token: the last position's logits, their fp32 copy, the processed scores and
    # the where() output, plus generate's vocabulary-sized index and EOS mask
    step_logits = s.batch * shape.vocab_size * (DTYPE_BYTES[s.precision] + 12) + 9 * shape.vocab_size
    parts = {"weights": w, "kv_cache": kv, "kv_prompt": kv_prompt, "pre": pre, "grow": grow, "logits": step_logits}
    if hw.gpus > 1:  # tensor parallel: weights, KV heads and activations split
        parts = {k: shard(v, hw.gpus) for k, v in parts.items()}
    phases = {
        "prefill": {"weights": parts["weights"], "kv_cache": parts["kv_prompt"], "prefill_activations": parts["pre"]},
        "decode": {"weights": parts["weights"], "kv_cache": parts["kv_cache"],
                   "transient": max(parts["grow"], parts["logits"])},
    }
    phases = {k: {c: v for c, v in comps.items() if v} for k, comps in phases.items()}
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    return Breakdown(phases[peak], peak, totals, **gpu_terms(totals[peak], phases[peak], hw, training=False))

