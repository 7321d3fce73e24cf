"""LoRA and QLoRA under FSDP, for real: two gloo processes on the CPU wrap the model as advisor.stack
loads it for FSDP with torch's FSDP and the runner's settings (FULL_SHARD, use_orig_params,
BACKWARD_PRE) and train two steps (tests/fsdp_worker.py). With the plain transformer-layer policy that
the launch config names, a decoder layer holds bf16 base weights and peft's fp32 adapters and FSDP
refuses to flatten it; advisor.stack.fsdp_wrap_policy (what the runner sets on accelerate's FSDP
plugin, as transformers' Trainer does) makes each adapter a unit of its own, and both ranks train the
same losses with no gradient on a frozen weight. (accelerate's own FSDP path needs a GPU.)"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny import build

    d = tmp_path_factory.mktemp("tiny-llama-fsdp")
    build("llama").save_pretrained(d)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model_dir, method: str, policy: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(model_dir), method, policy]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [json.loads(x) for x in got.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 2, got.stdout + got.stderr[-3000:]
    return sorted(lines, key=lambda x: x["rank"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_runners_policy_shards_and_trains(model_dir, method):
    r0, r1 = _run(model_dir, method, "stack")
    assert "error" not in r0 and r0["losses"] == r1["losses"]
    assert r0["losses"][1] < r0["losses"][0]  # it learns
    assert r0["frozen_grads"] == 0
    assert r0["units"] > 2 * 2  # the root, the decoder layers and every LoRA A and B


@pytest.mark.slow
def test_the_plain_layer_policy_cannot_flatten_fp32_adapters_on_a_bf16_base(model_dir):
    r0, r1 = _run(model_dir, "lora", "plain")
    assert "uniform dtype" in r0["error"] and "uniform dtype" in r1["error"]
