"""The switches people flip to make a job fit (issue 30 item 3), each in the plan, the estimate, the advice and the
runner: FSDP / ZeRO mixed precision with fp32 masters (``mixed-bf16``), offloaded activation checkpoints
(``--offload-activations``) and Liger kernels (``--liger``).

Fast tests check the plan, the estimate's terms against the frameworks' rules and the stored CPU measurements;
the slow ones measure the real stack again (real FSDP in two gloo processes, real training steps on the CPU)."""

import json
from pathlib import Path

import pytest

from advisor.memory import estimate, training_phases
from advisor.model import resolve
from advisor.problems import Problems
from advisor.spec import build_plan

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "meta-llama/Llama-3.1-8B"


def _plan(training=None, hardware=None, **top):
    return build_plan({"model": {"ref": LLAMA}, "training": {"method": "full", **(training or {})},
                       "hardware": {"gpu": "a100-80gb-sxm", **(hardware or {})}, **top})


# --- A. FSDP / ZeRO mixed precision (mixed-bf16) -----------------------------------------------------------------

def test_mixed_bf16_under_fsdp_holds_the_bytes_its_words_state():
    """16 bytes per parameter held and 20 at the optimizer step, divided over the GPUs (the words of
    spec.PRECISION_WORDS), plus the units gathered in bf16: half amp-bf16's."""
    from advisor.spec import PRECISION_WORDS

    shape, n = resolve(LLAMA), 8
    p = _plan({"precision": "mixed-bf16"}, {"gpus": n, "zero": 3})
    ph = training_phases(shape, p.training, p.hardware)
    step = ph["optimizer_step"]
    per = shape.params_total / n
    held = (step["weights"] + step["gradients"] + step["optimizer_states"]) / per
    assert round(held, 3) == 16 and round(held + step["transient"] / per, 3) == 20
    words = PRECISION_WORDS["mixed-bf16"]
    assert "16 bytes per parameter, 20 during the optimizer step, divided over the GPUs" in words
    amp = training_phases(shape, p.training.model_copy(update={"precision": "amp-bf16"}), p.hardware)
    assert ph["backward_start"]["zero3_gathered_params"] * 2 == amp["backward_start"]["zero3_gathered_params"]
    bf16 = training_phases(shape, p.training.model_copy(update={"precision": "bf16"}), p.hardware)
    assert ph["backward_start"]["activations"] == bf16["backward_start"]["activations"]  # bf16 compute, as pure
    assert ph["forward_end"]["logits_and_loss"] == bf16["forward_end"]["logits_and_loss"]


def test_mixed_bf16_under_deepspeed_counts_what_its_zero_optimizer_keeps():
    """DeepSpeed bf16 with ZeRO-1/2: bf16 weights on every GPU, an fp32 master partition and fp32 states, bf16
    gradients in backward and this partition's in fp32 at the step (zero/stage_1_and_2.py)."""
    shape, n = resolve(LLAMA), 8
    P = shape.params_total
    for z in (1, 2):
        p = _plan({"precision": "mixed-bf16"}, {"gpus": n, "zero": z})
        ph = training_phases(shape, p.training, p.hardware)
        step, end = ph["optimizer_step"], ph["backward_end"]
        assert step["weights"] == 2 * P and step["master_weights"] == -(-4 * P // n)
        assert step["optimizer_states"] == -(-8 * P // n) and step["gradients"] == -(-4 * P // n)
        assert end["gradients"] == (2 * P if z == 1 else -(-2 * P // n))
        assert end["zero_buckets"] == 500_000_000 * 2  # reduce_bucket_size elements in bf16
    bd = estimate(_plan({"precision": "mixed-bf16"}, {"gpus": n, "zero": 2}), shape)
    assert any("DeepSpeed ZeRO-2" in x for x in bd.notes)


def test_mixed_bf16_without_sharding_is_accelerates_autocast():
    shape = resolve(LLAMA)
    for hw in ({"gpus": 1}, {"gpus": 4, "zero": 0}):
        mixed = estimate(_plan({"precision": "mixed-bf16"}, hw), shape)
        amp = estimate(_plan({"precision": "amp-bf16"}, hw), shape)
        assert mixed.components == amp.components and mixed.peak_reserved_bytes == amp.peak_reserved_bytes
        assert any("estimated as amp-bf16" in x for x in mixed.notes)


def test_mixed_bf16_is_for_full_fine_tuning():
    with pytest.raises(Problems) as e:
        build_plan({"training": {"method": "lora", "precision": "mixed-bf16"}})
    [p] = e.value.items
    assert p.field == "training.precision" and "use bf16" in p.message


@pytest.mark.slow  # accelerate's launcher: over a second to import
def test_fsdp_policy_is_accelerates_and_the_launch_config_asks_for_it(tmp_path, monkeypatch):
    """The runner's accelerate config for a mixed-bf16 plan, read by accelerate's own launcher, gives the FSDP
    plugin accelerate builds in each process; its policy is advisor.stack.fsdp_mixed_precision's."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from advisor.stack import fsdp_mixed_precision
    from runner.launch import accelerate_config, write_accelerate_config

    plan = _plan({"precision": "mixed-bf16"}, {"gpus": 4, "zero": 3})
    path = write_accelerate_config(plan, tmp_path)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["ACCELERATE_USE_FSDP"] == "true"
    # (sync_module_states, which efficient loading forces, refuses the CPU)
    for k, v in {**env, "FSDP_SYNC_MODULE_STATES": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}.items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])  # what accelerate's state does with it
    assert plugin.mixed_precision_policy == fsdp_mixed_precision("mixed-bf16")
    for z, kind in ((1, "DEEPSPEED"), (0, "MULTI_GPU")):
        cfg = accelerate_config(_plan({"precision": "mixed-bf16"}, {"gpus": 4, "zero": z}))
        assert cfg["mixed_precision"] == "bf16" and cfg["distributed_type"] == kind
    assert accelerate_config(_plan({"precision": "amp-bf16"}, {"gpus": 4, "zero": 3}))["mixed_precision"] == "no"
    assert fsdp_mixed_precision("amp-bf16") is None


@pytest.mark.slow  # the tiny configs' meta counts: about two seconds
def test_stored_fsdp_mixed_measurements_match_the_estimate_and_the_docs():
    from benchmarks import fsdp_mixed_cpu as f

    rows = json.loads(f.RESULTS.read_text())
    assert [r["id"] for r in rows] == [f.case_id(c) for c in f.CASES]
    for r in rows:
        assert all(x["losses"][-1] < x["losses"][0] for x in r["ranks"])  # it trains
        want = "float32" if r["precision"] != "bf16" else "bfloat16"
        assert r["ranks"][0]["shard_dtypes"] == [want] and r["ranks"][0]["grad_dtypes"] == [want]
        ours = f.estimate_of(r).peak_allocated_bytes
        assert abs(ours / max(x["peak_bytes"] for x in r["ranks"]) - 1) < 0.01, r["id"]
    text = (ROOT / "docs" / "accuracy.md").read_text()
    block = text.split("<!-- fsdpmixed:begin -->\n", 1)[1].split("\n<!-- fsdpmixed:end -->", 1)[0]
    assert block == f.markdown(rows), "stale: run python -m benchmarks.fsdp_mixed_cpu --table --write docs/accuracy.md"


@pytest.mark.slow
def test_fsdp_mixed_precision_rank_peak_matches_the_estimate():
    """Real FSDP with accelerate's mixed-precision policy in two gloo processes: every rank's peak is the estimate's
    (the root's reduce-scatter sets it at this short shape)."""
    from benchmarks import fsdp_mixed_cpu as f

    row = f.measure(("mistral", "mixed-bf16", 1, 8))
    bd = f.estimate_of(row)
    assert bd.peak_phase == "backward_root_reduce"
    for rank in row["ranks"]:
        assert rank["shard_dtypes"] == ["float32"] and rank["grad_dtypes"] == ["float32"]
        assert abs(bd.peak_allocated_bytes / rank["peak_bytes"] - 1) < 0.01


def test_the_advice_offers_mixed_precision_and_keeps_adapters_out_of_it():
    from advisor.gpus import find_gpu
    from advisor.recommend import nearest_plans

    shape, card = resolve(LLAMA), find_gpu("a100-40gb")
    plan = _plan({"precision": "amp-bf16", "optimizer": "paged_adamw_8bit", "seq_len": 8192},
                 {"gpu": "a100-40gb", "gpus": 4, "zero": 3})
    near = nearest_plans(shape, plan, card, 1e6)
    first = next(n for n in near if n.gpu_id == card.id and "training.precision" in n.changes)
    assert first.changes == {"training.precision": "mixed-bf16"} and first.status == "fits"
    assert first.hours is not None  # with its time
    for n in near:
        assert not (n.plan.training.method != "full" and n.plan.training.precision == "mixed-bf16"), n.what
    # from a mixed-bf16 plan the LoRA rungs train their adapters over bf16 weights
    mixed = _plan({"precision": "mixed-bf16", "seq_len": 2048}, {"gpu": "h100-sxm"})
    for n in nearest_plans(shape, mixed, find_gpu("h100-sxm"), 1e6):
        if n.plan.training.method != "full":
            assert n.changes["training.precision"] == "bf16" and "over bf16 weights" in n.what
