"""Stage 5: score the consolidated model (and optionally the base model) on the held-out split.

On the training device, in the training precision. Under torchrun every rank scores its share of the
batches and the sums are reduced exactly (pipeline.eval_metrics), and its share of the sample
generations; rank 0 writes metrics.json, samples.jsonl and the tracker's metrics.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow as pa
import torch

from pipeline import distributed, lm_eval_run
from pipeline.config import RunConfig
from pipeline.consolidate import load_consolidated
from pipeline.context import StageContext
from pipeline.distributed import DistEnv, seed_everything
from pipeline.errors import UserError
from pipeline.eval_metrics import capped, scored
from pipeline.model_card import add_metrics
from pipeline.models import load_model
from pipeline.precision import as_trained
from pipeline.prompts import Prompt, encoded, read_prompts
from pipeline.run_dir import atomic_write_json, atomic_write_text
from pipeline.tokenized import open_split
from pipeline.tokenizer import load_tokenizer

SAMPLES_TABLE = "samples.json"  # samples.jsonl as an MLflow table


def eval_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def precision(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Forward passes as training ran them: bf16 autocast, or exact fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")


def on_device(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    # bf16 weights too, not only autocast: a 7B model then needs half the accelerator memory.
    return model.to(device=device, dtype=eval_dtype(cfg)).eval()


def score(model: torch.nn.Module, cfg: RunConfig, table: pa.Table, pad_id: int,
          dist: DistEnv) -> dict[str, Any]:
    """The held-out metrics over all ranks (this process alone when there is no process group)."""
    with torch.inference_mode(), precision(cfg, dist.device):
        return scored(model, cfg.model.task, table, cfg.evaluate.batch_size, pad_id, cfg.model.num_labels,
                      dist)


def generation_prompts(table: pa.Table, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, reference) ids of the first `count` rows: the prompt is what precedes the loss mask (the
    answer is the reference), else the first half. A packed row contributes its first example."""
    part = table.slice(0, count)
    masks = part.column("loss_mask").to_pylist() if "loss_mask" in part.column_names else None
    pairs = []
    for row, ids in enumerate(part.column("input_ids").to_pylist()):
        mask = masks[row] if masks else None
        if "seq_lens" in part.column_names:
            first = part.column("seq_lens")[row].as_py()[0]
            ids, mask = ids[:first], mask[:first] if mask else None
        cut = mask.index(1) if mask and 1 in mask else 0
        cut = cut or max(1, len(ids) // 2)
        pairs.append((ids[:cut], ids[cut:]))
    return pairs


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left, so that every row's continuation starts right after its prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids, mask


def generate(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, max_new_tokens: int,
             device: torch.device, temperature: float = 0.0, top_p: float = 1.0) -> list[list[int]]:
    """Continuations of a batch of prompts, with the cache (unlike loss evaluation): greedy at
    temperature 0, else sampled from the torch generator's state (top_k off: top_p alone cuts)."""
    ids, mask = left_padded(prompts, pad_id)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature \
        else {"do_sample": False}
    output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                            max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True, **sampling)
    return output[:, ids.size(1):].tolist()


def sample_prompts(cfg: RunConfig, tokenizer: Any, table: pa.Table) -> list[Prompt]:
    """evaluate.prompts' prompts, else the first evaluate.num_generations held-out ones."""
    if cfg.evaluate.prompts:
        chat = cfg.data.format == "chat"
        return encoded(read_prompts(cfg.evaluate.prompts, chat), tokenizer, chat)
    return [Prompt(tokenizer.decode(ids, skip_special_tokens=True), ids,
                   tokenizer.decode(reference, skip_special_tokens=True))
            for ids, reference in generation_prompts(table, cfg.evaluate.num_generations)]


def generations(model: torch.nn.Module, tokenizer: Any, prompts: list[Prompt], cfg: RunConfig, pad_id: int,
                dist: DistEnv) -> list[str]:
    """The continuations of `prompts`, a batch at a time; each rank generates every world_size-th batch
    (as it scores), and every rank gets all, in order. A sampled batch is seeded by train.seed and its
    position, so its samples are the same for any world size and for the base model."""
    size, ev, mine = cfg.evaluate.batch_size, cfg.evaluate, []
    with torch.inference_mode(), precision(cfg, dist.device):
        for start in range(dist.rank * size, len(prompts), size * dist.world_size):
            chunk = prompts[start: start + size]
            torch.manual_seed(cfg.train.seed + start)
            outputs = generate(model, [p.ids for p in chunk], pad_id, ev.max_new_tokens, dist.device,
                               ev.temperature, ev.top_p)
            mine += [(start + i, tokenizer.decode(output, skip_special_tokens=True))
                     for i, output in enumerate(outputs)]
    everyone = [item for share in distributed.all_gather_object(mine) for item in share]
    return [text for _, text in sorted(everyone, key=lambda item: item[0])]


def samples_of(prompts: list[Prompt], generated: list[str], base: list[str] | None) -> list[dict[str, str]]:
    samples = [{"prompt": p.text, "reference": p.reference, "generated": text}
               for p, text in zip(prompts, generated)]
    for sample, text in zip(samples, base or []):
        sample["generated_base"] = text
    return samples


def held_out(cfg: RunConfig, ctx: StageContext) -> pa.Table:
    table = open_split(ctx.run_dir.stage("tokenize") / "eval")
    if table.num_rows == 0:
        raise UserError("data: no held-out rows to evaluate; set data.eval or data.eval_fraction > 0")
    return capped(table, cfg.evaluate.max_rows)


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    dist = distributed.init(need_group=False)  # joins torchrun's group; alone otherwise
    cfg = as_trained(cfg, ctx.run_dir)  # bf16 asked of a CPU without native bf16 trained in fp32
    harness = lm_eval_run.prepared(cfg.evaluate.lm_eval)  # None unless set; lm_eval imported only then
    table = held_out(cfg, ctx)
    pad_id = ctx.run_dir.read_manifest("tokenize")["pad_token_id"]
    model_dir = ctx.run_dir.model_dir
    model = on_device(load_consolidated(cfg, model_dir), cfg, dist.device)  # full, or base + adapter
    metrics = {**score(model, cfg, table, pad_id, dist), "eval_rows": table.num_rows}
    tokenizer, prompts, generated, base_generated = load_tokenizer(model_dir), [], [], None
    if cfg.model.task == "causal_lm" and (cfg.evaluate.num_generations or cfg.evaluate.prompts):
        prompts = sample_prompts(cfg, tokenizer, table)
        generated = generations(model, tokenizer, prompts, cfg, pad_id, dist)
    if harness:
        metrics["lm_eval"] = harness.scores(model, tokenizer)
    del model  # before the base model comes onto the device
    if cfg.evaluate.compare_base:
        # Same seed as training, so a fresh classification head starts where training started.
        seed_everything(cfg.train.seed)
        base = on_device(load_model(cfg.model, cfg.data.labels), cfg, dist.device)
        metrics["base"] = score(base, cfg, table, pad_id, dist)
        base_generated = generations(base, tokenizer, prompts, cfg, pad_id, dist) if prompts else None
        if harness:
            metrics["base"]["lm_eval"] = harness.scores(base, load_tokenizer(cfg.model.name_or_path))
    if dist.is_main:
        write_results(ctx, metrics, samples_of(prompts, generated, base_generated) if prompts else None)
    return {"metrics": metrics, "world_size": dist.world_size, "device": dist.device.type,
            "dtype": str(eval_dtype(cfg)).removeprefix("torch.")}


def write_results(ctx: StageContext, metrics: dict[str, Any], samples: list[dict[str, str]] | None) -> None:
    if samples is not None:
        write_samples(ctx, samples)
    atomic_write_json(ctx.run_dir.metrics_file, metrics)
    ctx.tracker.log_metrics(scalar_metrics(metrics))
    card = add_metrics(ctx.run_dir.model_dir, metrics)
    if card is not None:
        ctx.tracker.log_artifact(card, "model")


def write_samples(ctx: StageContext, samples: list[dict[str, str]]) -> None:
    """samples.jsonl, and the same as an MLflow table (written as mlflow.log_table writes one: pandas'
    orient="split", which the MLflow UI shows as a table)."""
    out = ctx.run_dir.stage("evaluate")
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    columns = list(samples[0]) if samples else ["prompt", "reference", "generated"]
    atomic_write_json(out / SAMPLES_TABLE, {"columns": columns,
                                            "data": [[s[c] for c in columns] for s in samples]})
    ctx.tracker.log_table(out / SAMPLES_TABLE)


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(scalar_metrics(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat
