"""How long `estimate --data` takes on a large JSONL: reading, tokenizing (runner.data.measure) and the job
(advisor.service.data_estimate), with the demo's tokenizer on a generated long-tailed alpaca file.

    python -m benchmarks.bench_data_estimate [--records 100000] [--model DIR]

Without --model the demo's tiny model directory is built in a temporary folder (its byte-level BPE has 800
tokens, so it cuts text finer, and slower, than a real model's). Prints the seconds of each part.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def write_jsonl(path: Path, records: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from his her an were which be this are or had "
             "not but model data train token batch memory").split()
    with path.open("w") as f:
        for _ in range(records):
            k = min(int(rng.paretovariate(1.3) * 8), 3000)
            f.write(json.dumps({"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(3, 20))),
                                "input": "", "output": " ".join(rng.choice(words) for _ in range(k))}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--model", help="a model directory with a tokenizer (default: the demo's tiny model)")
    a = p.parse_args(argv)
    from advisor import service
    from runner import api as runner_api

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        write_jsonl(data, a.records)
        model = a.model
        if model is None:
            from runner.demo import DEMO_DATA, build_model_dir

            model = str(build_model_dir(Path(tmp) / "model", DEMO_DATA))
        ctx = service.build({"model": {"ref": model}, "training": {"method": "lora", "micro_batch": 8,
                             "seq_len": 512}, "hardware": {"gpu": "a100-80gb"}, "data": {"path": str(data)}})
        t0 = time.perf_counter()
        tok, _ = runner_api.plan_tokenizer(ctx.plan)
        t1 = time.perf_counter()
        lengths = runner_api.data_lengths(ctx.plan)
        t2 = time.perf_counter()
        de = service.data_estimate(ctx, lengths)
        t3 = time.perf_counter()
        size = data.stat().st_size
    print(json.dumps({"records": a.records, "megabytes": round(size / 1e6, 1),
                      "tokenizer_load_s": round(t1 - t0, 2), "read_and_tokenize_s": round(t2 - t1, 2),
                      "job_and_estimate_s": round(t3 - t2, 2), "steps": de.job.steps, "tokens": de.job.tokens}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
