"""The student's training path: packed attention on CPU, against transformers' own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from kdata import sft  # noqa: E402
from kdata.validation import Pair, ValidationConfig  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def _loss_and_grad(model, batch: dict, attention: str) -> tuple[float, torch.Tensor]:
    model.set_attn_implementation(attention)
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss  # a cache turns transformers' packing detection off
    loss.backward()
    return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


def test_packed_attention_matches_the_masked_path() -> None:
    """On a padding-free packed batch from trl's collator, kdata's per-example attention gives
    the loss and gradients of transformers' SDPA path (which attends through a block-diagonal
    mask over the flattened batch), and not those of plain causal attention over the row."""
    model, tok = sft.load_student("tiny", seed=0)
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_60.jsonl").open()][:5]
    examples = [{"input_ids": tok(r["question"] + " " + r["answer"]).input_ids} for r in rows]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # examples of different lengths
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
        examples
    )
    assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seq_lens_q"]) == len(rows) + 1

    masked, masked_grad = _loss_and_grad(model, batch, "sdpa")
    packed, packed_grad = _loss_and_grad(model, batch, sft.PACKED_ATTENTION)
    assert packed == pytest.approx(masked, abs=1e-5)
    assert torch.allclose(packed_grad, masked_grad, atol=1e-6)
    # Attention across example boundaries (no packing information) is measurably different.
    row = {k: batch[k] for k in ("input_ids", "labels")}
    leaky, _ = _loss_and_grad(model, row, "sdpa")
    assert abs(leaky - masked) > 1e-4


def test_packed_training_runs_and_restores_the_attention() -> None:
    model, tok = sft.load_student("tiny", seed=0)
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_60.jsonl").open()][:16]
    pairs = [Pair(r["question"], r["answer"]) for r in rows]
    config = ValidationConfig(
        eval={"holdout": 1}, max_steps=2, batch_size=4, max_length=512, packing=True
    )
    out = sft.train(model, tok, pairs, config)
    assert [e["step"] for e in out["log"]] == [1, 2] and out["train_tokens"] > 0
    assert model.config._attn_implementation == "sdpa"  # generation uses the usual path again
