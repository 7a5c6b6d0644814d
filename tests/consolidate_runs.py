"""A run directory whose train stage is done, with a checkpoint made in the test, for consolidate and
export tests that need no training run."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import consolidate
from pipeline.config import validate_config
from pipeline.context import StageContext
from pipeline.run_dir import RunDir, atomic_write_json
from tests import fixtures


def trained_stage(tmp_path: Path, model: Path, task: str = "causal_lm", sections: dict | None = None,
                  **model_keys) -> tuple:
    """The config, context and the empty final checkpoint folder of a run whose train stage is done."""
    source = tmp_path / "unused.jsonl"
    raw = (fixtures.causal_config(tmp_path, model, source, **(sections or {})) if task == "causal_lm"
           else fixtures.classification_config(tmp_path, model, source, **(sections or {})))
    raw["model"].update(model_keys)
    run = RunDir(tmp_path / "run")
    step = run.stage("train") / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    atomic_write_json(run.manifest_path("train"), {"final_checkpoint": "checkpoints/step-000001"})
    return validate_config(raw), StageContext(run, progress=False), step


@torch.no_grad()
def save_verify(model: torch.nn.Module, run: RunDir) -> torch.Tensor:
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    logits = model.eval()(input_ids=ids, attention_mask=mask).logits
    torch.save({"input_ids": ids, "attention_mask": mask, "logits": logits}, run.stage("train") / "verify.pt")
    return logits


def save_torch(state: dict, step: Path) -> None:
    torch.save(state, step / "model.pt")
    atomic_write_json(step / "meta.json", {"format": "torch", "world_size": 1})


def reloaded_logits(cfg, ctx: StageContext) -> torch.Tensor:
    model = consolidate.load_consolidated(cfg, ctx.run_dir.stage("consolidate") / "model").eval()
    saved = torch.load(ctx.run_dir.stage("train") / "verify.pt")
    with torch.no_grad():
        return model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits


def peft_model(tiny_llama: Path, task: str, **lora_keys):
    """The tiny Llama with LoRA adapters on every linear layer, as if trained (adapters that matter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "causal_lm":
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_llama, num_labels=2, id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1})
    peft_task = "CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS"
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=peft_task, **lora_keys)
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            param.data.normal_(0, 0.2)
        elif "lora_magnitude_vector" in name:  # DoRA: magnitudes moved away from the base row norms
            param.data.mul_(1 + 0.2 * torch.rand_like(param))
    return model
