"""SFT throughput of a student with and without packing: tokens/s and model FLOPs utilisation.

Trains the student with kdata's SFT code (trl's SFTTrainer) on GSM8K question -> worked answer
pairs, once per setting, after a short warm-up run, and prints one JSON object. Settings:
``padding`` (no packing), ``packing_masked`` (packing with transformers' SDPA attention, which
attends through a mask over the whole flattened batch: the baseline) and ``packing`` (packing
with kdata's per-example attention, `kdata.sft.packed_attention`).

    python benchmarks/sft_throughput.py --student local/smollm2-135m-instruct \\
        --data ../shared/data/gsm8k_train_6000.jsonl --steps 60

``--student`` takes what the ``validate:`` section's ``student`` takes (``tiny``, a local GGUF,
a transformers folder). MFU is only reported on a GPU whose bf16 peak kdata knows.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from kdata import sft
from kdata.validation import Pair, ValidationConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="local/smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, required=True, help="GSM8K-style jsonl")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args()

    rows = [json.loads(line) for line in a.data.open(encoding="utf-8")]
    pairs = [Pair(r["question"], r["answer"]) for r in rows]
    model, tokenizer = sft.load_student(a.student, seed=0)
    if torch.cuda.is_available():
        model = model.to("cuda")

    def settings(packing: bool, steps: int) -> ValidationConfig:
        # train() reads only the training fields; eval is required by the model, unused here.
        return ValidationConfig(
            student=a.student,
            eval={"holdout": 1},
            max_steps=steps,
            batch_size=a.batch_size,
            max_length=a.max_length,
            packing=packing,
            learning_rate=2e-5,
        )

    sft.train(copy.deepcopy(model), tokenizer, pairs, settings(False, 3))  # warm-up
    results = {}
    ours = sft.PACKED_ATTENTION
    runs = (("padding", False, ours), ("packing_masked", True, "sdpa"), ("packing", True, ours))
    for name, packing, attention in runs:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sft.PACKED_ATTENTION = attention  # the baseline: transformers' SDPA through a mask
        t0 = time.perf_counter()
        r = sft.train(copy.deepcopy(model), tokenizer, pairs, settings(packing, a.steps))
        r.pop("log")
        r["wall_seconds"] = round(time.perf_counter() - t0, 2)
        if torch.cuda.is_available():
            r["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results[name] = r
    report = {
        "student": a.student,
        "parameters": sft.parameter_count(model),
        "device": sft.device_name(),
        "versions": {"torch": torch.__version__, **_versions()},
        "steps": a.steps,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "results": results,
        "packing_speedup_tokens_per_s": round(
            results["packing"]["tokens_per_second"] / results["padding"]["tokens_per_second"], 2
        ),
        "packed_attention_speedup_tokens_per_s": round(
            results["packing"]["tokens_per_second"]
            / results["packing_masked"]["tokens_per_second"],
            2,
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import transformers
    import trl

    return {"transformers": transformers.__version__, "trl": trl.__version__}


if __name__ == "__main__":
    sys.exit(main())
