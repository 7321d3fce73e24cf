"""The fms-acceleration GPU harness, replayed on the CPU: HF Trainer + accelerate FSDP + peft on transformers 4.48.

    .venv-tf4/bin/python benchmarks/fms_harness_cpu.py B SEQ                       # one process
    OMP_NUM_THREADS=1 .venv-tf4/bin/python -m torch.distributed.run --nproc_per_node 2 \\
        benchmarks/fms_harness_cpu.py B SEQ                                        # FSDP, 2 gloo ranks

An investigation, not a table: why the published 2-GPU LoRA rows (benchmarks/gpu_validate.py) are 7-10%
short in tensors while the 1-GPU ones agree. It runs the harness the rows name (HF Trainer 4.48 with bf16
autocast, accelerate 1.0.1's FSDP FULL_SHARD with TRANSFORMER_BASED_WRAP, BACKWARD_PRE and its bf16
MixedPrecision, peft LoRA r 16 / alpha 16 / dropout 0.1 on q, k, v, o, reentrant checkpointing) on the tiny
Mistral and prints each rank's peak of live tensor bytes (runner.memtrace) in the last of three steps, one
JSON line per rank. accelerate takes DDP on the CPU, so after Trainer made the Accelerator the script sets
its distributed type to FSDP and builds the FSDP plugin from the variables Trainer set; FSDP gets the
index-less CPU device. What it found is in docs/accuracy.md ("FSDP on the same stack"). QLoRA does not run
here: accelerate refuses a 4-bit model on the CPU under FSDP.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
FSDP_CONFIG = {"backward_prefetch": "backward_pre", "use_orig_params": True, "cpu_ram_efficient_loading": False,
               "sync_module_states": False}  # sync_module_states looks for a GPU


def main(batch: int, seq: int) -> dict:
    from benchmarks import stack_cpu

    stack_cpu.shim_transformers4()
    import peft
    import torch
    import torch.distributed.fsdp as fsdp_module
    import transformers
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.profiler import record_function

    from benchmarks import tiny_models
    from runner import memtrace

    torch.set_num_threads(1)
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    model_dir = tiny_models.build_tiny("mistral")
    init = fsdp_module.FullyShardedDataParallel.__init__

    def cpu_fsdp_init(self, *a, **k):  # accelerate passes torch.device("cpu"); FSDP computes "cpu:0"
        if str(k.get("device_id", "")).startswith("cpu"):
            k["device_id"] = torch.device("cpu")
        return init(self, *a, **k)

    fsdp_module.FullyShardedDataParallel.__init__ = cpu_fsdp_init

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, 2048, (seq,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone()}

    class Steps(transformers.TrainerCallback):  # the tuneplan:step ranges runner.memtrace reads
        def on_step_begin(self, args, state, control, **kw):
            self.range = record_function("tuneplan:step")
            self.range.__enter__()

        def on_step_end(self, args, state, control, **kw):
            self.range.__exit__(None, None, None)

    class FsdpOnCpu(transformers.Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if sharded:
                state = self.accelerator.state
                state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
                plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables Trainer set
                plugin.set_mixed_precision(state.mixed_precision)
                state.fsdp_plugin = plugin
                self.is_fsdp_enabled = True

    def work():
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa")
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=3, bf16=True,
            use_cpu=True, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
            logging_steps=100, save_strategy="no", report_to=[], optim="adamw_torch", learning_rate=1e-4,
            **({"fsdp": "full_shard auto_wrap", "fsdp_config": FSDP_CONFIG} if sharded else {}))
        FsdpOnCpu(model=model, args=args, train_dataset=Data(), callbacks=[Steps()]).train()

    trace = memtrace.measure(work)
    return {"rank": int(os.environ.get("RANK", 0)), "fsdp": sharded, "batch": batch, "seq": seq,
            "peak_bytes": trace.last.peak_bytes, "step_peaks": [s.peak_bytes for s in trace.steps]}


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    os.write(1, (json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))) + "\n").encode())  # one write per rank
