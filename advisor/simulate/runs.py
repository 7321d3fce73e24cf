"""One steady-state training step and one generation, simulated."""

from __future__ import annotations

import math

from advisor.model import ModelShape
from advisor.simulate.common import DECODE_STEPS_FULL, INFER_PHASES, TRAIN_PHASES, Progress, SimulateError
from advisor.simulate.experts import GroupedExperts
from advisor.simulate.fakes import (
    _config_with_layers,
    _from_config,
    _hf_config,
    _num_layers,
    _optimizer,
    _optimizer_state_tensors,
    _peft_bnb_forward,
    _preimport,
    _quantize_nf4,
)
from advisor.simulate.tracker import (
    _hooks,
    _make_tracker,
    _RealMasks,
    _Rec,
    _Result,
    event_tokens,
    replay_reserved,
)
from advisor.spec import Plan, padded_batches

# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------

def _build_training(plan: Plan, shape: ModelShape, config: dict):
    """The model as advisor.stack.load_for_training builds it, on fake tensors."""
    from advisor.stack import compute_dtype, enable_checkpointing, lora_config, param_dtype

    t = plan.training
    if t.attn_impl == "flash_attention_2":
        attn = "sdpa"  # same memory class (no s x s matrix); flash needs a GPU and real data
    else:
        attn = t.attn_impl
    model, attn_used = _from_config(_hf_config(config), param_dtype(t.precision), attn)
    quantized: list = []
    if t.method == "qlora":
        from peft import prepare_model_for_kbit_training

        quantized = _quantize_nf4(model, shape, compute_dtype(t.precision), t.double_quant)
        model.is_loaded_in_4bit = True
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=t.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        del model.is_loaded_in_4bit
    elif t.grad_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    if t.offload_activations and t.grad_checkpointing:  # as advisor.stack.load_for_training, host copies counted
        from advisor.stack import offload_checkpoints

        host = _HostCount(pow2=plan.hardware.device == "cuda")  # (its tag is set by _train_run on the CPU)
        offload_checkpoints(model, hooks=lambda: _SimOffload(host))
        model.tuneplan_host = host
    if t.method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(t))
        if quantized:
            _peft_bnb_forward(model, quantized)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, attn_used


class _HostCount:
    """Host bytes held by offloaded activations, now and at most (pinned blocks rounded up to a power of two on a
    GPU, as torch's CachingHostAllocator does: advisor.activations.offloaded_host_bytes)."""

    def __init__(self, pow2: bool):
        self.pow2, self.now, self.peak = pow2, 0, 0
        self.tag = None  # on the CPU: tags each host copy for the tracker (the same RAM)

    def add(self, n: int) -> int:
        n = 1 << (n - 1).bit_length() if self.pow2 and n > 0 else n
        self.now += n
        self.peak = max(self.peak, self.now)
        return n


class _HostCopy:
    """What advisor.stack.HostOffload keeps in host memory: its shape, dtype and size; on the CPU, where host memory
    is the RAM the step is measured in, the copy itself too (a tensor tagged ``offloaded_activations``)."""

    def __init__(self, t, host: _HostCount):
        import torch

        self.shape, self.dtype, self.device, self.host = t.shape, t.dtype, t.device, host
        self.nbytes = host.add(t.numel() * t.element_size())
        self.copy = None
        if host.tag is not None:
            self.copy = torch.empty(t.shape, dtype=t.dtype)
            host.tag(self.copy)

    def __del__(self):
        self.host.now -= self.nbytes


def _SimOffload(host: _HostCount):
    """advisor.stack.HostOffload on fake tensors: the saved tensor leaves the device (nothing keeps it there) and
    is counted on the host; backward gets a new device tensor of its shape, as the copy back makes."""
    import torch

    def unpack(c: _HostCopy):
        return torch.empty(c.shape, dtype=c.dtype, device=c.device)

    return torch.autograd.graph.saved_tensors_hooks(lambda t: _HostCopy(t, host), unpack)


def _autocast(precision: str):
    import contextlib

    import torch

    if precision.startswith("amp-"):
        dt = torch.bfloat16 if precision == "amp-bf16" else torch.float16
        return torch.autocast(device_type="cpu", dtype=dt)
    return contextlib.nullcontext()


def _train_run(plan: Plan, shape: ModelShape, n_layers: int | None, progress: Progress | None,
               p0: float, p1: float, as_tokens: bool = False) -> _Result:
    """One simulated training run. ``as_tokens``: return the allocation sequence as tokens (for the
    extrapolation of the allocator replay) instead of replaying it."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = plan.training
    config = _config_with_layers(shape.config, n_layers)
    tracker = _make_tracker(cpu=plan.hardware.device == "cpu")
    vocab = shape.vocab_size
    tokens = t.micro_batch * t.seq_len
    notes: list[str] = []

    def say(frac: float, msg: str) -> None:
        if progress:
            progress(p0 + (p1 - p0) * frac, msg)

    depth = _num_layers(config, shape)
    _preimport(_hf_config(config), plan)
    with _RealMasks() as masks, GroupedExperts(), FakeTensorMode(allow_non_fake_inputs=False), tracker:
        say(0.0, f"building {shape.name} ({depth} layers) on fake tensors")
        model, attn_used = _build_training(plan, shape, config)
        if attn_used != t.attn_impl:
            notes.append(f"{shape.architecture} does not support {t.attn_impl}; simulated with {attn_used}")
        opt = _optimizer(model, t.optimizer, t.learning_rate, plan.hardware.device)
        ids = torch.zeros(t.micro_batch, t.seq_len, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for p in model.parameters():
            tracker.tag(p, "lora_adapters" if (t.method != "full" and p.requires_grad) else "weights")
        for b in model.buffers():
            tracker.tag(b, "weights")
        for v in batch.values():
            tracker.tag(v, "inputs")
        # a padded batch (spec.padded_batches): fake tensors hold no values to find the padding in, so
        # masking_utils is told to build the mask a padded batch gets (see _RealMasks)
        masks.padded = padded_batches(plan)
        head = model.get_output_embeddings()
        if getattr(model, "tuneplan_host", None) is not None and plan.hardware.device == "cpu":
            model.tuneplan_host.tag = lambda c: tracker.tag(c, "offloaded_activations")
        handles = _hooks(model, tracker, head)
        trainable = [p for p in model.parameters() if p.requires_grad]
        steps = 2  # the first creates the optimizer states; the second is the steady state
        loss = None
        tracker.mark("loaded")
        try:
            for step in range(steps):
                if step:
                    tracker.mark(f"step{step}")
                tracker.measuring = step == steps - 1
                for _ in range(t.grad_accum):
                    tracker.set_phase("forward")
                    with _autocast(t.precision):
                        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=batch["labels"])
                        loss = out.loss
                        del out  # Trainer.compute_loss returns the loss only: logits die here
                    if t.grad_accum > 1:
                        loss = loss / t.grad_accum
                    tracker.set_phase("backward")
                    loss.backward()
                    loss = loss.detach()
                say((step + 0.5) / steps, f"step {step + 1}/{steps}: backward done")
                for p in trainable:
                    tracker.tag(p.grad, "gradients")
                tracker.set_phase("optimizer")
                opt.step()
                for s in _optimizer_state_tensors(opt):
                    tracker.tag(s, "optimizer_states")
                tracker.set_phase("zero_grad")
                opt.zero_grad(set_to_none=True)
                tracker.set_phase(None)
                say((step + 1) / steps, f"step {step + 1}/{steps} done")
        finally:
            for h in handles:
                h.remove()
        tracker.measuring = False

        def classify(rec: _Rec) -> str:
            if rec.tag:
                return rec.tag
            if rec.head or (rec.phase == "backward" and not rec.in_module and rec.shape
                            and rec.shape[-1] == vocab and math.prod(rec.shape) >= tokens * vocab):
                return "logits_and_loss"
            if rec.phase == "forward" or (rec.phase == "backward" and rec.in_module):
                return "activations"
            return "transient"

        phases = {ph: tracker.peaks[ph].bytes for ph in TRAIN_PHASES if ph in tracker.peaks}
        comps = {ph: tracker.components_at(tracker.peaks[ph].seq, classify) for ph in phases}
        # the optimizer states of the first step are alive throughout: tag-resolved above
        host = getattr(model, "tuneplan_host", None)
        del model, opt, batch, loss, trainable, head
    host_peak = host.peak if host is not None else 0
    if as_tokens:
        return _Result(phases, comps, notes, tokens=event_tokens(tracker.recs, tracker.marks), host=host_peak)
    return _Result(phases, comps, notes, replay_reserved(tracker.recs, tracker.marks), host=host_peak)


# ------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------

def _infer_run(plan: Plan, shape: ModelShape, progress: Progress | None) -> _Result:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    s = plan.inference
    if s.kv_cache_dtype != "auto":
        raise SimulateError("an fp8 KV cache cannot be simulated (no quantized cache backend on fake "
                            "tensors); use --mode analytic")
    if s.weight_quant == "int8":
        raise SimulateError("LLM.int8 weights cannot be simulated yet; use --mode analytic")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[s.precision]
    prompt = s.prompt_len or s.seq_len
    new = s.seq_len - prompt
    tracker = _make_tracker(cpu=plan.hardware.device == "cpu")
    notes: list[str] = []
    _preimport(_hf_config(shape.config), plan)

    def say(frac: float, msg: str) -> None:
        if progress:
            progress(frac, msg)

    with _RealMasks(), GroupedExperts(), FakeTensorMode(), tracker:
        say(0.05, f"building {shape.name} on fake tensors")
        model, attn_used = _from_config(_hf_config(shape.config), dtype, "sdpa")
        if s.weight_quant == "nf4":
            _quantize_nf4(model, shape, dtype, True)
        model.eval()
        model.config.use_cache = True
        for p in model.parameters():
            tracker.tag(p, "weights")
        for b in model.buffers():
            tracker.tag(b, "weights")
        head = model.get_output_embeddings()
        handles = _hooks(model, tracker, head)
        from transformers import DynamicCache

        vocab = shape.vocab_size
        from advisor.inference import has_eos

        eos = has_eos(shape)
        try:
            with torch.inference_mode():
                ids = torch.zeros(s.batch, prompt, dtype=torch.long)
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
                for v in batch.values():
                    tracker.tag(v, "inputs")
                tracker.mark("loaded")
                tracker.measuring = True
                tracker.set_phase("prefill")
                # generate's cache (GenerationMixin._prepare_cache_for_generation): a DynamicCache of the text
                # config, or none for the models that make their own (MiniMax's linear attention, RWKV)
                own_cache = hasattr(model, "_supports_default_dynamic_cache") and \
                    not model._supports_default_dynamic_cache()
                cache = None if own_cache else DynamicCache(config=model.config.get_text_config(decoder=True))
                input_ids, mask = batch["input_ids"], batch["attention_mask"]
                unfinished = torch.ones(s.batch, dtype=torch.long)
                accepts = _forward_params(model)
                kw: dict = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
                # generate makes position ids from the mask, one row per sequence
                # (GenerationMixin._prepare_position_ids_for_generation), so the rotary cos / sin are per
                # sequence too, and it grows them by one position after every forward
                pos = None
                if "position_ids" in accepts:
                    pos = mask.long().cumsum(-1) - 1
                    pos = pos.masked_fill(mask == 0, 0)
                del mask  # (the batch's own mask stays: generate's caller holds it)
                # generate drops an all-ones attention mask once it has made the position ids from it
                # (GenerationMixin.generate: "We can drop the mask altogether if it's all 1s"), so the model
                # builds its causal mask without a batch dimension
                out = model(input_ids=input_ids, attention_mask=None, past_key_values=cache, use_cache=True,
                            **kw, **({"position_ids": pos} if pos is not None else {}))
                if own_cache:
                    cache = out.past_key_values
                _tag_cache(tracker, cache)
                say(0.4, "prefill done")
                produced = 0
                last_forced = False
                while produced < new:
                    if produced > 0:
                        if new > DECODE_STEPS_FULL and produced == 2 and not last_forced:
                            # jump to the last step: the cache and the ids as they are before it
                            # (every decode step holds more than the one before, so the last one
                            # is the decode peak)
                            last_forced = True
                            target = s.seq_len - 2  # tokens cached before the last forward
                            _grow_cache(cache, prompt + 1, target)
                            _tag_cache(tracker, cache)
                            input_ids = torch.zeros(s.batch, s.seq_len - 1, dtype=torch.long)
                            if pos is not None:
                                pos = torch.zeros(s.batch, s.seq_len - 1, dtype=torch.long)
                            produced = new - 1
                        step_ids = input_ids[:, -1:]
                        step_pos = {"position_ids": pos[..., -1:].clone()} if pos is not None else {}
                        out = model(input_ids=step_ids, attention_mask=None, past_key_values=cache,
                                    use_cache=True, **kw, **step_pos)
                        if own_cache:
                            cache = out.past_key_values
                        del step_pos
                        _tag_cache(tracker, cache)
                    if pos is not None:
                        pos = torch.cat([pos, torch.arange(1, dtype=pos.dtype).view(1, -1) + pos[..., -1:] + 1], dim=-1)
                    logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
                    # generate_step forces the full length with min_new_tokens, and generate then
                    # also sets min_length = min_new_tokens + prompt (_prepare_generated_length):
                    # MinLengthLogitsProcessor, then MinNewTokensLengthLogitsProcessor, each
                    # cloning its input, building arange/isin masks and taking a where()
                    # (transformers/generation/logits_process.py)
                    cur = logits  # the previous step's scores stay alive until reassigned below
                    # (without an EOS token generate adds neither processor: the scores are the logits)
                    for clone_first in ((False, True) if eos else ()):
                        if clone_first:
                            processed = cur.clone()
                        vocab_ids = torch.arange(logits.shape[-1])
                        eos_mask = vocab_ids == 0
                        if not clone_first:
                            processed = cur.clone()
                        processed = torch.where(eos_mask, -math.inf, cur)
                        del vocab_ids, eos_mask
                        cur = processed
                    processed = None
                    scores = cur
                    del cur
                    nxt = torch.argmax(scores, dim=-1)
                    input_ids = torch.cat([input_ids, nxt[:, None]], dim=-1)
                    unfinished = unfinished & ~(torch.zeros(s.batch, dtype=torch.bool))
                    # generate's _sample keeps next_token_logits and next_token_scores until the
                    # next step reassigns them (it dels only outputs): both live through that
                    # step's forward
                    del out, nxt
                    produced += 1
                    if produced == 1:
                        tracker.set_phase("decode")
                    if produced % 8 == 0 or produced == new:
                        say(0.4 + 0.55 * produced / max(new, 1), f"decode {produced}/{new}")
                tracker.set_phase(None)
        finally:
            for h in handles:
                h.remove()
        tracker.measuring = False

        def classify(rec: _Rec) -> str:
            if rec.tag:
                return rec.tag
            if rec.phase == "prefill" and not rec.head:
                return "prefill_activations"
            return "logits" if rec.head or (rec.shape and rec.shape[-1] == vocab) else "transient"

        phases = {ph: tracker.peaks[ph].bytes for ph in INFER_PHASES if ph in tracker.peaks}
        comps = {ph: tracker.components_at(tracker.peaks[ph].seq, classify) for ph in phases}
        del model, head, cache, batch, input_ids
    res_reserved = replay_reserved(tracker.recs, tracker.marks)
    if attn_used != "sdpa":
        notes.append(f"{shape.architecture} does not support sdpa; simulated with {attn_used}")
    return _Result(phases, comps, notes, res_reserved)


def _cache_layers(cache) -> list:
    """The per-layer objects of a generation cache (DynamicCache.layers; a model's own cache as one)."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    return list(layers) if isinstance(layers, (list, tuple)) else [cache]


def _tag_cache(tracker, cache) -> None:
    """What the cache holds now is kv_cache (the tag stays with the storage's record, so the prefill's
    keys/values, created inside attention and later replaced by torch.cat, count too): every tensor of every
    cache layer -- keys and values, a sparse-attention indexer's keys, a linear-attention or state-space
    layer's convolution and recurrent states."""
    import torch

    for layer in _cache_layers(cache):
        for value in vars(layer).values():
            for t in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(t, torch.Tensor):
                    tracker.tag(t, "kv_cache")


def _grow_cache(cache, now: int, target: int) -> None:
    """Make the cache hold ``target`` tokens where it holds ``now``, as ``target - now`` more decode steps would:
    every tensor that grows with the tokens (a dimension of length ``now``: keys and values, a sparse-attention
    indexer's keys and positions) gets that length; a sliding-window layer keeps its last window - 1 tokens and
    counts the rest in cumulative_length (the mask uses it); fixed-size states (linear attention, state-space
    layers) stay as they are."""
    import torch

    for layer in _cache_layers(cache):
        window = getattr(layer, "sliding_window", None)
        if isinstance(getattr(layer, "cumulative_length", None), int):
            layer.cumulative_length = target
        for attr, old in list(vars(layer).items()):
            if not isinstance(old, torch.Tensor) or old.dim() < 2:
                continue
            dims = [i for i, n in enumerate(old.shape) if n == now]
            if len(dims) != 1:
                continue
            length = min(target, window - 1) if window and attr in ("keys", "values") else target
            sh = list(old.shape)
            sh[dims[0]] = length
            setattr(layer, attr, torch.empty(sh, dtype=old.dtype))
            del old


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
