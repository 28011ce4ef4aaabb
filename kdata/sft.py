"""The torch side of SFT validation: load a student, train it with trl, evaluate it.

Kept apart from `kdata.validation` so that only this module imports torch, transformers and trl
(the ``sft`` extra).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kdata.errors import KdataError

if TYPE_CHECKING:
    from kdata.validation import Pair, ValidationConfig

EVAL_BATCH = 16
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The attention a student trains with under packing (`packed_attention`); "sdpa" is transformers'
# own, which attends through a mask over the whole flattened batch.
PACKED_ATTENTION = "kdata_packed_sdpa"


def packed_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of a padding-free packed batch, with no mask.

    trl's padding-free packing flattens the whole batch into one row, ``(1, heads, total, dim)``,
    and marks where each example starts (``cu_seq_lens_q``). Without flash-attention's
    variable-length kernels, transformers' SDPA path then attends through a ``total × total``
    block-diagonal mask: nearly all of that work is masked out (16 rows of 2,048 tokens make a
    32,768² mask), and a mask keeps SDPA off its flash kernel. Here the row is cut into a
    right-padded batch ``(examples, heads, longest, dim)``, attended with ``is_causal`` (flash
    kernels on a GPU; each real token sees only real tokens before it, so the padding after it
    is never seen), and the outputs are put back in place.
    """
    starts = kwargs["cu_seq_lens_q"]
    total, longest = query.shape[2], int(kwargs["max_length_q"])
    lengths = starts.diff()
    seq = torch.repeat_interleave(
        torch.arange(len(lengths), device=query.device), lengths, output_size=total
    )
    slot = seq * longest + torch.arange(total, device=query.device) - starts[seq]

    def padded(x: torch.Tensor) -> torch.Tensor:  # (1, h, total, d) -> (examples, h, longest, d)
        out = x.new_zeros(len(lengths) * longest, x.shape[1], x.shape[3])
        out[slot] = x[0].transpose(0, 1)
        return out.view(len(lengths), longest, x.shape[1], x.shape[3]).transpose(1, 2)

    out, _ = sdpa_attention_forward(
        module,
        padded(query),
        padded(key),
        padded(value),
        None,
        dropout=dropout,
        scaling=scaling,
        is_causal=True,
    )  # (examples, longest, h, d)
    return out.reshape(-1, out.shape[2], out.shape[3])[slot].unsqueeze(0), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def load_student(spec: str, seed: int) -> tuple[Any, Any]:
    """(model, tokenizer) for a student spec.

    - ``tiny``: a 2-layer Llama with random weights (seeded) and SmolLM2's tokenizer, for CPU tests;
    - ``local/smollm2-135m-instruct`` or a ``.gguf`` path: loaded into transformers with
      ``gguf_file=`` (de-quantised to float32);
    - anything else: a folder or Hub id for ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdata.validation import TINY

    if spec == TINY or spec.startswith("local/") or spec.endswith(".gguf"):
        from kdata.teachers.local import EMBEDDED, model_path

        gguf = model_path(EMBEDDED if spec == TINY else spec)
        kw = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        if spec == TINY:
            torch.manual_seed(seed)
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            model = LlamaForCausalLM(config)
        else:
            # Loading de-quantises to float32 but leaves the model marked as quantized, which
            # the Trainer refuses to fine-tune: rebuild it plainly from its config and weights.
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
            config = loaded.config
            del config.quantization_config
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(loaded.state_dict())
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec)
        except OSError as e:
            raise KdataError(f"cannot load student '{spec}': {e}") from None
    if tokenizer.chat_template is None:
        raise KdataError(f"student '{spec}' has no chat template; SFT needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def parameter_count(model) -> int:
    """Distinct trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def device_name() -> str:
    """What trains: the GPU's name, or the CPU with its thread count."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def _peak_flops() -> float | None:
    from kdata.validation import PEAK_BF16

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _trainer_args(config: ValidationConfig, output_dir: str, max_steps: int, lr: float) -> dict:
    """The arguments SFT and DPO share: seed, batch, schedule, precision, logging."""
    cuda = torch.cuda.is_available()
    return {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, max_steps // 20),
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": config.seed,
        "data_seed": config.seed,
        "max_length": config.max_length,
        "bf16": cuda,
        "use_cpu": not cuda,
        "dataloader_num_workers": 0,
        "disable_tqdm": not os.isatty(2),
    }


def _timed_train(trainer) -> tuple[Any, float]:
    """Run ``trainer.train()``; its result and the wall seconds it took."""
    t0 = time.perf_counter()
    # cuDNN's attention rebuilds its execution plan for every new shape, costing ~9 ms of CPU
    # per call when batch shapes vary (profiled on an H100); the other kernels do not.
    with sdpa_kernel(_SDPA_BACKENDS):
        result = trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def train(model, tokenizer, pairs: list[Pair], config: ValidationConfig) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``pairs`` with trl's SFTTrainer (bf16 on a GPU).

    Returns the training log (step, loss), training tokens, seconds, tokens/s and model FLOPs
    utilisation (on a GPU whose peak is known).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list(
        [
            {
                "prompt": p.chat(),
                "completion": [{"role": "assistant", "content": p.response}],
            }
            for p in pairs
        ]
    )
    with tempfile.TemporaryDirectory(prefix="kdata-sft-") as tmp:
        args = SFTConfig(
            **_trainer_args(config, tmp, config.max_steps, config.learning_rate),
            packing=config.packing,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        attention = model.config._attn_implementation
        if config.packing:
            model.set_attn_implementation(PACKED_ATTENTION)
        try:
            result, seconds = _timed_train(trainer)
        finally:
            model.set_attn_implementation(attention)
    logs = trainer.state.log_history
    tokens = int(next((e["num_tokens"] for e in reversed(logs) if "num_tokens" in e), 0))
    tps = tokens / seconds if seconds else math.nan
    peak = _peak_flops()
    c = model.config
    seq = _mean_sequence_length(trainer.train_dataset)
    # Training FLOPs per token: 6N for the weights plus 12·layers·hidden·seq for attention, seq
    # being the length of the examples (packing keeps attention within each example).
    flops_per_token = 6 * parameter_count(model) + 12 * c.num_hidden_layers * c.hidden_size * seq
    model.eval()
    return {
        "log": [{"step": e["step"], "loss": e["loss"]} for e in logs if "loss" in e],
        "train_loss": result.training_loss,
        "train_tokens": tokens,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tps, 1),
        "mfu": round(tps * flops_per_token / peak, 4) if peak else None,
    }


def train_dpo(model, tokenizer, pairs: list[dict], config: ValidationConfig) -> dict[str, Any]:
    """Train ``model`` in place with trl's DPOTrainer on preference ``pairs`` (``prompt``,
    ``chosen``, ``rejected`` as messages), against a frozen copy of itself as the reference.

    Returns the training log (step, loss, reward accuracy and margin) and the wall seconds.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dpo = config.dpo
    data = Dataset.from_list(pairs)
    reference = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory(prefix="kdata-dpo-") as tmp:
        args = DPOConfig(
            **_trainer_args(config, tmp, dpo.max_steps, dpo.learning_rate), beta=dpo.beta
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )
        result, seconds = _timed_train(trainer)
    model.eval()
    log = [
        {
            "step": e["step"],
            "loss": e["loss"],
            "reward_accuracy": e.get("rewards/accuracies"),
            "reward_margin": e.get("rewards/margins"),
        }
        for e in trainer.state.log_history
        if "loss" in e
    ]
    return {"log": log, "train_loss": result.training_loss, "train_seconds": round(seconds, 3)}


def _mean_sequence_length(dataset) -> float:
    if "seq_lengths" in dataset.column_names:  # packed: the examples each packed row holds
        lengths = [n for row in dataset["seq_lengths"] for n in row]
    else:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    return sum(lengths) / max(1, len(lengths))


def train_and_evaluate(
    model, tokenizer, pairs: list[Pair], eval_items: list[Pair], config: ValidationConfig
) -> dict[str, Any]:
    """`train`, then `evaluate`."""
    return train(model, tokenizer, pairs, config) | evaluate(model, tokenizer, eval_items, config)


def dpo_and_evaluate(
    model, tokenizer, pairs: list[dict], eval_items: list[Pair], config: ValidationConfig
) -> dict[str, Any]:
    """`train_dpo`, then `evaluate`."""
    return train_dpo(model, tokenizer, pairs, config) | evaluate(
        model, tokenizer, eval_items, config
    )


def evaluate(model, tokenizer, eval_items: list[Pair], config: ValidationConfig) -> dict:
    """The per-item reference losses and the greedy answers on ``eval_items``."""
    return {
        "eval_losses": reference_losses(model, tokenizer, eval_items),
        "answers": generate(model, tokenizer, [it.chat() for it in eval_items], config),
    }


def _chat(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def reference_losses(model, tokenizer, items: list[Pair]) -> list[float]:
    """Per item, the mean negative log-likelihood of the reference answer's tokens."""
    device = next(model.parameters()).device
    out = []
    for item in items:
        answer = {"role": "assistant", "content": item.response}
        full = tokenizer.apply_chat_template([*item.chat(), answer], tokenize=False)
        n_prompt = len(tokenizer(_chat(tokenizer, item.chat()), add_special_tokens=False).input_ids)
        ids = tokenizer(full, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=labels).loss
        out.append(float(loss))
    return out


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[list[dict[str, str]]], config: ValidationConfig
) -> list[str]:
    """Greedy answers, in batches, left-padded."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    answers = []
    for i in range(0, len(prompts), EVAL_BATCH):
        texts = [_chat(tokenizer, p) for p in prompts[i : i + EVAL_BATCH]]
        batch = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ids = model.generate(
                **batch,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = ids[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return [a.strip() for a in answers]
