"""QLoRA under FSDP: the stack loads the 4-bit weights stored in the compute dtype
(bnb_4bit_quant_storage) and keeps every other weight in it too, so FSDP can flatten and shard them;
it trains. (The FSDP wrapping itself needs GPUs; this checks what tuneplan loads for it, on the CPU,
with real bitsandbytes 4-bit.)"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from advisor.spec import TrainSpec  # noqa: E402
from advisor.stack import load_for_training, make_batch, make_optimizer, train_step  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny import build

    d = tmp_path_factory.mktemp("tiny-llama")
    build("llama").save_pretrained(d)
    return d


def _dtypes(model):
    import bitsandbytes as bnb

    four, other = set(), set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            (four if isinstance(mod, bnb.nn.Linear4bit) and name == "weight" else other).add(
                (p.dtype, p.requires_grad))
    return four, other


@pytest.mark.slow
def test_sharded_qlora_keeps_one_dtype_and_trains(model_dir):
    spec = TrainSpec(method="qlora", precision="bf16", micro_batch=2, seq_len=32, lora={"r": 4, "alpha": 8})
    model = load_for_training(model_dir, spec, fsdp=True)
    four, other = _dtypes(model)
    assert four == {(torch.bfloat16, False)}  # packed 4-bit values stored as bf16 (quant_storage)
    assert {dt for dt, trainable in other if not trainable} == {torch.bfloat16}  # no fp32 casts of frozen weights
    opt = make_optimizer(model, "adamw", 1e-3)
    batch = make_batch(1000, 2, 32)
    losses = [float(train_step(model, batch, opt, spec)) for _ in range(3)]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0]


@pytest.mark.slow
def test_plain_qlora_casts_as_prepare_model_for_kbit_training_does(model_dir):
    """The single-GPU path is unchanged: uint8 storage, fp32 casts of the non-4-bit weights."""
    spec = TrainSpec(method="qlora", precision="bf16", micro_batch=2, seq_len=32, lora={"r": 4, "alpha": 8})
    four, other = _dtypes(load_for_training(model_dir, spec))
    assert four == {(torch.uint8, False)}
    assert torch.float32 in {dt for dt, trainable in other if not trainable}
