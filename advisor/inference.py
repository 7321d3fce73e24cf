"""Serving memory: weights (precision, LLM.int8 or NF4), KV cache, prefill and decode moments."""

from __future__ import annotations

from advisor.breakdown import DTYPE_BYTES, Breakdown, gpu_terms, nf4_bytes, shard
from advisor.families import family_of
from advisor.model import ModelShape
from advisor.software import layout
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


def layer_windows(shape: ModelShape) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), as transformers builds them: a
    "sliding_attention" entry of the language model's layer_types (resolved: ModelShape.text_config, so a
    multimodal Gemma 3's come from its text_config), or every layer when there is no layer_types and
    sliding_window is set (transformers cache_utils.get_layer_types_and_kwargs, masking_utils)."""
    n = shape.num_layers
    window = shape.features.get("sliding_window") if isinstance(shape.features, dict) else None
    if not window:
        return [None] * n
    types = (shape.text_config or {}).get("layer_types")
    if not isinstance(types, list) or not types:
        types = (shape.config or {}).get("layer_types")
    if isinstance(types, list) and types:
        kinds = [str(t) for t in types[:n]] + ["full_attention"] * max(n - len(types), 0)
        return [int(window) if k == "sliding_attention" else None for k in kinds]
    return [int(window)] * n


def sliding_layers(shape: ModelShape) -> tuple[int, int | None]:
    """(layers with a sliding-window cache, the window): DynamicCache(config=...) makes a
    DynamicSlidingWindowLayer for each sliding layer (:func:`layer_windows`)."""
    windows = [w for w in layer_windows(shape) if w]
    return len(windows), (windows[0] if windows else None)


def kv_cache_bytes(shape: ModelShape, s: InferSpec, tokens: int | None = None) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes; a sliding-window layer
    holds at most the window (its update keeps the last window - 1 tokens as a view of the
    torch.cat of the old ones and the new one, so the cat's window-token storage stays)."""
    tokens = s.seq_len if tokens is None else tokens
    kb = 1 if s.kv_cache_dtype == "fp8" else DTYPE_BYTES[s.precision]
    n_slide, window = sliding_layers(shape)
    per_token = 2 * shape.num_kv_heads * shape.head_dim * s.batch * kb
    return per_token * ((shape.num_layers - n_slide) * tokens + n_slide * min(tokens, window or tokens))


def math_path(shape: ModelShape, device: str) -> bool:
    """Whether torch's CPU sdpa takes its math path in generation: a family that hands sdpa its multi-query
    key/value heads as they are (no repeat_kv, no enable_gqa: Falcon up to transformers 5.24, GPT-BigCode,
    whose attention module has no num_key_value_groups for the sdpa integration) -- the fused kernels need as many
    key/value heads as query heads (torch sdp_utils check_batch_size_and_num_heads_dense). GPT-2 takes it in
    training only, for its dropout: in eval it gets the CPU flash kernel like the rest."""
    fam, _ = family_of(shape)
    return device == "cpu" and fam.cpu_math_attention and shape.num_kv_heads < shape.num_heads


def math_attention_bytes(shape: ModelShape, batch: int, q_len: int, kv_len: int, a: int) -> int:
    """Temporaries of torch's math attention (aten/src/ATen/native/transformers/attention.cpp,
    _scaled_dot_product_attention_math) at its widest moment: bf16/fp16 q, k and v are upcast to
    fp32 (kept to the end), q and k are each scaled by sqrt(scale); then the larger of
    - q @ k^T: matmul broadcasts the scaled k over the query heads and copies it out contiguous
      (when there are fewer key/value heads), beside the fp32 nh x q x kv scores;
    - the softmax (_safe_softmax): the scores (the mask is added in place), the softmax output and
      the bool -inf mask of the same shape."""
    nh, kvh, hd = shape.num_heads, shape.num_kv_heads, shape.head_dim
    up = 1 if a < 4 else 0
    base = 4 * batch * hd * (q_len * nh * (1 + up) + 2 * kv_len * kvh * up)
    scores = batch * nh * q_len * kv_len
    bcast = nh * kv_len if kvh < nh else 0
    matmul = base + 4 * batch * hd * (kv_len * kvh + bcast) + 4 * scores
    softmax = base + 9 * scores
    return max(matmul, softmax)


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
    fam, _ = family_of(shape)
    shape = layout(shape, "5")  # a MoE layer's width is its experts' (software.expert_width)
    a = DTYPE_BYTES[s.precision]
    prompt = s.prompt_len or s.seq_len
    tokens = s.batch * prompt
    h, nh = shape.hidden_size, shape.num_heads
    qd, kvd = nh * shape.head_dim, shape.num_kv_heads * shape.head_dim
    i = shape.intermediate_size * (shape.experts_per_token if shape.num_experts else 1)
    if fam.moe:
        # transformers 5's grouped experts (integrations/moe.py grouped_mm_experts_forward), per routed token:
        # the gathered input beside the gate_up output, the activation and the product (h + 4 x i), then,
        # the input still held, the down projection's output, its weighted copy and that copy put back in
        # token order (4 x h: the wider moment when the experts are narrower than the model); beside them the
        # routing's bookkeeping: the router logits and their fp32 softmax (per token), the top-k indices, their
        # sort, permutation, inverse permutation and its arange (int64) and the fp32 routing weights, twice
        k = max(shape.experts_per_token, 1)
        mlp = k * a * max(h + 4 * shape.intermediate_size, 4 * h) + k * (5 * 8 + 2 * 4) + shape.num_experts * (a + 4)
    elif fam.gated_mlp:
        mlp = (4 if len(fam.up_proj) == 1 else 3) * a * i
    else:
        mlp = (4 if fam.act_saved > 1 else 2) * a * i
    softcap = bool(fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr))
    if softcap and attn_impl == "sdpa":
        attn_impl = "eager"
    if attn_impl == "eager":
        # the scores, then F.softmax(..., dtype=float32): softmax.int casts its input to fp32 first
        # (a copy below the dispatcher when the scores are bf16/fp16) beside the fp32 output; the
        # softcapping chain (mul, tanh, mul) and the cast back replace the scores one at a time
        attn = 3 * a * qd + nh * prompt * (a + 4 + (4 if a < 4 else 0))
        # eager attention gets a materialized b x 1 x prompt x prompt mask in the compute dtype
        # (masking_utils; sdpa's is skipped for is_causal); a model with sliding and full layers
        # builds both (create_causal_mask and create_sliding_window_causal_mask)
        n_slide, _ = sliding_layers(shape)
        attn += (2 if 0 < n_slide < shape.num_layers else 1) * prompt * a
    elif math_path(shape, device):
        # Falcon's fused query_key_value output (its q, k, v are views of it), the copies that
        # transpose(1, 2).reshape makes of q, k and v, the rotary outputs of q and k, and the math
        # kernel's temporaries
        attn = (a * (qd + 2 * kvd) + a * (2 * qd + 3 * kvd)
                + math_attention_bytes(shape, s.batch, prompt, prompt, a) // tokens)
    else:
        attn = a * (2 * qd + 2 * kvd) + 4 * nh
    # sdpa layers that get a mask (a family that always builds one, a sliding window the prompt reaches:
    # activations.masked_layer): the boolean masks live through the forward -- (1, 1, prompt, prompt) each, as
    # generate drops the all-ones attention mask and masking_utils expands the causal pattern over the batch
    # as a view -- and a masked layer's sdpa call makes an additive copy in the compute dtype over the whole
    # batch and gets k and v repeated to every query head (repeat_kv: a copy unless there is one key/value head)
    masks = 0
    if attn_impl != "eager" and not math_path(shape, device):
        kinds = {w for w in layer_windows(shape) if fam.always_masked or (w is not None and prompt >= w)}
        masks = len(kinds)
        if kinds:
            attn += prompt * a + (2 * a * qd if 1 < shape.num_kv_heads < nh else 0)
    norm = 4 * h + a * h if fam.norm != "layernorm" else a * h
    hidden = (4 if shape.num_layers > 1 else 3) * a * h
    if fam.learned_positions:
        # learned positions: the model holds the token embeddings, the position embeddings (one
        # sequence's worth) and their sum, which is the first layer's input
        hidden += a * h
        positions = prompt * h * a
    else:
        positions = 2 * prompt * shape.head_dim * a  # rotary cos and sin
    per_token = max(mlp, attn, norm) + hidden
    return tokens * per_token + positions + masks * prompt * prompt + s.batch * shape.vocab_size * (a + 4)


def has_eos(shape: ModelShape) -> bool:
    """Whether generate gets an EOS token from the model's config (the length processors that
    generate_step's min_new_tokens adds are skipped without one)."""
    cfg = shape.config or {}
    text = cfg.get("text_config")
    text = text if isinstance(text, dict) else {}
    eos = cfg.get("eos_token_id", text.get("eos_token_id"))
    return eos is not None and eos != []


def estimate_inference(shape: ModelShape, s: InferSpec, hw: Hardware, attn_impl: str = "sdpa") -> Breakdown:
    """Two moments: the prefill (cache holds the prompt, one layer's temporaries) and the last
    decode step (cache holds seq_len tokens, and the larger of: DynamicCache's torch.cat briefly
    holding one layer's old keys beside the new, or choosing the token from one position's logits)."""
    w = inference_weights_bytes(shape, s)
    kv = kv_cache_bytes(shape, s)
    prompt = s.prompt_len or s.seq_len
    # the prefill's cache: a sliding layer's update slices its torch.cat of all prompt tokens (a
    # view), so the prompt's whole storage stays until the first decode step replaces it
    kv_prompt = kv * prompt // s.seq_len if not sliding_layers(shape)[0] else (
        2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * prompt * s.batch
        * (1 if s.kv_cache_dtype == "fp8" else DTYPE_BYTES[s.precision]))
    pre = prefill_activation_bytes(shape, s, attn_impl, hw.device)
    # DynamicCache grows by torch.cat, keys then values: one layer's old keys (or values) coexist
    # with the new ones for a moment
    grow = kv // max(shape.num_layers, 1) // 2
    # generate's _sample keeps the previous step's next_token_logits and next_token_scores (fp32,
    # batch x vocab each) until it reassigns them after the next forward (it dels only outputs), so
    # both live through every decode forward; and its ids and attention mask (int64)
    bv = s.batch * shape.vocab_size
    ids = 2 * 8 * s.batch * s.seq_len
    if has_eos(shape):
        held = 2 * 4 * bv + ids
        # choosing the next token: the last position's logits and their fp32 copy; min_new_tokens
        # also sets min_length (_prepare_generated_length), so two processors run:
        # MinLengthLogitsProcessor's where() output, then MinNewTokensLengthLogitsProcessor's clone
        # and where() output (with its arange and isin mask over the vocabulary), beside the
        # previous step's scores, held until the processors' output replaces them
        step_logits = bv * (DTYPE_BYTES[s.precision] + 20) + 9 * shape.vocab_size + ids
    else:
        # no EOS token: generate adds neither processor (both need _eos_token_tensor), the scores
        # are the fp32 logits themselves; the new copy is made beside the previous one
        held = 4 * bv + ids
        step_logits = bv * (DTYPE_BYTES[s.precision] + 8) + ids
    # the decode forward's own widest moment beside those: the cache's torch.cat, or (math-path
    # attention) the last step's attention over seq_len tokens
    fwd = grow
    fam, _ = family_of(shape)
    softcap = bool(fam.attn_softcap_attr and shape.features.get(fam.attn_softcap_attr))
    if (attn_impl == "eager" or softcap) and shape.num_kv_heads < shape.num_heads:
        # eager attention (eager_attention_forward) repeats the key/value heads to the query heads
        # (repeat_kv: expand + reshape, a copy) over the widest layer's cached tokens, beside the
        # nh x 1 x tokens scores, their fp32 softmax and its cast (+ the tanh chain under softcapping)
        n_slide, window = sliding_layers(shape)
        t = s.seq_len if n_slide < shape.num_layers else min(s.seq_len, window or s.seq_len)
        a = DTYPE_BYTES[s.precision]
        fwd = max(fwd, 2 * s.batch * shape.num_heads * t * shape.head_dim * a
                  + s.batch * shape.num_heads * t * (4 + a + (2 * a if softcap else 0)))
    if math_path(shape, hw.device) and attn_impl == "sdpa":
        fwd = max(fwd, math_attention_bytes(shape, s.batch, 1, s.seq_len, DTYPE_BYTES[s.precision]))
    parts = {"weights": w, "kv_cache": kv, "kv_prompt": kv_prompt, "pre": pre, "fwd": fwd + held,
             "logits": step_logits}
    if hw.gpus > 1:  # tensor parallel: weights, KV heads and activations split
        parts = {k: shard(v, hw.gpus) for k, v in parts.items()}
    phases = {
        "prefill": {"weights": parts["weights"], "kv_cache": parts["kv_prompt"], "prefill_activations": parts["pre"]},
        "decode": {"weights": parts["weights"], "kv_cache": parts["kv_cache"],
                   "transient": max(parts["fwd"], parts["logits"])},
    }
    phases = {k: {c: v for c, v in comps.items() if v} for k, comps in phases.items()}
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    return Breakdown(phases[peak], peak, totals, **gpu_terms(totals[peak], phases[peak], hw, training=False))

