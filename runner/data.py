"""Training data: JSONL/JSON/CSV records -> prompt template -> tokens with a loss mask -> train/val.

Record shapes (DataSpec.format, ``auto`` detects them from the first record's keys):

=================  ===========================================  ================================
format             fields                                        trained on (prompt_loss_weight 0)
=================  ===========================================  ================================
alpaca             instruction, input (optional), output         output
prompt_completion  prompt, completion                            completion
qa                 question, answer                              answer
text               text                                          everything
messages           messages: [{role, content}, ...]              every assistant message
=================  ===========================================  ================================

Every problem is reported with its line number (JSONL, CSV) or record number (JSON), all at once.
No torch at import time: ``tuneplan data check`` without ``--model`` never needs it.
"""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "qa": ("question", "answer"),
    "text": ("text",),
    "messages": ("messages",),
}
FORMAT_WORDS = {"alpaca": "alpaca records need instruction and output",
                "prompt_completion": "prompt/completion records need prompt and completion",
                "qa": "question/answer records need question and answer",
                "text": "text records need text",
                "messages": "chat records need messages"}
ROLES = ("system", "user", "assistant", "tool")
MAX_PROBLEMS = 20

# The Stanford Alpaca prompt (Taori et al. 2023), the template most instruction data was made for.
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# Chat records for a tokenizer without a chat template.
PLAIN_CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n",
                      "tool": "### Tool:\n"}


class DataError(ValueError):
    """Problems with the data, one line each (with line numbers)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Record:
    line: int  # 1-based line (JSONL/CSV) or record number (JSON)
    data: dict


@dataclass
class Example:
    """One tokenized example: ``labels`` is -100 where no loss is taken; ``weights`` (only when
    prompt_loss_weight is strictly between 0 and 1) is the per-token loss weight."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float] | None
    line: int
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


@dataclass
class Prepared:
    train: list[Example]
    val: list[Example]
    format: str
    template: str
    records: int
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------

def read_records(path: str | Path) -> tuple[list[Record], list[str]]:
    """Records of a .jsonl/.json/.csv file and the problems found (with line numbers)."""
    path = Path(path)
    if not path.exists():
        raise DataError([f"data file {path} does not exist"])
    if path.is_dir():
        raise DataError([f"data path {path} is a directory; give a .jsonl, .json or .csv file"])
    if not path.is_file():  # a device or a pipe: reading may never end
        raise DataError([f"data path {path} is not a regular file; give a .jsonl, .json or .csv file"])
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some editors write one) is fine
    except UnicodeDecodeError as e:
        raise DataError([f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8"]) from None
    except OSError as e:
        raise DataError([f"cannot read data file {path}: {e.strerror or e}"]) from None
    records: list[Record] = []
    problems: list[str] = []
    if suffix in (".jsonl", ".ndjson"):
        # lines end at "\n" only: JSON strings may hold U+2028 and other characters splitlines() splits at
        for i, raw in enumerate(text.split("\n"), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                problems.append(f"line {i}: not valid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {i}: expected a JSON object {{...}}, got {type(obj).__name__}")
                continue
            records.append(Record(i, obj))
    elif suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError([f"line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})"]) from None
        if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]}
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError([f"{path}: expected a list of records (or an object holding one list)"])
            obj = lists[0]
        if not isinstance(obj, list):
            raise DataError([f"{path}: expected a list of records"])
        for i, r in enumerate(obj, 1):
            if isinstance(r, dict):
                records.append(Record(i, r))
            else:
                problems.append(f"record {i}: expected a JSON object, got {type(r).__name__}")
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        try:
            for r in reader:
                if None in r:
                    problems.append(f"line {reader.line_num}: more values than the header has columns")
                    continue
                if all(not (v or "").strip() for v in r.values()):
                    continue
                records.append(Record(reader.line_num, {k: v for k, v in r.items() if k}))
        except csv.Error as e:
            problems.append(f"line {reader.line_num}: {e}")
    else:
        raise DataError([f"{path}: unknown data file type {suffix or '(none)'}; use .jsonl, .json or .csv"])
    if not records and not problems:
        problems.append(f"{path} holds no records")
    return records, problems


def detect_format(data: dict) -> str | None:
    keys = set(data)
    if "messages" in keys:
        return "messages"
    for fmt in ("alpaca", "prompt_completion", "qa"):
        if set(REQUIRED[fmt]) <= keys:
            return fmt
    if "text" in keys:
        return "text"
    if "instruction" in keys:  # an alpaca record missing its output: say so, not "unknown"
        return "alpaca"
    if "prompt" in keys:
        return "prompt_completion"
    if "question" in keys:
        return "qa"
    return None


def check_record(rec: Record, fmt: str) -> list[str]:
    where = f"line {rec.line}"
    out = []
    for key in REQUIRED[fmt]:
        v = rec.data.get(key)
        if key not in rec.data or v is None:
            out.append(f"{where}: missing {key!r} ({FORMAT_WORDS[fmt]})")
        elif fmt == "messages":
            out += _check_messages(v, where)
        elif not isinstance(v, str):
            out.append(f"{where}: {key!r} must be text, got {type(v).__name__}")
        elif key in ("output", "completion", "answer", "text") and not v.strip():
            out.append(f"{where}: {key!r} is empty (nothing to train on)")
    if fmt == "alpaca" and rec.data.get("input") is not None and not isinstance(rec.data.get("input"), str):
        out.append(f"{where}: 'input' must be text, got {type(rec.data['input']).__name__}")
    return out


def _check_messages(msgs: Any, where: str) -> list[str]:
    if not isinstance(msgs, list) or not msgs:
        return [f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"]
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            out.append(f"{where}: messages[{j}] needs 'role' and 'content'")
        elif m["role"] not in ROLES:
            out.append(f"{where}: messages[{j}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        elif not isinstance(m["content"], str):
            out.append(f"{where}: messages[{j}].content must be text")
    if not out and not any(m["role"] == "assistant" for m in msgs):
        out.append(f"{where}: no assistant message (nothing to train on)")
    return out


def load_and_check(path: str | Path, fmt: str = "auto") -> tuple[list[Record], str, list[str]]:
    """Read, detect the format, and check every record. Returns (valid records, format, problems)."""
    records, problems = read_records(path)
    if fmt == "auto":
        fmt = next((f for f in (detect_format(r.data) for r in records) if f), None) or ""
        if not fmt:
            keys = sorted(records[0].data) if records else []
            problems.append(f"cannot tell the record shape from the keys {keys}; use instruction/input/output, "
                            "prompt/completion, question/answer, text, or messages")
            return [], "", problems
    good = []
    for r in records:
        p = check_record(r, fmt)
        problems += p
        if not p:
            good.append(r)
    return good, fmt, problems


# --- templates -------------------------------------------------------------------------------

def resolve_template(fmt: str, template: str, tokenizer=None) -> str:
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        if fmt == "messages":
            return "chat" if has_chat else "plain"
        return {"alpaca": "alpaca", "qa": "alpaca", "prompt_completion": "plain", "text": "plain"}[fmt]
    if template == "chat" and tokenizer is not None and not has_chat:
        raise DataError(["data.template is chat but the tokenizer has no chat template; use alpaca or plain"])
    return template


def _as_messages(fmt: str, d: dict) -> list[dict]:
    if fmt == "messages":
        return d["messages"]
    prompt, response = _prompt_response(fmt, d)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _prompt_response(fmt: str, d: dict) -> tuple[str, str]:
    if fmt == "alpaca":
        inp = (d.get("input") or "").strip()
        return (d["instruction"] + ("\n\n" + inp if inp else "")), d["output"]
    if fmt == "qa":
        return d["question"], d["answer"]
    if fmt == "prompt_completion":
        return d["prompt"], d["completion"]
    raise ValueError(fmt)


def segments(rec: dict, fmt: str, template: str, tokenizer=None) -> list[tuple[str, bool]]:
    """The example as text pieces, each marked trained (response) or not (prompt)."""
    if fmt == "text":
        return [(rec["text"], True)]
    if template == "chat":
        return _chat_segments(_as_messages(fmt, rec), tokenizer)
    if fmt == "messages":  # no chat template: plain headers
        out = []
        for m in rec["messages"]:
            out.append((PLAIN_CHAT_HEADERS[m["role"]], False))
            out.append((m["content"] + "\n\n", m["role"] == "assistant"))
        if out and out[-1][1]:
            out[-1] = (out[-1][0].rstrip("\n"), True)
        return out
    if template == "alpaca":
        if fmt == "alpaca":
            inp = (rec.get("input") or "").strip()
            prompt = (ALPACA_WITH_INPUT.format(instruction=rec["instruction"], input=inp) if inp
                      else ALPACA_NO_INPUT.format(instruction=rec["instruction"]))
            return [(prompt, False), (rec["output"], True)]
        p, r = _prompt_response(fmt, rec)
        return [(ALPACA_NO_INPUT.format(instruction=p), False), (r, True)]
    p, r = _prompt_response(fmt, rec)  # plain: the prompt as written, then the response
    return [(p, False), (r, True)]


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; assistant turns are the trained segments.

    The rendering of messages[:i] with the generation prompt must be a prefix of the rendering of
    messages[:i+1]; the difference is the assistant turn. Templates that rewrite earlier turns
    (rare) fall back to training on the last assistant turn only.
    """
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            last = max(j for j, mm in enumerate(messages) if mm["role"] == "assistant")
            prefix, full = render(messages[:last], True), render(messages[: last + 1], False)
            return [(prefix, False), (full[len(prefix):], True)]
        out.append((prefix[len(done):], False))
        out.append((full[len(prefix):], True))
        done = full
    rest = render(messages, False)[len(done):]
    if rest.strip():
        out.append((rest, False))
    return [(t, trained) for t, trained in out if t]


# --- tokenizing ------------------------------------------------------------------------------

def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize(rec: Record, fmt: str, template: str, tokenizer, seq_len: int, prompt_loss_weight: float) -> Example:
    """Token ids, labels (-100 = no loss) and optional per-token weights for one record."""
    ids: list[int] = []
    w: list[float] = []
    if _adds_bos(tokenizer) and template != "chat":  # chat templates write their own BOS
        ids.append(tokenizer.bos_token_id)
        w.append(0.0)
    segs = segments(rec.data, fmt, template, tokenizer)
    for text, trained in segs:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        w += [1.0 if trained else prompt_loss_weight] * len(piece)
    # Append EOS: without it the model never sees where a response ends, so it never learns to
    # stop and keeps generating (repeating itself) until max_new_tokens.
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        w.append(1.0)
    truncated = len(ids) > seq_len
    ids, w = ids[:seq_len], w[:seq_len]
    labels = [t if wt > 0 else -100 for t, wt in zip(ids, w, strict=False)]
    partial = 0 < prompt_loss_weight < 1
    return Example(ids, labels, w if partial else None, rec.line, truncated)


def split(items: list, val_split: float, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed`` and hold out ``val_split`` of the items (at least one when > 0)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if val_split > 0 and len(items) >= 2:
        n_val = min(len(items) - 1, max(1, round(len(items) * val_split)))
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in order[n_val:]]
    return train, val


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples into sequences of at most ``seq_len`` tokens (first fit, in order).

    The first token of every example after the first gets label -100, so no loss is taken for
    predicting one example's start from the previous one's end. With sdpa/eager attention the
    tokens of a packed example can still attend to the earlier examples in the same sequence (as
    TRL's packing does without flash-attention's varlen kernels); docs/runner.md says so.
    """
    out: list[Example] = []
    cur: Example | None = None
    for ex in examples:
        if cur is not None and len(cur.input_ids) + len(ex.input_ids) <= seq_len:
            labels = list(ex.labels)
            labels[0] = -100
            weights = None
            if cur.weights is not None and ex.weights is not None:
                weights = cur.weights + [0.0] + ex.weights[1:]
            cur = Example(cur.input_ids + ex.input_ids, cur.labels + labels, weights, cur.line)
        else:
            if cur is not None:
                out.append(cur)
            cur = Example(list(ex.input_ids), list(ex.labels), list(ex.weights) if ex.weights else None, ex.line)
    if cur is not None:
        out.append(cur)
    return out


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)
    return {"count": len(s), "min": s[0], "mean": round(statistics.fmean(s), 1), "median": statistics.median(s),
            "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}


def _records(spec, data_path: str | None) -> tuple[list, str]:
    """The data file's records (at most data.max_examples) and its format; DataError lists every problem."""
    path = data_path or spec.path
    if not path:
        raise DataError(["data.path is not set; give a .jsonl/.json/.csv file (override: data.path=FILE)"])
    records, fmt, problems = load_and_check(path, spec.format)
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise DataError(problems[:MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else []))
    if spec.max_examples:
        records = records[: spec.max_examples]
    return records, fmt


def _trainable(examples: list, seq_len: int, trained) -> tuple[list, list[str]]:
    """The examples with a token to train on (``trained(e)`` > 0), and the warnings about the rest and about
    truncation; none left is a DataError. The runner's data and the estimate's lengths say the same."""
    warnings = []
    empty = [e for e in examples if trained(e) == 0]
    if empty:
        lines = ", ".join(str(e.line) for e in empty[:8])
        warnings.append(f"{len(empty)} examples lost every response token to truncation at seq_len {seq_len} and "
                        f"are skipped (lines {lines}{', ...' if len(empty) > 8 else ''}); raise training.seq_len")
    truncated = sum(e.truncated for e in examples)
    if truncated and truncated > len(empty):
        warnings.append(f"{truncated} of {len(examples)} examples are longer than seq_len {seq_len} and were cut")
    kept = [e for e in examples if trained(e) > 0]
    if not kept:
        raise DataError(["no example has a token to train on (see the warnings above)"] + warnings)
    return kept, warnings


def prepare(spec, tokenizer, seq_len: int, seed: int, data_path: str | None = None) -> Prepared:
    """DataSpec -> tokenized, split (and optionally packed) examples; DataError lists every problem."""
    records, fmt = _records(spec, data_path)
    template = resolve_template(fmt, spec.template, tokenizer)
    examples = [tokenize(r, fmt, template, tokenizer, seq_len, spec.prompt_loss_weight) for r in records]
    truncated = sum(e.truncated for e in examples)
    examples, warnings = _trainable(examples, seq_len, lambda e: e.trained_tokens)
    train, val = split(examples, spec.val_split, seed)
    stats = {"records": len(records), "train": len(train), "val": len(val), "truncated": truncated,
             "tokens": length_stats([len(e.input_ids) for e in examples]),
             "trained_tokens": sum(e.trained_tokens for e in examples)}
    if spec.packing:
        train = pack(train, seq_len)
        val = pack(val, seq_len)
        stats["packed_sequences"] = len(train)
    return Prepared(train, val, fmt, template, len(records), stats, warnings)


def collate(examples: list[Example], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding), loss_weights if any."""
    import torch

    n = pad_to or max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    weighted = any(e.weights is not None for e in examples)
    weights = torch.zeros((len(examples), n), dtype=torch.float32) if weighted else None
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e.labels)
        if weights is not None:
            ws = e.weights if e.weights is not None else [1.0 if x != -100 else 0.0 for x in e.labels]
            weights[i, :k] = torch.tensor(ws)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if weights is not None:
        batch["loss_weights"] = weights
    return batch


# --- lengths only: what prepare() would produce, without keeping the tokens (the estimate from the data) ----

BYTES_PER_TOKEN = 4.0  # without a tokenizer: UTF-8 bytes per token of English text with a 32k-256k BPE vocabulary
TOKENIZE_CHUNK = 4096  # records tokenized per batched tokenizer call


@dataclass
class Measured:
    """What :func:`prepare` would produce, as lengths: ``train`` holds the training sequences' lengths in
    the runner's order (after the split and, with data.packing, the packing), ``lines`` the record line of
    each (a pack's first example). ``exact`` is False for the approximation without a tokenizer."""

    train: list[int]
    lines: list[int]
    val: list[int]
    examples: int  # training examples before packing
    trained_tokens: int  # tokens with a loss, every example (train and validation), as prepare's stats count
    records: int
    truncated: int
    skipped: int  # examples that lost every trained token to truncation (prepare drops them)
    format: str
    template: str
    source: str  # what counted the tokens
    exact: bool
    warnings: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # every kept example (train and validation), file order


@dataclass
class _Len:
    """An example reduced to what the batching needs (split() and pack_lengths() take these)."""

    n: int
    trained: int
    line: int
    truncated: bool


def _example_len(pieces: list[tuple[int, bool, int | None]], bos: int | None, eos: int | None, seq_len: int,
                 prompt_loss_weight: float, line: int) -> _Len:
    """tokenize()'s length and trained-token count from the pieces' (length, trained, last id)."""
    weights: list[tuple[int, float]] = []  # runs of (count, weight)
    n, last = 0, None
    if bos is not None:
        weights.append((1, 0.0))
        n, last = 1, bos
    for k, trained, tail in pieces:
        if k:
            weights.append((k, 1.0 if trained else prompt_loss_weight))
            n += k
            last = tail
    if eos is not None and (n == 0 or last != eos):
        weights.append((1, 1.0))
        n += 1
    budget, kept = seq_len, 0
    for k, w in weights:
        take = min(k, budget)
        if w > 0:
            kept += take
        budget -= take
        if budget <= 0:
            break
    return _Len(min(n, seq_len), kept, line, n > seq_len)


def token_lengths(records: list[Record], fmt: str, template: str, tokenizer, seq_len: int,
                  prompt_loss_weight: float, progress=None) -> list[_Len]:
    """:func:`tokenize`'s lengths for every record, with one batched tokenizer call per chunk of records
    (a fast tokenizer encodes a batch in parallel, the same ids as one text at a time)."""
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) and template != "chat" else None
    eos = tokenizer.eos_token_id
    out: list[_Len] = []
    for start in range(0, len(records), TOKENIZE_CHUNK):
        chunk = records[start:start + TOKENIZE_CHUNK]
        segs = [segments(r.data, fmt, template, tokenizer) for r in chunk]
        texts = [t for s in segs for t, _ in s]
        ids = _encode_batch(tokenizer, texts) if texts else []
        i = 0
        for r, s in zip(chunk, segs, strict=True):
            pieces = []
            for _, trained in s:
                piece = ids[i]
                i += 1
                pieces.append((len(piece), trained, piece[-1] if piece else None))
            out.append(_example_len(pieces, bos, eos, seq_len, prompt_loss_weight, r.line))
        if progress:
            progress(len(out) / max(len(records), 1), f"{len(out):,} of {len(records):,} records")
    return out


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``; for a fast tokenizer straight from its
    Rust backend (what that call runs, without building the BatchEncoding: a fifth faster)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def approximate_lengths(records: list[Record], fmt: str, template: str, seq_len: int, prompt_loss_weight: float,
                        bytes_per_token: float = BYTES_PER_TOKEN, progress=None) -> list[_Len]:
    """Without a tokenizer: each piece's UTF-8 bytes / ``bytes_per_token`` tokens (rounded up), one BOS and
    one EOS, as a Llama-style tokenizer adds them."""
    out: list[_Len] = []
    for j, r in enumerate(records, 1):
        pieces = [(math.ceil(len(t.encode()) / bytes_per_token), trained, None)
                  for t, trained in segments(r.data, fmt, template, None)]
        out.append(_example_len(pieces, 1, 2, seq_len, prompt_loss_weight, r.line))
        if progress and (j % TOKENIZE_CHUNK == 0 or j == len(records)):
            progress(j / len(records), f"{j:,} of {len(records):,} records")
    return out


def pack_lengths(lengths: list[int], lines: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """:func:`pack` on lengths: (lengths of the packed sequences, the line of each one's first example)."""
    out: list[int] = []
    first: list[int] = []
    cur = None
    for n, line in zip(lengths, lines, strict=True):
        if cur is not None and cur + n <= seq_len:
            cur += n
        else:
            if cur is not None:
                out.append(cur)
            cur = n
            first.append(line)
    if cur is not None:
        out.append(cur)
    return out, first


def measure(spec, tokenizer, seq_len: int, seed: int, data_path: str | None = None, progress=None,
            source: str = "the model's tokenizer") -> Measured:
    """:func:`prepare`'s result as lengths, fast: the same checks and DataErrors, the same split and packing,
    the same truncation at ``seq_len``. ``tokenizer`` None: the approximation of :func:`approximate_lengths`
    (``source`` then says so)."""
    records, fmt = _records(spec, data_path)
    template = resolve_template(fmt, spec.template, tokenizer)
    if tokenizer is None:
        examples = approximate_lengths(records, fmt, template, seq_len, spec.prompt_loss_weight, progress=progress)
    else:
        examples = token_lengths(records, fmt, template, tokenizer, seq_len, spec.prompt_loss_weight, progress)
    truncated = sum(e.truncated for e in examples)
    kept, warnings = _trainable(examples, seq_len, lambda e: e.trained)
    train, val = split(kept, spec.val_split, seed)
    lengths, lines = [e.n for e in train], [e.line for e in train]
    val_lengths = [e.n for e in val]
    n_train = len(train)
    if spec.packing:
        lengths, lines = pack_lengths(lengths, lines, seq_len)
        val_lengths, _ = pack_lengths(val_lengths, [e.line for e in val], seq_len)
    return Measured(lengths, lines, val_lengths, n_train, sum(e.trained for e in kept), len(records), truncated,
                    len(examples) - len(kept), fmt, template, source, tokenizer is not None, warnings,
                    [e.n for e in kept])
