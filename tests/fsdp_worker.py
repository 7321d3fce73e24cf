"""One rank of a real 2-process FSDP run on the CPU (gloo), for tests/test_fsdp_lora.py: the model as
advisor.stack loads it for FSDP, wrapped by torch's FSDP with the runner's settings (FULL_SHARD,
use_orig_params, BACKWARD_PRE) and either advisor.stack.fsdp_wrap_policy or the plain transformer-layer
policy, two training steps; prints one JSON line per rank."""

import functools
import json
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, method: str, policy: str) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from advisor.spec import TrainSpec
    from advisor.stack import fsdp_wrap_policy, load_for_training, make_batch, make_optimizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = TrainSpec(method=method, precision="bf16", micro_batch=2, seq_len=32, grad_checkpointing=True,
                     lora={"r": 4, "alpha": 8})
    model = load_for_training(model_dir, spec, fsdp=True)
    layer = type(model.get_base_model().model.layers[0])
    plain = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer})
    try:
        wrapped = FSDP(model, auto_wrap_policy=fsdp_wrap_policy(model) if policy == "stack" else plain,
                       sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
                       backward_prefetch=BackwardPrefetch.BACKWARD_PRE, device_id=torch.device("cpu"))
    except ValueError as e:
        print(json.dumps({"rank": rank, "error": str(e)}), flush=True)
        dist.destroy_process_group()
        return
    opt = make_optimizer(wrapped, "adamw", 1e-3)
    batch = make_batch(model.config.vocab_size, 2, 32, seed=0)
    losses = []
    for _ in range(2):
        out = wrapped(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    frozen_grads = sum(p.grad is not None for p in wrapped.parameters() if not p.requires_grad)
    print(json.dumps({"rank": rank, "losses": losses, "frozen_grads": frozen_grads,
                      "units": sum(isinstance(m, FSDP) for m in wrapped.modules())}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
