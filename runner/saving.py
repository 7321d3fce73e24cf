"""What a run writes of its model: checkpoints during training, the final weights, the merged export.

Every function takes the :class:`runner.recipe.Recipe` whose model it saves. Under several
processes the state dict is gathered by accelerate (a collective under FSDP / ZeRO-3, so every rank
calls these) and rank 0 writes; each rank's own optimizer state and generators go beside it
(:func:`runner.checkpoint.write_rank_state`). A checkpoint is written whole, then renamed
(:mod:`runner.checkpoint`), and the final weights likewise, so no exit leaves a half-written one.
"""

from __future__ import annotations

from pathlib import Path


def unwrapped(recipe):
    return recipe.accelerator.unwrap_model(recipe.model) if recipe.accelerator is not None else recipe.model


def save_checkpoint(recipe) -> Path | None:
    """checkpoints/step-N; its path on rank 0, None elsewhere and before the first step."""
    from runner.checkpoint import adopt_rank_states, identity, write_checkpoint, write_rank_state

    if recipe.step == recipe.saved_step:  # this step is in a checkpoint already (every rank knows it)
        return None
    if recipe.step > 0 and not recipe.plan.run.max_grad_norm and not recipe.weights_finite():
        # without clipping no gradient norm is computed: a step can leave non-finite weights behind a
        # finite loss; they are never saved as "the last good checkpoint"
        from runner.exits import LossDiverged

        raise LossDiverged(recipe.step, None, what="the weights are no longer finite numbers")
    state = None
    acc = recipe.accelerator
    if acc is not None:
        acc.wait_for_everyone()
        if recipe.step > 0:
            state = acc.get_state_dict(recipe.model)  # a collective under FSDP/ZeRO-3
            if not recipe.is_main:  # every process's own optimizer state and generators
                write_rank_state(recipe.run_dir, recipe.step, recipe.rank, recipe.optimizer)
        acc.wait_for_everyone()
    if recipe.step > 0:
        recipe.saved_step = recipe.step
    if not recipe.is_main or recipe.step == 0:
        return None
    t = recipe.plan.training
    info = {"position": recipe.position, "batches_per_epoch": recipe.batches_per_epoch,
            "micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "total_steps": recipe.total_steps,
            "first_loss": recipe.first_loss, "val_loss": recipe.val_loss, "history": recipe.history[-200:],
            "world_size": recipe.world, "identity": identity(recipe.plan.model_dump(mode="json"))}
    final = write_checkpoint(recipe.run_dir, recipe.step, model=unwrapped(recipe), optimizer=recipe.optimizer,
                             scheduler=recipe.scheduler, state=info, keep=recipe.plan.run.keep_checkpoints,
                             weights_name="adapter" if recipe.is_peft else "model", state_dict=state,
                             before_rename=adopt_rank_states(recipe.run_dir, recipe.step, recipe.world)
                             if recipe.world > 1 else None)
    recipe.events.emit("checkpoint", step=recipe.step, path=str(final.resolve()))
    return final


def load_checkpoint(recipe, ck: Path) -> None:
    """Weights, optimizer, schedule, generators and the data position of ``ck`` into the recipe;
    a changed micro-batch or process count is said in the report's notes."""
    from runner.checkpoint import load_checkpoint as load

    st = load(ck, model=unwrapped(recipe), optimizer=recipe.optimizer, scheduler=recipe.scheduler,
              is_peft=recipe.is_peft, device=recipe.device, rank=recipe.rank, world=recipe.world,
              stateful=recipe.plan.training.optimizer != "sgd",
              sharded=recipe.accelerator is not None and recipe.dist_type() in ("FSDP", "DEEPSPEED"))
    recipe.saved_step = st["step"]
    _take_learning_rate(recipe)
    if st.get("world_size", 1) != recipe.world:
        recipe.notes.append(f"resumed with {recipe.world} processes from a checkpoint written by "
                            f"{st.get('world_size')}; the data order differs from an uninterrupted run")
    recipe.step, recipe.position = st["step"], st["position"]
    old_mb, old_bpe = st.get("micro_batch"), st.get("batches_per_epoch")
    mb = recipe.plan.training.micro_batch
    if old_mb and old_bpe and old_mb != mb:
        # the same examples consumed, counted in the new micro-batches (exact when mb divides old_mb)
        epoch, k = divmod(recipe.position, old_bpe)
        recipe.position = epoch * recipe.batches_per_epoch + (k * old_mb) // mb
        recipe.notes.append(f"resumed with training.micro_batch={mb} from a checkpoint trained with {old_mb}")
    recipe.first_loss, recipe.val_loss = st.get("first_loss"), st.get("val_loss")
    recipe.history = st.get("history", [])


def _take_learning_rate(recipe) -> None:
    """A resume with another training.learning_rate (the advice after a diverged loss): the schedule
    restored from the checkpoint goes on at the same point, scaled to the plan's peak rate."""
    new = recipe.plan.training.learning_rate
    sched, opt = recipe.scheduler, recipe.optimizer
    old = list(getattr(sched, "base_lrs", []) or [])
    if not old or all(abs(b - new) <= 1e-12 * max(abs(new), 1e-30) for b in old):
        return
    sched.base_lrs = [new for _ in old]
    for group, base in zip(opt.param_groups, old, strict=False):
        if base:
            group["lr"] = group["lr"] * new / base
        group["initial_lr"] = new
    if hasattr(sched, "_last_lr"):
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    recipe.notes.append(f"resumed with training.learning_rate={new:g} (the checkpoint was trained with {old[0]:g}); "
                        "the schedule goes on from the checkpoint's step at the new rate")


def save_final(recipe) -> None:
    """adapter/ (LoRA, QLoRA) or model/ (full fine-tuning) with the tokenizer; merged/ when asked.
    Written beside, flushed, then renamed into place (an older copy is renamed aside first)."""
    from advisor.safefile import fsync_tree
    from runner.checkpoint import fresh_dir, replace_dir

    state = None
    if recipe.accelerator is not None:
        recipe.accelerator.wait_for_everyone()
        state = recipe.accelerator.get_state_dict(recipe.model)
    if not recipe.is_main:
        return
    out = recipe.run_dir / ("adapter" if recipe.is_peft else "model")
    tmp = fresh_dir(recipe.run_dir / f".tmp-{out.name}")
    unwrapped(recipe).save_pretrained(tmp, state_dict=state)
    recipe.tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    replace_dir(tmp, out, aside=recipe.run_dir / f".old-{out.name}")
    if recipe.plan.run.merge_export and recipe.is_peft:
        merge_export(recipe, out)


def merge_export(recipe, adapter_dir: Path) -> None:
    """Reload the base in the compute dtype (not 4-bit: merging into NF4 would round the update
    away), merge the adapter, save to merged/. The training model is dropped first."""
    import gc

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from advisor.stack import compute_dtype

    recipe.model = None  # the training model goes first (accelerate keeps one more reference)
    if recipe.accelerator is not None:
        recipe.accelerator.free_memory()
    gc.collect()
    base = AutoModelForCausalLM.from_pretrained(recipe.model_dir, dtype=compute_dtype(recipe.plan.training.precision),
                                                trust_remote_code=recipe.plan.model.trust_remote_code)
    from advisor.safefile import fsync_tree
    from runner.checkpoint import fresh_dir, replace_dir

    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = fresh_dir(recipe.run_dir / ".tmp-merged")
    merged.save_pretrained(tmp)
    recipe.tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    replace_dir(tmp, recipe.run_dir / "merged", aside=recipe.run_dir / ".old-merged")
