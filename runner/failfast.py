"""Fail fast: before the first real step, one forward and backward on the longest batch the data can
produce, so that a batch that does not fit fails in the first minute instead of hours in, when it
finally comes up ("OOM after N steps").

The probe holds what a real step holds at its peak: the weights, the longest batch's activations,
its gradients and the optimizer state (created by one step at learning rate 0, which moves no
weight). It changes nothing the training sees: the gradients and that optimizer state are dropped
again, and the random state that dropout consumes is put back, so the losses are the same to the
bit with and without it. Under DeepSpeed the probe is skipped: the engine's backward is tied to its
own step and accumulation bookkeeping.

``Hooks(oom_above_tokens=N)`` (a test hook, like ``oom_at_step``; ``oom_above_tokens=N`` in
``TUNEPLAN_TEST_HOOKS`` for a subprocess): any forward of a batch of more than N tokens (micro-batch x
length) raises torch.OutOfMemoryError, what the CUDA caching allocator raises, so a CPU test shows where
a long batch fails. The plan's ``run.fail_fast: false`` turns the probe off.
"""

from __future__ import annotations

import os
import random
import time
from typing import TYPE_CHECKING, Any

from runner.exits import is_oom

if TYPE_CHECKING:
    from advisor.service import LongestBatch


def longest_examples(examples: list, micro_batch: int) -> list:
    """The ``micro_batch`` longest examples (packed sequences when data.packing): whichever rank
    they fall to, no micro-batch of the run is longer, and none holds more tokens."""
    return sorted(examples, key=lambda e: len(e.input_ids), reverse=True)[:micro_batch]


def longest_batch(examples: list, micro_batch: int, pad_id: int,
                  pad_to: int | None = None) -> tuple[dict, LongestBatch]:
    """The collated longest micro-batch, padded as the run pads (pad_to: data.pad_to=seq_len)."""
    from advisor.service import LongestBatch
    from runner.data import collate

    chosen = longest_examples(examples, micro_batch)
    batch = collate(chosen, pad_id, pad_to)
    rows, length = batch["input_ids"].shape
    return batch, LongestBatch(int(rows), int(length), tuple(e.line for e in chosen))


def probe(model, batch: dict, precision: str, backward=None, optimizer=None) -> tuple[float, bool]:
    """One forward (with the loss, under the plan's autocast) and backward on ``batch``; then, when
    the optimizer holds no state yet, one optimizer step at learning rate 0, which creates its state
    (Adam's moments, ...) and moves no weight; then the gradients and that state are dropped
    (``load_state_dict`` of the state before, which also puts the learning rates back) and the torch
    and Python random states are restored. Returns (seconds, whether the optimizer state was in it).
    ``backward`` is accelerate's (DDP/FSDP); every process must probe (DDP reduces in backward)."""
    import torch

    from advisor.stack import autocast, compute_loss  # the loss exactly as train_step computes it

    rng = _rng_state(torch)
    fresh = optimizer.state_dict() if optimizer is not None and not optimizer.state else None
    t0 = time.perf_counter()
    try:
        model.train()
        with autocast(precision, batch["input_ids"].device.type):
            loss = compute_loss(model, batch)
        if backward is not None:
            backward(loss)
        else:
            loss.backward()
        del loss
        if fresh is not None:
            for group in optimizer.param_groups:
                group["lr"] = 0.0  # p - 0 * update: the weights stay as they are, to the bit
            optimizer.step()
    finally:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            if fresh is not None:
                optimizer.load_state_dict(fresh)
        model.zero_grad(set_to_none=True)
        _set_rng_state(torch, rng)
    return time.perf_counter() - t0, fresh is not None or bool(optimizer is not None and optimizer.state)


def _rng_state(torch) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(torch, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def install_test_hook(model, limit: int | None) -> Any | None:
    """Hooks.oom_above_tokens=N: a forward pre-hook on the model that raises torch.OutOfMemoryError for a
    batch of more than N tokens. None without the hook."""
    if not limit or limit <= 0:
        return None
    import torch

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.numel() > limit:
            raise torch.OutOfMemoryError(f"simulated by the oom_above_tokens={limit} test hook for a batch of "
                                         f"{ids.numel()} tokens: CUDA out of memory. Tried to allocate 2.00 GiB")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def check_longest_batch(recipe) -> dict | None:
    """The recipe's setup calls this last (model, optimizer and data ready). Runs the probe on every
    process; re-raises an out-of-memory error with the batch that caused it (the recipe then records
    it with the next plan that fits). Returns what it did (for the log and the report) or None."""
    install_test_hook(recipe.model, recipe.hooks.oom_above_tokens)
    accelerator = getattr(recipe, "accelerator", None)
    if accelerator is not None:
        check_shared_run_dir(recipe)
    if not recipe.plan.run.fail_fast:
        return None
    if accelerator is not None and dist_type(accelerator) == "DEEPSPEED":
        recipe.notes.append("fail-fast probe skipped under DeepSpeed (its backward steps the engine)")
        return None
    plan = recipe.plan
    t = plan.training
    pad_to = t.seq_len if plan.data.pad_to == "seq_len" else None
    batch, longest = longest_batch(recipe.data.train, t.micro_batch, recipe.tokenizer.pad_token_id, pad_to)
    batch = {k: v.to(recipe.device) for k, v in batch.items()}
    torch = recipe.torch
    on_cuda = str(recipe.device).startswith("cuda")
    try:
        seconds, with_states = probe(recipe.model, batch, t.precision, accelerator.backward if accelerator else None,
                                     recipe.optimizer)
    except Exception as e:
        if is_oom(e):
            raise torch.OutOfMemoryError(f"the longest batch, {longest.words()}, does not fit (checked before the "
                                         f"first step): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                         ) from None
        raise
    out = {"rows": longest.rows, "length": longest.length, "tokens": longest.tokens, "lines": list(longest.lines),
           "seconds": round(seconds, 3), "optimizer_state": with_states}
    if on_cuda:
        out["peak_allocated"] = int(torch.cuda.max_memory_allocated())
        out["peak_reserved"] = int(torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()  # the report measures the training steps
    del batch
    recipe.notes.append(f"fail-fast: one step on the longest batch, {longest.words()}, fitted before the first "
                        f"step, {'with' if with_states else 'without'} the optimizer state ({out['seconds']} s)")
    recipe.log(f"fail-fast: the longest batch, {longest.words()}, fits")
    return out


def check_shared_run_dir(recipe) -> None:
    """Several processes: every one must see the run directory rank 0 writes (each rank's checkpoint
    state goes there). Rank 0 writes a marker, every rank looks for it; a node that does not see it
    fails the run now, with what to do, instead of at its first checkpoint. A collective."""
    from accelerate.utils import broadcast_object_list

    from advisor.problems import Problem, Problems

    acc, torch = recipe.accelerator, recipe.torch
    token = [f".shared-{os.getpid()}-{time.time_ns()}" if recipe.is_main else None]
    broadcast_object_list(token)
    marker = recipe.run_dir / token[0]
    if recipe.is_main:
        marker.write_text("tuneplan: every process checks that it sees this run directory\n")
    acc.wait_for_everyone()
    missing = torch.tensor([0.0 if marker.exists() else 1.0], device=recipe.device)
    blind = int(acc.reduce(missing, reduction="sum").item())
    acc.wait_for_everyone()
    if recipe.is_main:
        marker.unlink(missing_ok=True)
    if blind:
        raise Problems(Problem(f"{blind} of {recipe.world} processes do not see the run directory "
                               f"{recipe.run_dir} that rank 0 writes (another node's own disk?)", None,
                               "put the run directory on storage every node shares: a shared file system, or "
                               "with SkyPilot the bucket `tuneplan cloud` mounts at /tuneplan-runs"))


def dist_type(accelerator) -> str:
    """accelerate's distributed type as its plain value ('FSDP', 'DEEPSPEED', 'MULTI_GPU', 'NO')."""
    t = accelerator.state.distributed_type
    return str(getattr(t, "value", t))


def data_check_longest(examples: list, seq_len: int) -> dict:
    """For `tuneplan data check`: the longest example and a warning when it is longer than the
    sequence length the estimate used. ``examples`` must be tokenized without truncation (the
    runner's tokenize with a seq_len above every example), so that its length is the real one."""
    if not examples:
        return {}
    longest = max(examples, key=lambda e: len(e.input_ids))
    n = len(longest.input_ids)
    out: dict[str, Any] = {"line": longest.line, "tokens": n, "seq_len": seq_len}
    if n > seq_len:
        out["warning"] = (f"the longest example (line {longest.line}, {n} tokens) is longer than the sequence length "
                          f"{seq_len} the estimate used: it is cut to {seq_len} tokens; raise training.seq_len to "
                          f"{n} (and estimate again) to train on all of it")
    return out


def longest_in_file(path, model_ref: str, seq_len: int, fmt: str = "auto", template: str = "auto",
                    prompt_loss_weight: float = 0.0, trust_remote_code: bool = False) -> dict:
    """The longest example of a data file in the model's tokens (for the TUI's Launch screen, as
    `tuneplan data check` shows it): {line, tokens, seq_len, warning?}, or {} when it cannot be told
    (no records, no tokenizer to load)."""
    from runner.data import DataError, load_and_check, resolve_template, tokenize

    try:
        records, found, _ = load_and_check(path, fmt)
        if not records:
            return {}
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_ref, trust_remote_code=trust_remote_code)
        tmpl = resolve_template(found, template, tok)
        full = [tokenize(r, found, tmpl, tok, 10**9, prompt_loss_weight) for r in records]
    except (DataError, OSError, ValueError):
        return {}
    return data_check_longest(full, seq_len)
