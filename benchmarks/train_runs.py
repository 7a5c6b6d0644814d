"""The three trainers of benchmarks/train.py, each run in a child process of its own.

Every run returns the same record: per optimizer step the real (non-pad) tokens it trained, the
attention work of its examples (sum of n(n+1) over examples of n tokens: causal, per example) and
its seconds; the losses; the trainable parameters.

ftpipe: `ftpipe run` on a generated config (shard and tokenize first, untimed; then train alone). The
rows of each step come from the loop's sample ledger (train/ledger/rank-0.jsonl), their tokens from
the tokenized split, and each step's seconds from the loop's own clock: metrics.jsonl holds the
cumulative tokens/s after each step, so cumulative seconds = cumulative tokens / that rate.
TRL SFTTrainer (packing) and the HF Trainer (every row padded to max_length): a forward pre-hook
counts the tokens of each batch the model is given, a callback times the steps end to end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

LR = 2.0e-5
SEED = 0


def ftpipe_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Full fine-tune, one process, packing, grad_accum 1, no held-out split, no checkpoint before the end."""
    train = {"strategy": "single", "max_steps": spec["steps"], "micro_batch_size": spec["micro_batch"],
             "grad_accum": 1, "lr": LR, "warmup_ratio": 0.0, "weight_decay": 0.0, "seed": SEED,
             "precision": spec["precision"], "checkpoint_every": 10**6, "keep_last": 1, "log_every": 1,
             "sample_ledger": True}
    if spec["precision"] == "bf16":
        train["allow_slow_bf16"] = True  # the same precision as the others, even where it is slow
    data = {"train": [spec["data"]], "format": "text", "text_field": "text", "eval_fraction": 0.0,
            "num_shards": 1, "max_seq_len": spec["max_len"], "packing": True}
    return {"name": "ftpipe", "output_dir": spec["work"], "data": data, "train": train,
            "model": {"name_or_path": spec["model"], "task": "causal_lm"}, "tracking": {"enabled": False}}


def ftpipe_cli(config: Path, stages: str) -> None:
    from launch.cli import main

    code = main(["run", str(config), "--stages", stages, "--no-progress"])
    if code:
        raise RuntimeError(f"ftpipe run --stages {stages} exited with {code} (its error is printed above)")


def ftpipe_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the config; shard and tokenize (not part of the measurement)."""
    config = Path(spec["work"]) / "ftpipe.yaml"
    config.write_text(yaml.safe_dump(ftpipe_config(spec), sort_keys=False))
    ftpipe_cli(config, "shard,tokenize")
    return {"config": str(config)}


def ftpipe_train(spec: dict[str, Any]) -> dict[str, Any]:
    ftpipe_cli(Path(spec["work"]) / "ftpipe.yaml", "train")
    return ftpipe_record(Path(spec["work"]) / "ftpipe")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ftpipe_record(run: Path) -> dict[str, Any]:
    """Per step tokens, attention work and seconds from the train stage's own files."""
    from pipeline.tokenized import open_split

    table = open_split(run / "tokenize" / "train")
    examples = table.column("seq_lens").to_pylist()
    ledger = _jsonl(run / "train" / "ledger" / "rank-0.jsonl")
    metrics = _jsonl(run / "train" / "metrics.jsonl")
    assert [r["step"] for r in ledger] == [m["step"] for m in metrics], "ledger and metrics disagree"
    steps, tokens, seconds = [], 0, 0.0
    for record, rows in zip(metrics, ledger):
        lengths = [n for row in rows["rows"] for n in examples[row]]
        tokens += sum(lengths)
        total = tokens / record["tokens_per_second"]  # the loop's clock, summed over its steps
        steps.append({"tokens": sum(lengths), "attention": sum(n * (n + 1) for n in lengths),
                      "seconds": total - seconds})
        seconds = total
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert manifest["tokens_trained"] == tokens, (manifest["tokens_trained"], tokens)
    return {"steps": steps, "losses": [m["loss"] for m in metrics],
            "parameters": manifest["trainable_parameters"], "tokens_trained": manifest["tokens_trained"],
            "precision": manifest["precision"]}


def example_lengths(input_ids, attention_mask=None, position_ids=None) -> list[int]:
    """Token counts of the examples in a batch: one per row from the attention mask, or, for packed rows
    (position_ids restarting at 0 at every example), one per example, pad positions left out."""
    import torch

    if position_ids is None:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return [int(n) for n in mask.sum(dim=1)]
    lengths = []
    for row, positions in enumerate(position_ids):
        real = positions if attention_mask is None else positions[attention_mask[row].bool()]
        starts = (real == 0).nonzero().flatten().tolist() + [len(real)]
        lengths += [end - start for start, end in zip(starts, starts[1:])]
    return lengths


def step_meter():
    """A TrainerCallback that times every optimizer step (end to end) and keeps the logged losses; its
    `count` is a forward pre-hook adding each batch's tokens to the step under way."""
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.steps: list[dict[str, float]] = []
            self.losses: list[float] = []
            self.pending = {"tokens": 0, "attention": 0}
            self.last = time.perf_counter()

        def count(self, module, args, kwargs) -> None:
            lengths = example_lengths(kwargs["input_ids"], kwargs.get("attention_mask"),
                                      kwargs.get("position_ids"))
            self.pending["tokens"] += sum(lengths)
            self.pending["attention"] += sum(n * (n + 1) for n in lengths)

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.steps.append({**self.pending, "seconds": now - self.last})
            self.pending, self.last = {"tokens": 0, "attention": 0}, now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepMeter()


def common_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """The same training settings for both Hugging Face trainers (and those of ftpipe's config)."""
    return {"output_dir": str(Path(spec["work"]) / spec["trainer"]), "max_steps": spec["steps"],
            "per_device_train_batch_size": spec["micro_batch"], "gradient_accumulation_steps": 1,
            "learning_rate": LR, "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
            "use_cpu": True, "bf16": spec["precision"] == "bf16", "seed": SEED, "disable_tqdm": True,
            "dataloader_num_workers": 0}


def text_rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return [{"text": json.loads(line)["text"]} for line in handle if line.strip()]


def trl_trainer(spec: dict[str, Any], model, tokenizer, dataset):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**common_arguments(spec), packing=True, max_length=spec["max_len"],
                       dataset_text_field="text", pad_to_multiple_of=None)
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def padded_trainer(spec: dict[str, Any], model, tokenizer, dataset):
    """The tutorial way: tokenize with padding="max_length", labels from the language-modeling collator."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=spec["max_len"],
                                                  padding="max_length"),
                          batched=True, remove_columns=dataset.column_names)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=TrainingArguments(**common_arguments(spec)), train_dataset=encoded,
                   data_collator=collator)


def hf_train(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's SFTTrainer or the padding HF Trainer, counted and timed from the batches it trains."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    build = trl_trainer if spec["trainer"] == "trl" else padded_trainer
    trainer = build(spec, model, tokenizer, Dataset.from_list(text_rows(spec["data"])))
    meter = step_meter()
    trainer.add_callback(meter)
    hook = trainer.model.register_forward_pre_hook(meter.count, with_kwargs=True)
    trainer.train()
    hook.remove()
    parameters = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    record = {"steps": meter.steps, "losses": meter.losses, "parameters": parameters,
              "precision": "bf16" if trainer.args.bf16 else "fp32"}
    if spec["trainer"] == "padded":
        record["mean_step_tokens"] = spec["micro_batch"] * mean_row_tokens(trainer.train_dataset)
    return record


def mean_row_tokens(dataset) -> float:
    """Real tokens per row over the whole padded dataset. A padded step costs the same whatever its rows
    hold, so its tokens/s over a few steps moves with the rows they drew; this is the figure they scatter
    around."""
    masks = dataset["attention_mask"]
    return sum(sum(mask) for mask in masks) / len(masks)
