"""A user's message as the tokens the run trained on, and the chat template that writes the same tokens.

A fine-tuned model answers well only when its prompt looks like its training prompts: the same
template (alpaca's ``### Instruction`` / ``### Response``, the tokenizer's chat template, or the
prompt as written), the same BOS. :func:`prompt_ids` makes the prompt with :func:`runner.data.tokenize`
itself: it builds a record of the run's format holding the message and a placeholder response, and
keeps the tokens before the response (the last trained stretch), so chat and eval prompt the model
with exactly what training showed it before a response.

:func:`chat_template_for` writes that template as Jinja for ``tokenizer_config`` / ``chat_template.jinja``,
so a server that applies the exported tokenizer's chat template (vLLM, llama.cpp's server, transformers'
``apply_chat_template``) prompts the model as it was trained; ``tests/test_after_run.py`` checks that
both give the same tokens.
"""

from __future__ import annotations

from runner.data import ALPACA_NO_INPUT, PLAIN_CHAT_HEADERS, Record, _adds_bos, tokenize

_PLACEHOLDER = "x"  # the response in the record built for a prompt; cut off again


def record_for(fmt: str, messages: list[dict]) -> dict:
    """A training record of format ``fmt`` holding the conversation and a placeholder response.
    Formats without turns (alpaca, qa, prompt_completion, text) keep only the last user message."""
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if fmt == "alpaca":
        return {"instruction": last_user, "input": "", "output": _PLACEHOLDER}
    if fmt == "qa":
        return {"question": last_user, "answer": _PLACEHOLDER}
    if fmt == "prompt_completion":
        return {"prompt": last_user, "completion": _PLACEHOLDER}
    if fmt == "messages":
        return {"messages": [*messages, {"role": "assistant", "content": _PLACEHOLDER}]}
    if fmt == "text":
        return {"text": last_user}
    raise ValueError(f"unknown data format {fmt!r}")


def prompt_ids(tokenizer, fmt: str, template: str, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the next assistant turn, as ``runner.data.tokenize`` writes it for
    training (segments tokenized one by one, BOS where the tokenizer adds one and the template is not
    chat). ``text`` data has no prompt: the message itself is continued."""
    if fmt == "text":
        ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        return ids + tokenizer(last_user(messages), add_special_tokens=False)["input_ids"]
    ex = tokenize(Record(0, record_for(fmt, messages)), fmt, template, tokenizer, 10**9, 0.0)
    labels = ex.labels
    end = len(labels)
    while end > 0 and labels[end - 1] == -100:  # untrained text after the last response (a template's tail)
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != -100:  # the last response: the placeholder (+ EOS)
        start -= 1
    return ex.input_ids[:start]


def last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _jinja_text(s: str) -> str:
    """``s`` as a Jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template_for(fmt: str | None, template: str | None, tokenizer) -> tuple[str | None, str]:
    """(Jinja chat template, words) that renders a conversation the way the run's data did; None when
    the tokenizer's own template is the one it trained with (template ``chat``) or nothing is known."""
    bos = "{{ bos_token }}" if _adds_bos(tokenizer) else ""
    if template == "chat" or fmt is None:
        return None, "the tokenizer's own chat template (the run trained with it)" if template == "chat" else \
            "the tokenizer's own chat template (the run's template is unknown)"
    if template == "alpaca":
        head, tail = ALPACA_NO_INPUT.split("{instruction}")
        return (bos + "{% for m in messages %}{% if m['role'] == 'user' %}" + "{{ " + _jinja_text(head)
                + " + m['content'] + " + _jinja_text(tail) + " }}"
                "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
                "alpaca (### Instruction / ### Response), the template the run trained with; one user "
                "message per prompt, as in training")
    if fmt == "messages":  # plain headers, no chat template in the tokenizer
        parts = []
        for role, header in PLAIN_CHAT_HEADERS.items():
            parts.append("{% if m['role'] == '" + role + "' %}{{ " + _jinja_text(header) + " }}{% endif %}")
        return (bos + "{% for m in messages %}" + "".join(parts)
                + "{% if m['role'] == 'assistant' and loop.last %}{{ m['content'] + eos_token }}"
                "{% else %}{{ m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ " + _jinja_text(PLAIN_CHAT_HEADERS["assistant"]) + " }}{% endif %}",
                "### User: / ### Assistant: headers, the template the run trained with")
    # plain: the prompt as written, then the response (prompt/completion, text)
    return (bos + "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
            "{% elif m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}",
            "the prompt as written, then the response (plain), as the run trained")
