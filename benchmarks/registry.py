"""Every decoder-only causal LM the installed transformers registers, tiny, checked against the real code.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny config of the type's
own config class (2 layers or one of each layer kind, hidden 64, vocab 320), keeping what makes the
family distinct -- its MoE, MLA, sliding windows, hybrid attention / state-space layers, parallel
residuals, qk-norm, tied embeddings, softcapping, all left at the class's defaults -- and compares:

* the parameter count of the shape (meta device) with the real model's, and the LoRA (all-linear)
  trainable count with what real peft adds (or the message peft refuses it with);
* the analytic peak with simulate's (which runs the real transformers / peft code on fake tensors) for
  LoRA and full fine-tuning (bf16, no checkpointing, 2 x 128 tokens) and inference (bf16, 2 x 128
  tokens, 64 of them prompt), on the CPU.

    python benchmarks/registry.py [MODEL_TYPE ...] [--json out.json]

prints one row per model type. tests/test_registry.py holds each row to the rule: exact counts, and the
analytic peak within 3% of simulate's, or the family routed by advisor.families.analytic_coverage.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TOL = 0.03
BATCH, SEQ, PROMPT = 2, 128, 64
HIDDEN, INTER, VOCAB, HEADS, HEAD_DIM = 64, 128, 320, 4, 16

# sizes every family spells one way or another: (names, tiny value). Applied where the class has the field.
_SIZES = [
    (("hidden_size", "d_model", "n_embd"), HIDDEN),
    (("intermediate_size", "n_inner", "ffn_hidden_size", "decoder_ffn_dim", "ffn_dim", "dim_ff"), INTER),
    (("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
      "moe_shared_expert_intermediate_size", "prefix_dense_intermediate_size"), 32),
    (("num_hidden_layers", "n_layer", "n_layers", "num_layers"), 2),
    (("num_attention_heads", "n_head", "n_heads", "num_heads"), HEADS),
    (("head_dim", "attention_head_dim", "kv_channels", "dim_head"), HEAD_DIM),
    (("vocab_size",), VOCAB),
    (("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"), 512),
    (("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    (("num_experts_per_tok", "moe_topk", "num_experts_per_token"), 2),
    (("n_group", "topk_group", "num_expert_group"), 1),
    (("kv_lora_rank",), 16),
    (("qk_nope_head_dim", "v_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
      "mamba_d_head", "mamba_head_dim", "swa_head_dim", "index_head_dim"), HEAD_DIM),
    (("qk_rope_head_dim",), 8),
    (("qk_head_dim",), 24),
    (("linear_num_key_heads", "index_n_heads", "mamba_n_groups", "n_groups"), 2),
    (("linear_num_value_heads", "linear_num_heads", "swa_num_attention_heads"), HEADS),
    (("mamba_n_heads", "mamba_num_heads"), 8),
    (("mamba_d_state", "ssm_state_size", "state_size"), 8),
    (("mamba_chunk_size", "chunk_size", "block_size"), 32),
    (("mamba_dt_rank", "time_step_rank"), 8),
    (("sliding_window", "sliding_window_size", "local_attention_window_len"), 32),
    (("index_topk",), 32),
    (("hidden_size_per_layer_input",), 16),
    (("vocab_size_per_layer_input",), VOCAB),
    (("num_nextn_predict_layers",), 0),
    (("encoder_hash_byte_group_vocab",), 64),
    (("hidden_size_global",), HIDDEN),
]
MAX_PARAMS = 20_000_000  # a tiny model beyond this kept a real-size field: refused, never built for real

# what one family needs beyond the generic sizes (its config class validates them against each other, or
# its default hides the layer kinds the real checkpoints mix)
_FAMILY = {
    "gpt_neo": dict(window_size=32),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=2),
    "ernie4_5_moe": dict(moe_layer_end_index=1, moe_layer_interval=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "longcat_flash": dict(expert_ffn_hidden_size=32, zero_expert_num=2),
    "zamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, n_mamba_heads=2),
    "zamba2": dict(attention_hidden_size=128, attention_head_dim=32, mamba_headdim=16, kv_channels=16,
                   hybrid_layer_ids=[1], n_mamba_heads=8),
    "xlstm": dict(embedding_dim=HIDDEN),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_n_groups=1),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_n_groups=1),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_n_groups=1),
    "nemotron_h": dict(layers_block_type=["mamba", "moe", "attention", "mlp"]),
    "deepseek_v2": dict(first_k_dense_replace=1, q_lora_rank=None),
    "deepseek_v3": dict(first_k_dense_replace=1, q_lora_rank=24),
    "mpt": dict(expansion_ratio=2),
    "falcon": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False),
}


@dataclass
class Row:
    model_type: str
    status: str = "checked"  # checked | excluded | error
    why: str = ""  # excluded / error: the reason; checked: the coverage reason when routed
    params: int = 0
    params_real: int = 0
    lora: int = 0
    lora_real: int | None = None
    lora_refused: str = ""  # peft's message when it refuses all-linear on the model
    lora_problem: str = ""  # why the estimate refuses LoRA on all-linear (advisor.families.lora_problem)
    errors: dict = field(default_factory=dict)  # mode -> analytic / simulate - 1
    analytic: dict = field(default_factory=dict)
    simulated: dict = field(default_factory=dict)
    sim_problem: dict = field(default_factory=dict)  # mode -> why simulate cannot run it

    def worst(self) -> float:
        return max((abs(e) for e in self.errors.values()), default=0.0)


def quiet() -> None:
    """Fake tensors log every op they cannot run; the row says it once."""
    import logging

    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def not_decoder_only(model_type: str) -> str | None:
    """Why a registered causal LM is no decoder-only language model, or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        cfg = cls()
    except Exception:  # noqa: BLE001 - a class without usable defaults: decided when the tiny one is built
        return None
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model (its causal LM is the decoder half)"
    if hasattr(cfg, "is_decoder") and not cfg.is_decoder and hasattr(cfg, "add_cross_attention"):
        return "an encoder (BERT family) that becomes a decoder only with is_decoder=True"
    if getattr(cfg, "is_encoder", False) or getattr(cfg, "attn_type", None) == "bi" or model_type == "reformer":
        return "no causal decoder-only LM (a masked, permutation or locality-hashing LM)"
    if model_type in ("trocr",):
        return "the decoder of an encoder-decoder model"
    return None


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
_TOPK = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "n_group", "topk_group",
         "num_expert_group")


def _shrink(d: dict, family: str) -> dict:
    out = dict(d)
    layers0 = next((d[k] for k in _LAYER_KEYS if isinstance(d.get(k), int)), None)
    for names, value in _SIZES:
        for n in names:
            v = out.get(n)
            if isinstance(v, int) and not isinstance(v, bool):
                out[n] = min(v, value) if n in _TOPK else value
            elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                out[n] = [value] * len(v)  # a per-layer list (gemma3n's intermediate_size): cut below
    if "head_dim" in out and out["head_dim"] is None:
        out["head_dim"] = HEAD_DIM
    heads = out.get("num_attention_heads")
    kv = d.get("num_key_value_heads")
    if "num_key_value_heads" in out and isinstance(heads, int):
        # keep the attention kind: multi-query, grouped or multi-head (None: as many as the query heads)
        full = d.get("num_attention_heads")
        out["num_key_value_heads"] = heads if kv is None or kv == full else (1 if kv == 1 else 2)
    if isinstance(out.get("qk_rope_head_dim"), int):  # MLA: the rotary part is head_dim
        out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in out:
            out["qk_head_dim"] = out.get("qk_nope_head_dim", HEAD_DIM) + out["qk_rope_head_dim"]
    if isinstance(out.get("rotary_dim"), int):
        out["rotary_dim"] = 8
    if "q_lora_rank" in out and out["q_lora_rank"] is not None:
        out["q_lora_rank"] = 24
    for k in ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"):
        if isinstance(out.get(k), int) and out[k]:
            out[k] = 1  # one dense layer, then the MoE ones
    if any(isinstance(out.get(k), int) for k in ("num_experts", "n_routed_experts", "num_local_experts")):
        for k in ("num_experts_per_tok",):
            if k in out and out[k] is None:
                out[k] = 2
    for key in ("layer_types", "mlp_layer_types", "layers_block_type"):
        kinds = out.get(key)
        if isinstance(kinds, list) and kinds:
            seen = list(dict.fromkeys(kinds))  # one layer of each kind, in order of first appearance
            out[key] = seen if len(seen) > 1 else kinds[:2]
    out.update(_FAMILY.get(family, {}))
    n = max([len(out[k]) for k in ("layer_types", "layers_block_type") if isinstance(out.get(k), list)] + [2])
    n = _FAMILY.get(family, {}).get("num_hidden_layers", n)
    for k in _LAYER_KEYS:
        if isinstance(out.get(k), int):
            out[k] = n
    for k, v in list(out.items()):
        if isinstance(v, list) and layers0 and len(v) == layers0 and k not in ("layer_types", "layers_block_type"):
            out[k] = (v * n)[:n]  # per-layer lists follow the layer count
    if isinstance(out.get("per_layer_config"), dict):
        out["per_layer_config"] = {k: v for k, v in out["per_layer_config"].items() if str(k).isdigit() and int(k) < n}
    if isinstance(out.get("attention_types"), list):  # gpt_neo: [[kinds, repeat]]
        out["attention_types"] = [[out["attention_types"][0][0], max(n // len(out["attention_types"][0][0]), 1)]]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
              "image_token_id", "image_token_index", "video_token_id", "audio_token_id", "boi_token_id",
              "eoi_token_id", "eod_token_id"):
        v = out.get(k)
        if isinstance(v, int) and v >= VOCAB:
            out[k] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(k, VOCAB - 1)
        elif isinstance(v, list):
            out[k] = [x if x < VOCAB else 2 for x in v if isinstance(x, int)]
    return out


def tiny_config(model_type: str) -> dict:
    """A tiny config of ``model_type`` as transformers writes it (every field stated), JSON values."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = CONFIG_MAPPING[model_type]().to_dict()
    kw = _shrink(base, model_type)
    for sub, value in list(kw.items()):
        if isinstance(value, dict) and isinstance(value.get("model_type"), str):  # text_config, vision_config...
            kw[sub] = _shrink(value, value["model_type"])
    kw.pop("model_type", None)
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        kw.pop(k, None)
    from advisor.model import _decode_special_floats

    cfg = AutoConfig.for_model(model_type, **kw)
    return _decode_special_floats(json.loads(cfg.to_json_string(use_diff=False)))


def _plans(shape):
    from advisor.spec import InferSpec, Plan, TrainSpec

    hw = {"device": "cpu", "gpu": None}

    def train(method: str) -> Plan:
        t = TrainSpec(method=method, precision="bf16", optimizer="adamw", micro_batch=BATCH, seq_len=SEQ,
                      grad_checkpointing=False, attn_impl="sdpa")
        return Plan(task="training", training=t, hardware=hw, data={"padded": False})

    infer = Plan(task="inference", hardware=hw,
                 inference=InferSpec(batch=BATCH, seq_len=SEQ, precision="bf16", prompt_len=PROMPT))
    return {"lora": train("lora"), "full": train("full"), "inference": infer}


def _peft_lora(model) -> tuple[int | None, str]:
    import peft

    try:
        lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    except Exception as e:  # noqa: BLE001 - peft's refusal is the finding
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return sum(p.numel() for p in lora.parameters() if p.requires_grad), ""


def check(model_type: str, modes: tuple[str, ...] = ("lora", "full", "inference"), limit_s: int = 300) -> Row:
    """One family: counts against the real model and peft, the analytic peak against simulate's (at most
    ``limit_s`` seconds: a family that takes longer is an error row)."""
    import signal

    def stop(*_):
        raise TimeoutError(f"{model_type} took over {limit_s} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit_s)
    try:
        return _check(model_type, modes)
    except TimeoutError as e:
        return Row(model_type, status="error", why=str(e))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _check(model_type: str, modes: tuple[str, ...]) -> Row:
    import torch
    import transformers

    from advisor.families import analytic_coverage, lora_problem
    from advisor.memory import estimate
    from advisor.model import count_on_meta, resolve_config
    from advisor.simulate import simulate

    row = Row(model_type)
    why = not_decoder_only(model_type)
    if why:
        row.status, row.why = "excluded", why
        return row
    try:
        config = tiny_config(model_type)
        shape = count_on_meta(f"tiny-{model_type}", config)
        if shape.params_total > MAX_PARAMS:
            raise ValueError(f"the tiny config still has {shape.params_total:,} parameters (a size field not shrunk)")
        cfg, _ = resolve_config(config, model_type)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.status, row.why = "error", f"cannot build a tiny model: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return row
    row.params, row.params_real = shape.params_total, sum(p.numel() for p in model.parameters())
    row.lora = shape.lora_params("all-linear", 8)
    row.lora_real, row.lora_refused = _peft_lora(model)
    del model
    row.why = analytic_coverage(shape) or ""
    row.lora_problem = lora_problem(shape) or ""
    for mode, plan in _plans(shape).items():
        if mode not in modes:
            continue
        if mode == "lora" and row.lora_refused:
            continue
        try:
            a = estimate(plan, shape).peak_allocated_bytes
        except Exception as e:  # noqa: BLE001
            row.analytic[mode] = f"{type(e).__name__}: {str(e)[:200]}"
            a = None
        else:
            row.analytic[mode] = a
        try:
            s = simulate(plan, shape).peak_allocated_bytes
        except Exception as e:  # noqa: BLE001
            row.sim_problem[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            continue
        row.simulated[mode] = s
        if isinstance(a, int):
            row.errors[mode] = a / s - 1
    return row


def _verdict(row: dict) -> str:
    if row["status"] != "checked":
        return row["status"]
    return "routed" if row["why"] else "checked"


def _errs(row: dict | None) -> list[str]:
    if row is None:
        return ["", "", ""]
    out = []
    for m in ("lora", "full", "inference"):
        if m in row["errors"]:
            out.append(f"{row['errors'][m]:+.1%}")
        elif m == "lora" and row.get("lora_refused"):
            out.append("peft refuses")
        elif m in row.get("sim_problem", {}):
            out.append("sim fails")
        else:
            out.append("")
    return out


def _reason(row: dict) -> str:
    if row["status"] == "checked" and row["why"]:
        why = row["why"]
        return why[why.find("(") + 1:why.rfind(")")] if "(" in why.split(" is not")[0] else "no checked profile"
    return row["why"].split(":")[0][:70] if row["status"] != "checked" else ""


def table(results: list[dict]) -> str:
    """Markdown: one row per model type, the analytic peak against simulate's on each release measured."""
    versions = [r["transformers"] for r in results]
    by = [{row["model_type"]: row for row in r["rows"]} for r in results]
    types = sorted(set().union(*by))
    head = "| model type | verdict | " + " | ".join(f"{v}: LoRA | full | inference" for v in versions) + " | why |"
    lines = [head, "|" + "---|" * (3 + 3 * len(versions))]
    counts: dict[str, dict[str, int]] = {v: {} for v in versions}
    for t in types:
        rows = [b.get(t) for b in by]
        first = next(r for r in rows if r is not None)
        verdicts = {_verdict(r) for r in rows if r is not None}
        for v, r in zip(versions, rows, strict=True):
            if r is not None:
                counts[v][_verdict(r)] = counts[v].get(_verdict(r), 0) + 1
        cells = [c for r in rows for c in _errs(r if r is None or r["status"] == "checked" else None)]
        lines.append(f"| `{t}` | {' / '.join(sorted(verdicts))} | " + " | ".join(cells) + f" | {_reason(first)} |")
    summary = "; ".join(f"transformers {v}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts[v].items()))
                        for v in versions)
    return "\n".join(lines) + f"\n\n{summary}."


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    quiet()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("types", nargs="*")
    ap.add_argument("--json")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print (or --write) the table of saved sweeps")
    ap.add_argument("--write", metavar="MD", help="with --table: replace the registry block of this markdown file")
    args = ap.parse_args(argv)
    if args.table:
        md = table([json.loads(Path(p).read_text()) for p in args.table])
        if args.write:
            from benchmarks.docblock import write_between

            write_between(args.write, "registry", md)
        else:
            print(md)
        return 0
    import transformers

    rows = []
    for mt in args.types or causal_lm_types():
        row = check(mt)
        rows.append(row)
        errs = " ".join(f"{m} {e:+.1%}" for m, e in row.errors.items())
        lora = "refused" if row.lora_refused else ("=" if row.lora == row.lora_real else f"{row.lora}!={row.lora_real}")
        cnt = "" if row.status != "checked" else f"params {'=' if row.params == row.params_real else '!='} lora {lora}"
        sims = " ".join(f"[{m}: {p[:80]}]" for m, p in row.sim_problem.items())
        print(f"{mt:28s} {row.status:8s} {cnt:24s} {errs:45s} {row.why[:90]} {sims}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"transformers": transformers.__version__,
                                               "rows": [asdict(r) for r in rows]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())



