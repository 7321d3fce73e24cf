"""Pydantic input models: the one Plan that travels from the form to the runner.

Every field has a description (it becomes help text and docs); choices are ``Literal``;
numbers carry bounds. Unknown keys are an error. Cross-field rules that need the model's
shape (LoRA rank above the hidden size, a sequence longer than the model's maximum) live in
:func:`check_against_shape`, which reports every problem at once.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from advisor.problems import Change, Problem, Problems

if TYPE_CHECKING:
    from advisor.model import ModelShape

Method = Literal["full", "lora", "qlora"]
Precision = Literal["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16", "mixed-bf16"]
Optimizer = Literal[
    "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "sgd_momentum", "adafactor"
]
AttnImpl = Literal["sdpa", "eager", "flash_attention_2"]
Task = Literal["training", "inference"]
Device = Literal["cuda", "cpu"]
WeightQuant = Literal["none", "int8", "nf4"]
InferPrecision = Literal["fp32", "bf16", "fp16"]
ZeroStage = Literal[0, 1, 2, 3]
DataFormat = Literal["auto", "alpaca", "prompt_completion", "qa", "text", "messages"]
Template = Literal["auto", "alpaca", "chat", "plain"]
Harness = Literal["tuneplan", "hf-trainer", "other"]

# The choice lists every front end offers: the Literals above, read, never written a second time.
METHODS: tuple[str, ...] = get_args(Method)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# What each precision keeps in which dtype, and a full fine-tune's bytes per parameter with AdamW (weights +
# gradients + its two states, then the optimizer step's temporary; advisor.memory, pinned by tests/test_names.py):
# the --help, the plan field and the estimate's notes say these.
PRECISION_WORDS: dict[str, str] = {
    "bf16": "pure bf16: weights, gradients and optimizer states in bf16 (a full fine-tune with AdamW: 8 bytes "
            "per parameter, 10 during the optimizer step); updates below bf16's resolution of a weight round away",
    "fp16": "pure fp16: the same in fp16; a full fine-tune with AdamW underflows (no loss scaling is possible): "
            "use amp-fp16",
    "amp-bf16": "mixed: fp32 master weights, gradients and optimizer states, bf16 compute (a full fine-tune with "
                "AdamW: 16 bytes per parameter, 20 during the optimizer step)",
    "amp-fp16": "mixed as amp-bf16, fp16 compute with loss scaling: the safe choice on cards without bf16 (T4, V100)",
    "fp32": "everything in fp32, activations too (per parameter as amp-bf16)",
    "mixed-bf16": "FSDP / ZeRO mixed precision as accelerate's mixed_precision: bf16 and DeepSpeed's bf16 run it: "
                  "fp32 master weights and optimizer states sharded over the GPUs, bf16 compute copies of the "
                  "gathered weights (FSDP) or bf16 weights beside fp32 master shards (DeepSpeed ZeRO-1/2), gradients "
                  "reduced in bf16 (a full fine-tune with AdamW under FSDP: 16 bytes per parameter, 20 during the "
                  "optimizer step, divided over the GPUs, plus the gathered layers in bf16); on one GPU or DDP it is "
                  "amp-bf16; full fine-tuning only (LoRA and QLoRA adapters are fp32 masters in every mode)",
}
PRECISION_ADAPTERS = ("LoRA and QLoRA adapters and their optimizer states are fp32 in every mode: for LoRA the "
                      "precision sets the frozen weights (amp-* and fp32: fp32, twice bf16's memory), for QLoRA the "
                      "compute dtype")
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ATTN_IMPLS: tuple[str, ...] = get_args(AttnImpl)
TASKS: tuple[str, ...] = get_args(Task)
DEVICES: tuple[str, ...] = get_args(Device)
WEIGHT_QUANTS: tuple[str, ...] = get_args(WeightQuant)
INFER_PRECISIONS: tuple[str, ...] = get_args(InferPrecision)
ZERO_STAGES: tuple[int, ...] = get_args(ZeroStage)
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
TEMPLATES: tuple[str, ...] = get_args(Template)
HARNESSES: tuple[str, ...] = get_args(Harness)


def ui(flag: str | None = None, form: str | None = None) -> dict:
    """A field's names in the front ends: its CLI flag and its form field in the app. Read by
    :func:`field_table`; the CLI's flag table and the app's field table are built from it."""
    return {k: v for k, v in (("flag", flag), ("form", form)) if v}


class SpecError(Problems):
    """A user mistake in the plan: every problem found (typed, with its plan field), each with its fix."""


# C0 and C1 control characters and the Unicode line breaks: none belongs in a name, a reference or a
# path, and a newline in one would end a comment or a line of a script written from the plan.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _numeric(annotation) -> bool:
    """Whether a field's type is a number (int, float, a Literal of numbers), alone or with None."""
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    return any(_numeric(a) for a in args)


class _Strict(BaseModel):
    """Unknown keys are errors; numbers must be finite (no .inf, .nan) and never true/false; strings
    hold no control characters."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, v, info):
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(v, bool) and field is not None and _numeric(field.annotation):
            raise ValueError("must be a number, not true/false")
        for text in (v if isinstance(v, list) else [v]):
            if isinstance(text, str) and _CONTROL.search(text):
                raise ValueError("holds a control character (a line break, tab or escape); names, references and "
                                 "paths must be one plain line")
        return v


class ModelRef(_Strict):
    ref: str = Field(
        "meta-llama/Llama-3.1-8B",
        description="A bundled profile name, a local config.json, a local model directory, or a hub id.",
        min_length=1,
        json_schema_extra=ui(flag="--model", form="model"),
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.",
                                 json_schema_extra=ui(flag="--revision"))
    trust_remote_code: bool = Field(
        False, description="Allow custom modelling code from the hub. Off unless you trust the repository.",
        json_schema_extra=ui(flag="--trust-remote-code"),
    )


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank r of the A (in x r) and B (r x out) matrices.",
                   json_schema_extra=ui(flag="--lora-r", form="lora_r"))
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r.",
                         json_schema_extra=ui(flag="--lora-alpha", form="lora_alpha"))
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 saves a mask per layer).",
                           json_schema_extra=ui(flag="--lora-dropout"))
    targets: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the output head, as peft "
        "means it) or a list of module names such as q_proj,v_proj.",
        json_schema_extra=ui(flag="--lora-targets", form="lora_targets"),
    )

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str):
            if v.strip() == "all-linear":
                return "all-linear"
            v = [t for t in (s.strip() for s in v.split(",")) if t]
        v = [t.strip() for t in v if t.strip()]
        if not v:
            raise ValueError("name at least one target module, or use 'all-linear'")
        return v


class TrainSpec(_Strict):
    method: Method = Field("qlora", description="full: train every weight; lora: frozen weights + adapters; "
                           "qlora: 4-bit NF4 frozen weights + adapters.",
                           json_schema_extra=ui(flag="--method", form="method"))
    precision: Precision = Field("bf16", description="; ".join(f"{k}: {v}" for k, v in PRECISION_WORDS.items())
                                 + f". {PRECISION_ADAPTERS}.",
                                 json_schema_extra=ui(flag="--precision", form="precision"))
    optimizer: Optimizer = Field("adamw", description="Optimizer; adamw keeps 2 states per trainable "
                                 "parameter, 8-bit variants 2 bytes, sgd none, adafactor factored rows/cols.",
                                 json_schema_extra=ui(flag="--optimizer", form="optimizer"))
    micro_batch: int = Field(1, ge=1, le=65536, description="Sequences per forward/backward pass (per GPU).",
                             json_schema_extra=ui(flag="--batch", form="batch"))
    seq_len: int = Field(2048, ge=1, le=10_000_000, description="Tokens per sequence.",
                         json_schema_extra=ui(flag="--seq", form="seq"))
    grad_accum: int = Field(1, ge=1, le=65536, description="Micro-batches accumulated per optimizer step: a "
                            "larger effective batch without more activations (gradients then stay alive "
                            "through every forward).",
                            json_schema_extra=ui(flag="--grad-accum", form="accum"))
    grad_checkpointing: bool = Field(True, description="Recompute activations in backward: true reduces memory "
                                     "(only layer inputs are kept), costs about one extra forward.",
                                     json_schema_extra=ui(flag="--grad-checkpointing", form="ckpt"))
    attn_impl: AttnImpl = Field("sdpa", description="Attention kernel: sdpa/flash keep no seq x seq matrix; "
                                "eager stores the attention probabilities (grows with seq^2).",
                                json_schema_extra=ui(flag="--attn"))
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (lora and qlora).")
    double_quant: bool = Field(True, description="QLoRA: quantize the 4-bit blocks' absmax constants too "
                               "(saves about 0.37 bits per parameter).")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    transformers: str = Field("5", min_length=1, max_length=32, description="transformers release the run "
                              "uses: 5 (tuneplan's own stack) or 4.46-4.57. On 4.46-4.48 the loss keeps one more "
                              "fp32 copy of the logits; on 4.x mixture-of-experts layers are one nn.Linear per "
                              "expert, which QLoRA quantizes (advisor/software.py).",
                              json_schema_extra=ui(flag="--transformers", form="transformers"))
    harness: Harness = Field("tuneplan", description="What runs the job, for the band around the expected GPU "
                             "peak: tuneplan (tuneplan's own runner, the tightest band), hf-trainer (HF Trainer / "
                             "TRL) or other (another harness: the widest); the band's widths come from published runs "
                             "of each (docs/accuracy.md), and the fit verdict uses its high end.",
                             json_schema_extra=ui(flag="--harness", form="harness"))
    offload_activations: bool = Field(False, description="Offload the checkpointed layer inputs to pinned host "
                                      "memory (torch's save_on_cpu around each checkpointed layer, as transformers' "
                                      "activation_checkpointing_enable(offload=True)): GPU memory down by every "
                                      "layer's saved input, host RAM up by as much, and a copy each way over the host "
                                      "link per step; needs gradient checkpointing.",
                                      json_schema_extra=ui(flag="--offload-activations", form="offload"))
    liger: bool = Field(False, description="Liger kernels (liger-kernel, CUDA with Triton; tuneplan[liger]): fused "
                        "linear cross-entropy (the logits are never materialized: the loss keeps the hidden states' "
                        "gradient, and the head's when it trains), RMSNorm saving its input only, SwiGLU "
                        "recomputing its product, in-place RoPE; for the model types Liger-Kernel patches "
                        "(advisor/liger.py).",
                        json_schema_extra=ui(flag="--liger", form="liger"))

    @field_validator("offload_activations")
    @classmethod
    def _offload_needs_checkpoints(cls, v: bool, info) -> bool:
        if v and info.data.get("grad_checkpointing") is False:
            raise ValueError("offloading moves the checkpointed layers' inputs to host memory, and without gradient "
                             "checkpointing there are none: turn checkpointing on (training.grad_checkpointing=true)")
        return v

    @field_validator("precision")
    @classmethod
    def _mixed_is_for_full(cls, v: str, info) -> str:
        if v == "mixed-bf16" and info.data.get("method") in ("lora", "qlora"):
            raise ValueError(f"mixed-bf16 (fp32 master weights sharded, bf16 compute) is for full fine-tuning; "
                             f"{info.data['method']} keeps its adapters in fp32 in every mode: use bf16 (or "
                             "method full)")
        return v

    @field_validator("transformers", mode="before")
    @classmethod
    def _version_number(cls, v):
        # YAML and overrides read 4.48 and 5 as numbers; 4.50 would arrive as 4.5, so a number with one
        # decimal digit is refused rather than guessed
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        text = repr(v)
        if isinstance(v, float) and int(v) == 4 and len(text.split(".")[1]) < 2:
            raise ValueError(f"write the version in quotes (\"{v:.2f}\" or \"{text}\"): as a number {text} "
                             "may have lost a trailing zero")
        return text

    @field_validator("transformers")
    @classmethod
    def _transformers(cls, v: str) -> str:
        from advisor.software import problem

        why = problem(v)
        if why:
            raise ValueError(why)
        return v.strip()


class InferSpec(_Strict):
    batch: int = Field(1, ge=1, le=65536, description="Sequences generated at once.",
                       json_schema_extra=ui(flag="--batch", form="batch"))
    seq_len: int = Field(4096, ge=1, le=10_000_000, description="Whole context per sequence: prompt + "
                         "generated tokens (the KV cache holds all of them).",
                         json_schema_extra=ui(flag="--seq", form="seq"))
    precision: InferPrecision = Field("bf16", description="Dtype of weights, activations and KV cache.",
                                      json_schema_extra=ui(flag="--precision", form="precision"))
    weight_quant: WeightQuant = Field("none", description="Weight storage: none (precision), int8 "
                                      "(LLM.int8) or nf4 (4-bit).",
                                      json_schema_extra=ui(flag="--weight-quant", form="weight_quant"))
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="auto: the compute dtype; fp8: 1 byte.")
    prompt_len: int | None = Field(None, ge=1, description="Prompt tokens (prefilled at once); the rest of "
                                   "seq_len is generated. Default: the whole context as one prompt (an upper "
                                   "bound for the prefill).",
                                   json_schema_extra=ui(flag="--prompt-len"))

    @field_validator("prompt_len")
    @classmethod
    def _prompt(cls, v: int | None, info) -> int | None:
        seq = info.data.get("seq_len")
        if v is not None and seq is not None and v > seq:
            raise ValueError(f"prompt_len {v} is longer than seq_len {seq} (seq_len = prompt + generated tokens)")
        return v


class Hardware(_Strict):
    gpu: str | None = Field("RTX 4090", description="GPU name (see `tuneplan profiles --gpus`); None for none.",
                            json_schema_extra=ui(flag="--gpu", form="gpu"))
    gpus: int = Field(1, ge=1, le=4096, description="Number of GPUs in all, over every node (on the CPU: "
                      "processes); each node runs gpus / nodes of them.",
                      json_schema_extra=ui(flag="--gpus", form="gpus"))
    zero: ZeroStage = Field(0, description="ZeRO stage across GPUs: 1 shards optimizer states, "
                                      "2 also gradients, 3 also weights (FSDP full shard ~ 3).",
                            json_schema_extra=ui(flag="--zero", form="zero"))
    device: Device = Field("cuda", description="cuda: GPU memory incl. CUDA context and allocator; cpu: RAM "
                           "for the tensors alone.",
                           json_schema_extra=ui(flag="--device", form="device"))
    nodes: int = Field(1, ge=1, le=512, description="Machines the GPUs are spread over; hardware.gpus must "
                       "divide evenly between them (8 H100s per node: gpus=16, nodes=2).")
    node_rank: int = Field(0, ge=0, le=511, validate_default=True, description="This machine's index, 0 to "
                           "nodes - 1; node 0 is the main node. Set per machine with an override "
                           "(hardware.node_rank=$SKYPILOT_NODE_RANK, =$SLURM_NODEID).")
    main_address: str | None = Field(None, min_length=1, max_length=253, validate_default=True,
                                     description="IP address or host name of node 0 that every node can "
                                     "reach; needed when nodes > 1.")
    main_port: int = Field(29500, ge=1024, le=65535, description="TCP port on node 0 for the rendezvous "
                           "(torch.distributed's MASTER_PORT); free on node 0, open to the other nodes.")

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: int, info) -> int:
        gpus = info.data.get("gpus")
        if gpus is not None and gpus % v:
            raise ValueError(f"{gpus} GPUs do not split evenly over {v} nodes; make hardware.gpus a multiple "
                             f"of hardware.nodes (e.g. gpus={v * -(-gpus // v)})")
        return v

    @field_validator("node_rank")
    @classmethod
    def _node_rank(cls, v: int, info) -> int:
        nodes = info.data.get("nodes")
        if nodes is not None and v >= nodes:
            raise ValueError(f"node rank {v} is out of range for {nodes} node{'s' if nodes > 1 else ''}; "
                             f"use 0 to {nodes - 1} (0 is the main node)")
        return v

    @field_validator("main_address")
    @classmethod
    def _main_address(cls, v: str | None, info) -> str | None:
        if v is not None:
            v = v.strip()
            if not _ADDRESS.fullmatch(v):
                raise ValueError(f"main address {v!r} is not an IP address or host name")
        nodes = info.data.get("nodes")
        if v is None and nodes is not None and nodes > 1:
            raise ValueError(f"{nodes} nodes need the address of node 0; set hardware.main_address=IP (SkyPilot: "
                             "the first line of $SKYPILOT_NODE_IPS; Slurm: the first host of $SLURM_JOB_NODELIST)")
        return v


_ADDRESS = re.compile(r"[A-Za-z0-9_.:\-]+|\[[0-9A-Fa-f:.]+\]")


class DataSpec(_Strict):
    path: str | None = Field(None, description="Training data: a .jsonl, .json or .csv file (instruction/input/"
                             "output, prompt/completion, question/answer, text, or chat messages).")
    format: DataFormat = Field(
        "auto", description="Record shape; auto detects it from the first record's keys.")
    template: Template = Field(
        "auto", description="Prompt template: the tokenizer's chat template for messages when it has one, "
        "else alpaca (### Instruction / ### Input / ### Response).")
    prompt_loss_weight: float = Field(0.0, ge=0, le=1, description="Weight of prompt tokens in the loss: "
                                      "0 trains on the response only (default), 1 on everything.")
    packing: bool = Field(False, description="Pack several short examples into one sequence (less padding, "
                          "faster); examples never attend across their boundaries' loss.")
    val_split: float = Field(0.05, ge=0, lt=1, description="Share of examples held out for evaluation.")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N examples (quick runs).")
    pad_to: Literal["longest", "seq_len"] = Field("longest", description="Batch padding: longest pads each "
                                                  "batch to its longest example (faster); seq_len always pads "
                                                  "to training.seq_len (memory is then what the plan predicts).")
    padded: bool | None = Field(None, description="Whether batches carry padding, which gives sdpa attention a "
                                "mask (memory: docs/memory-model.md). Unset: padded when micro_batch > 1 or "
                                "pad_to=seq_len; false for data whose every sequence is exactly seq_len tokens.",
                                json_schema_extra=ui(flag="--padded"))


def padded_batches(plan: Plan) -> bool:
    """Whether the plan's training batches carry padding tokens (and so an attention mask).

    The runner right-pads each batch to its longest example (or to seq_len), packing included: its
    packs are at most seq_len long. So a batch of several sequences, or any batch padded to seq_len,
    has padding unless the data says every sequence is exactly seq_len tokens (data.padded=false)."""
    d = plan.data
    if d.padded is not None:
        return d.padded
    return plan.training.micro_batch > 1 or d.pad_to == "seq_len"


class RunSpec(_Strict):
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    name: str | None = Field(None, description="Run directory name (default: model-method-timestamp).")
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training data (3, the Hugging Face "
                          "Trainer's default); the job's time and cost count them too.",
                          json_schema_extra=ui(flag="--epochs", form="epochs"))
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides "
                                  "epochs).")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("cosine", description="Learning-rate "
                                                                   "schedule after warmup.")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None: off).")
    eval_every: int = Field(50, ge=1, description="Evaluate every N optimizer steps.")
    save_every: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed (data split, shuffling, adapter init); "
                      "0 to 2^32 - 1, as numpy takes it.")
    merge_export: bool = Field(False, description="Also save the base model with the adapter merged in.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest N checkpoints (older ones are "
                                  "deleted after a new one is written).")
    fail_fast: bool = Field(True, description="Before step 1, run one step on the longest batch the data can "
                            "produce, so a batch that does not fit fails in the first minute (training is "
                            "unchanged by it).")


class JobSpec(_Strict):
    """What the fine-tune chews through, for its time and cost (its epochs are run.epochs). With the
    data at hand the runner counts the real examples and tokens; these are what the plan was priced on."""

    examples: int = Field(1000, ge=1, le=10**12, description="Training examples in the dataset (time and cost).",
                          json_schema_extra=ui(flag="--examples", form="job_examples"))
    avg_tokens: int = Field(512, ge=1, le=10_000_000, description="Mean tokens per example (time and cost).",
                            json_schema_extra=ui(flag="--avg-tokens", form="job_avg_tokens"))
    target_batch: int = Field(16, ge=1, le=65536, description="Target effective batch (sequences per optimizer "
                              "step) that a recommendation keeps: micro-batch x gradient accumulation x GPUs.",
                              json_schema_extra=ui(flag="--batch", form="job_target_batch"))
    budget_usd: float | None = Field(None, gt=0, description="Most US dollars to spend; options over it are "
                                     "marked (None: no limit).",
                                     json_schema_extra=ui(flag="--budget", form="job_budget"))


class Plan(_Strict):
    model: ModelRef = Field(default_factory=ModelRef, description="Which model.")
    task: Task = Field("training", description="training (fine-tune) or inference (serve).",
                       json_schema_extra=ui(flag="--task", form="task"))
    training: TrainSpec = Field(default_factory=TrainSpec, description="Fine-tuning settings.")
    inference: InferSpec = Field(default_factory=InferSpec, description="Serving settings.")
    hardware: Hardware = Field(default_factory=Hardware, description="Where it runs.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data (the runner).")
    run: RunSpec = Field(default_factory=RunSpec, description="How the runner trains and saves.")
    job: JobSpec = Field(default_factory=JobSpec, description="The job's size, for time and cost.")


def field_table(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, dict]:
    """Every leaf field of the plan by its dotted path: its description, choices (a Literal's values),
    and the names the front ends give it (:func:`ui`: ``flag``, ``form``). The CLI's flag table and the
    app's field table are read from here, so a field is named in one place."""
    model = model or Plan
    out: dict[str, dict] = {}
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(field_table(ann, f"{path}."))
            continue
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        choices = get_args(ann) if get_origin(ann) is Literal else ()
        out[path] = {"description": f.description or "", "choices": choices, **extra}
    return out


def format_validation_error(err: ValidationError) -> list[str]:
    """Turn pydantic's errors into one plain line each: 'training.micro_batch: must be >= 1 (got 0)'."""
    return [str(p) for p in validation_problems(err)]


def validation_problems(err: ValidationError) -> list[Problem]:
    """pydantic's errors as typed problems: field 'training.micro_batch', what 'must be >= 1 (got 0)'."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = _plain(e["type"], e.get("ctx") or {}, msg)
        if e["type"] != "extra_forbidden" and not isinstance(got, (dict, list)):
            msg = f"{msg} (got {got!r})"
        lines.append(Problem(msg, loc or None))
    return lines


_PLAIN = {"greater_than_equal": "must be at least {ge}", "greater_than": "must be above {gt}",
          "less_than_equal": "must be at most {le}", "less_than": "must be below {lt}",
          "finite_number": "must be a finite number", "int_parsing": "must be a whole number",
          "int_from_float": "must be a whole number", "int_type": "must be a whole number",
          "float_parsing": "must be a number", "float_type": "must be a number",
          "bool_parsing": "must be true or false", "string_too_short": "must not be empty"}


def _plain(kind: str, ctx: dict, msg: str) -> str:
    """pydantic's wording ('Input should be greater than or equal to 1') in the plan's own ('must be at
    least 1'); anything else as pydantic says it."""
    words = _PLAIN.get(kind)
    if words is None:
        return msg
    try:
        return words.format(**{k: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool)
                               else f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()})
    except (KeyError, ValueError):
        return msg


def build_plan(data: dict) -> Plan:
    """Validate a nested dict into a Plan, raising SpecError with every problem at once."""
    try:
        return Plan.model_validate(data)
    except ValidationError as err:
        raise SpecError(validation_problems(err)) from None


def check_against_shape(plan: Plan, shape: ModelShape) -> list[Problem]:
    """Rules that need the model's dimensions; every problem, each with its plan field and fix."""
    problems = []
    t, inf = plan.training, plan.inference
    seq = t.seq_len if plan.task == "training" else inf.seq_len
    if shape.max_position and seq > shape.max_position:
        problems.append(Problem(f"sequence length {seq} is longer than {shape.name}'s maximum of "
                                f"{shape.max_position} positions", f"{plan.task}.seq_len",
                                change=Change(f"{plan.task}.seq_len", (shape.max_position,), "max")))
    if plan.task == "training" and t.method in ("lora", "qlora"):
        if t.lora.r > shape.hidden_size:
            problems.append(Problem(f"LoRA rank {t.lora.r} is above the hidden size {shape.hidden_size}",
                                    "training.lora.r", "a rank that large is no longer low-rank (use 4-64)"))
        if not shape.linears:
            problems.append(Problem(f"{shape.name} has no linear layers to adapt or quantize", "training.method",
                                    change=Change("training.method", ("full",))))
        else:
            unknown = shape.unknown_targets(t.lora.targets)
            if unknown:
                names = sorted({g.leaf for g in shape.linears})
                problems.append(Problem(f"LoRA targets {', '.join(unknown)} match no linear layer of {shape.name}",
                                        "training.lora.targets",
                                        f"its linear layers are {', '.join(names)} (or use all-linear)"))
    return problems
