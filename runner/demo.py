"""`tuneplan demo`: a real QLoRA fine-tune on the CPU in about a minute, with nothing downloaded.

It builds a small Llama (the real transformers architecture, random weights) and a byte-level
BPE tokenizer trained on the shipped instruction data (runner/demo_data/instructions.jsonl,
written for tuneplan), saves both as a model directory, writes a plan.yaml, and runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "instructions.jsonl"
SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
# A minimal chat template: the assistant turn ends with EOS (so the model learns to stop).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TINY_LLAMA = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def _corpus(data_path: Path) -> list[str]:
    from runner.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    texts = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT]
    for line in data_path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            texts += [str(v) for v in rec.values() if isinstance(v, str)]
    return texts


def build_tokenizer(out_dir: str | Path, data_path: str | Path = DEMO_DATA, vocab_size: int = 800):
    """A byte-level BPE tokenizer trained on the data, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()) + roles,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(Path(data_path)), trainer=trainer)
    bos = tok.token_to_id(SPECIALS["bos"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"],
                                   pad_token=SPECIALS["pad"], unk_token=SPECIALS["unk"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model_dir(out_dir: str | Path, data_path: str | Path = DEMO_DATA, seed: int = 0, **config) -> Path:
    """out_dir/ with a tiny random-weight Llama (config.json + model.safetensors) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a one-file tiny model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, data_path)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **{**TINY_LLAMA, **config})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out


def demo_plan(model_dir: Path, data_path: Path, output_dir: Path, max_steps: int = 200):
    from advisor.spec import build_plan

    return build_plan({
        "model": {"ref": str(model_dir)},
        "training": {"method": "qlora", "precision": "fp32", "optimizer": "adamw", "micro_batch": 4,
                     "seq_len": 128, "grad_accum": 1, "grad_checkpointing": False,
                     "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
                     "learning_rate": 3e-3},
        "hardware": {"gpu": None, "gpus": 1, "device": "cpu"},
        # pad to seq_len: the batches then have exactly the shape the estimate assumes
        "data": {"path": str(data_path), "val_split": 0.1, "pad_to": "seq_len"},
        "run": {"output_dir": str(output_dir), "name": "demo-run", "max_steps": max_steps, "warmup_steps": 10,
                "lr_scheduler": "cosine", "eval_every": 50, "save_every": 100},
    })
