"""What of the model trains: LoRA adapters (peft), frozen parameters, activation checkpointing.

Applied to the plain Hugging Face model before any distributed wrapping, identically on every
rank, so the parameter structure (and hence sharding) is the same everywhere.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.config import RunConfig
from pipeline.errors import UserError

log = logging.getLogger("ftpipe")
LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def prepare_model(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """Apply LoRA or freezing and activation checkpointing, as configured. Trainable parameters are
    fp32 whatever the base's dtype (a bf16 frozen base under LoRA)."""
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg)
    freeze(model, cfg)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.train.compile:
        compile_blocks(model, cfg.train.strategy)
    # FSDP2 wraps each block in torch's checkpoint_wrapper before fully_shard instead (fsdp.py).
    if cfg.train.activation_checkpointing and cfg.train.strategy != "fsdp":
        checkpoint_each_block(model)
    return model


COMPILED_STRATEGIES = ("single", "ddp")
COMPILE_BACKEND = "inductor"  # tests use dynamo's "eager" backend: inductor's C++ build takes minutes here


def compile_blocks(model: torch.nn.Module, strategy: str) -> None:
    """train.compile: each transformer block's forward through torch.compile, before any wrapping.
    Only the forward: hooks stay outside the compiled code, parameter names and checkpoints unchanged.
    FSDP2 and DeepSpeed run their hooks around and (ZeRO-3) inside the blocks, which is not tested
    with compiled blocks: there it stays off, with a warning."""
    if strategy not in COMPILED_STRATEGIES:
        log.warning("warning: train.compile is not applied with strategy %s (only %s)", strategy,
                    " and ".join(COMPILED_STRATEGIES))
        return
    for block in block_modules(model):
        block.forward = torch.compile(block.forward, backend=COMPILE_BACKEND)


def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, as the model itself names them (_no_split_modules)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    assert blocks or not names, "model declares block classes but none were found"
    return blocks


def checkpoint_each_block(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in backward (torch.utils.checkpoint,
    non-reentrant) by checkpointing the block's forward. Parameter names stay as they are (checkpoints,
    DeepSpeed's saved names); transformers' own switch is not used because it acts only in train()
    mode, which the loop does not set (it trains with dropout off)."""
    blocks = block_modules(model)
    if not blocks:
        raise UserError("train.activation_checkpointing: this model declares no transformer blocks "
                        "(_no_split_modules) to checkpoint")
    for block in blocks:
        block.forward = functools.partial(_recomputed, block.forward)
    if hasattr(model, "config"):
        model.config.use_cache = False


def _recomputed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # nothing to recompute for (evaluation, verify logits)
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def head_names(model: torch.nn.Module) -> list[str]:
    """Top-level module names of the task head (what from_pretrained would newly initialise)."""
    names = [n for n in ("score", "classifier", "lm_head", "pre_classifier", "qa_outputs")
             if isinstance(getattr(model, n, None), torch.nn.Module)]
    return names or [list(dict(model.named_children()))[-1]]


def apply_lora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = cfg.model.lora
    classify = cfg.model.task == "sequence_classification"
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        task_type=TaskType.SEQ_CLS if classify else TaskType.CAUSAL_LM,
        modules_to_save=[n for n in head_names(model) if n != "lm_head"] if classify else None)
    torch.manual_seed(cfg.train.seed)  # adapter init must be identical on every rank
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        raise UserError(f"model.lora.target_modules: {str(err).splitlines()[0]}") from None


def freeze(model: torch.nn.Module, cfg: RunConfig) -> None:
    rules = cfg.train.freeze
    names = [n for n, _ in model.named_parameters()]
    frozen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in rules.patterns)}
    for index, pattern in enumerate(rules.patterns):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserError(f"train.freeze.patterns[{index}]: {pattern!r} matches no parameter name")
    if rules.head_only:
        heads = tuple(f"{h}." for h in head_names(model))
        frozen |= {n for n in names if not n.startswith(heads)}
    if rules.train_last_layers is not None:
        frozen |= _all_but_last_layers(model, names, rules.train_last_layers)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("train.freeze: every parameter is frozen; nothing would train")


def _all_but_last_layers(model: torch.nn.Module, names: list[str], keep: int) -> set[str]:
    """Everything except the last `keep` numbered layers and the head."""
    indices = {int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))}
    if not indices:
        raise UserError("train.freeze.train_last_layers: this model has no numbered layers")
    first_kept = max(indices) + 1 - keep
    heads = tuple(f"{h}." for h in head_names(model))
    return {n for n in names if not n.startswith(heads) and
            ((m := LAYER_INDEX.search(n)) is None or int(m.group(1)) < first_kept)}
