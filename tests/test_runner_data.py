"""runner.data: record shapes, line-numbered problems, templates, label masks, packing, split."""

import json

import pytest

from runner import data as D


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from runner.demo import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_problems_carry_line_numbers(tmp_path):
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "a", "output": "b"}),
        "{not json",
        json.dumps({"instruction": "c"}),
        "",
        json.dumps([1, 2]),
        json.dumps({"instruction": "d", "output": ""}),
    ])
    records, fmt, problems = D.load_and_check(f)
    assert fmt == "alpaca" and len(records) == 1
    assert problems[0].startswith("line 2: not valid JSON: ")
    assert "line 3: missing 'output' (alpaca records need instruction and output)" in problems
    assert any(p.startswith("line 5: expected a JSON object") for p in problems)
    assert "line 6: 'output' is empty (nothing to train on)" in problems


@pytest.mark.parametrize("rec,fmt", [
    ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"question": "q", "answer": "a"}, "qa"),
    ({"text": "t"}, "text"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "messages"),
])
def test_formats_are_detected(tmp_path, rec, fmt):
    f = _write(tmp_path / "d.jsonl", [json.dumps(rec)])
    records, got, problems = D.load_and_check(f)
    assert (got, len(records), problems) == (fmt, 1, [])


def test_json_and_csv_files(tmp_path):
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"data": [{"question": "q", "answer": "a"}, {"question": "q2"}]}))
    _, fmt, problems = D.load_and_check(j)
    assert fmt == "qa" and problems == ["line 2: missing 'answer' (question/answer records need question and answer)"]
    c = tmp_path / "d.csv"
    c.write_text("prompt,completion\nhello,world\nonly,\n")
    recs, fmt, problems = D.load_and_check(c)
    assert fmt == "prompt_completion" and len(recs) == 1
    assert problems == ["line 3: 'completion' is empty (nothing to train on)"]
    bad = tmp_path / "d.json"
    bad.write_text('[{"a": 1},\n{oops}]')
    with pytest.raises(D.DataError, match="line 2: not valid JSON"):
        D.load_and_check(bad)


def test_missing_file_and_unknown_shape(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_records(tmp_path / "nope.jsonl")
    f = _write(tmp_path / "d.jsonl", [json.dumps({"foo": 1})])
    _, fmt, problems = D.load_and_check(f)
    assert fmt == "" and "cannot tell the record shape" in problems[0]


def test_alpaca_mask_trains_on_response_and_eos(tok):
    rec = D.Record(1, {"instruction": "Say hi.", "input": "", "output": "Hi there."})
    ex = D.tokenize(rec, "alpaca", "alpaca", tok, 512, 0.0)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    trained = [i for i, lab in zip(ex.input_ids, ex.labels, strict=False) if lab != -100]
    assert tok.decode(trained) == "Hi there.</s>"
    assert "### Response:" in tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=False) if lab == -100])
    assert ex.weights is None


def test_prompt_loss_weight_between_zero_and_one(tok):
    rec = D.Record(1, {"instruction": "Say hi.", "output": "Hi."})
    ex = D.tokenize(rec, "alpaca", "alpaca", tok, 512, 0.25)
    assert ex.weights is not None and set(ex.weights) == {0.0, 0.25, 1.0}  # 0.0: the BOS token
    full = D.tokenize(rec, "alpaca", "alpaca", tok, 512, 1.0)
    assert sum(lab != -100 for lab in full.labels) == len(full.input_ids) - 1


def test_weighted_loss_equals_model_loss_for_a_01_mask(tok):
    import torch
    from tiny import build

    from advisor.stack import _weighted_loss

    model = build("llama")
    recs = [D.Record(i, {"instruction": f"Q{i}", "output": "A" * (i + 1)}) for i in range(3)]
    exs = [D.tokenize(r, "alpaca", "alpaca", tok, 64, 0.0) for r in recs]
    batch = D.collate(exs, tok.pad_token_id)
    with torch.no_grad():
        plain = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        w = (batch["labels"] != -100).float()
        weighted = _weighted_loss(model, {**batch, "loss_weights": w})
    assert torch.allclose(plain, weighted, atol=1e-5)


def test_chat_messages_use_the_template_and_train_on_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    assert D.resolve_template("messages", "auto", tok) == "chat"
    ex = D.tokenize(D.Record(1, {"messages": msgs}), "messages", "chat", tok, 512, 0.0)
    trained = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=False) if lab != -100])
    assert trained == "Hello.</s>Goodbye.</s>"
    assert ex.input_ids.count(tok.eos_token_id) == 2  # the template's EOS, none appended twice


def test_truncation_packing_and_split(tok):
    recs = [D.Record(i, {"text": "word " * (5 + i)}) for i in range(10)]
    exs = [D.tokenize(r, "text", "plain", tok, 8, 0.0) for r in recs]
    assert all(len(e.input_ids) <= 8 for e in exs) and exs[-1].truncated
    short = [D.tokenize(D.Record(i, {"prompt": "p", "completion": "c"}), "prompt_completion", "plain", tok, 64, 0.0)
             for i in range(6)]
    packed = D.pack(short, 64)
    assert len(packed) < len(short)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in short)
    train, val = D.split(list(range(20)), 0.1, seed=1)
    assert len(val) == 2 and sorted(train + val) == list(range(20))
    assert D.split(list(range(20)), 0.1, seed=1) == (train, val)


def test_jsonl_lines_end_at_newlines_only_and_a_bom_is_read(tmp_path):
    """A JSON string may hold U+2028 (str.splitlines splits there); an editor's byte-order mark is not data."""
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + '{"instruction": "a\u2028b", "output": "c"}\n{"text": "x\u0085y"}\n'.encode())
    records, problems = D.read_records(f)
    assert problems == [] and [r.line for r in records] == [1, 2]
    assert records[0].data["instruction"] == "a\u2028b" and records[1].data["text"] == "x\u0085y"
