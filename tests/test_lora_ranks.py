"""vLLM's --max-lora-rank takes only the ranks of its MaxLoRARanks (vllm/config/lora.py): the CLI refuses any
other with one message that lists them, the serving estimate too, and an adapter's rank is served with the next
rank up (advisor.serving.lora_rank_for, what the app's "serve this" builds its command with)."""

from __future__ import annotations

import pytest

from advisor.cli.main import main
from advisor.gpus import find_gpu
from advisor.model import resolve
from advisor.problems import Problems
from advisor.serving import VLLM_LORA_RANKS, cuda_total_bytes, lora_rank_for, serving_estimate

LLAMA8 = "meta-llama/Llama-3.1-8B"
ALLOWED = "vLLM accepts only 1, 8, 16, 32, 64, 128, 256, 320, 512"


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_ranks_are_vllms():
    # vllm-project/vllm vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
    assert VLLM_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert [lora_rank_for(r) for r in (1, 2, 4, 8, 9, 16, 17, 300, 320, 321, 512)] == \
        [1, 8, 8, 8, 16, 16, 32, 320, 320, 512, 512]
    assert lora_rank_for(513) is None


@pytest.mark.parametrize("extra", [[], ["--enable-lora"]])
def test_estimate_refuses_a_rank_vllm_refuses(capsys, extra):
    code = main(["estimate", LLAMA8, "--task", "inference", "--engine", "vllm", "--gpu", "h100",
                 "--max-lora-rank", "4", *extra])
    assert code == 2
    line = one_error(capsys)
    assert line == f"tuneplan: --max-lora-rank: {ALLOWED} (got 4); 8 holds an adapter of rank 4"


def test_recommend_serving_refuses_it_once(capsys):
    assert main(["recommend", LLAMA8, "--serving", "--enable-lora", "--max-lora-rank", "600"]) == 2
    line = one_error(capsys)
    assert ALLOWED in line and "(got 600)" in line and "serve the merged model" in line


def test_an_allowed_rank_still_serves(capsys):
    assert main(["estimate", LLAMA8, "--task", "inference", "--engine", "vllm", "--gpu", "h100", "--enable-lora",
                 "--max-lora-rank", "320"]) == 0
    assert "--enable-lora --max-lora-rank 320" in capsys.readouterr().out


def test_the_serving_estimate_refuses_it_on_its_field():
    g = find_gpu("h100")
    with pytest.raises(Problems) as err:
        serving_estimate(resolve(LLAMA8), cuda_total_bytes(g), max_model_len=8192, enable_lora=True,
                         max_lora_rank=24)
    [p] = err.value.items
    assert p.field == "max_lora_rank" and ALLOWED in p.what and p.fix == "32 holds an adapter of rank 24"
