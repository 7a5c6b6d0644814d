"""LoRA, freezing and activation checkpointing applied to real tiny models."""

from __future__ import annotations

import pytest

from pipeline.config import validate_config
from pipeline.errors import UserError
from pipeline.models import load_model
from pipeline.train.partial import prepare_model


def _config(model, **train):
    lora = train.pop("lora", None)
    model_section = {"name_or_path": str(model), **({"lora": lora} if lora else {})}
    return validate_config({"name": "p", "model": model_section, "data": {"train": ["x"]}, "train": train})


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_patterns_freeze_exactly_the_matching_parameters(tiny_llama):
    cfg = _config(tiny_llama, freeze={"patterns": ["model.embed_tokens.*", "*.mlp.*"]})
    model = prepare_model(load_model(cfg.model), cfg)
    trainable = _trainable(model)
    assert trainable and not any("embed_tokens" in n or ".mlp." in n for n in trainable)
    assert any(".self_attn." in n for n in trainable)


def test_train_last_layers_keeps_only_the_last_blocks_and_the_head(tiny_llama):
    cfg = _config(tiny_llama, freeze={"train_last_layers": 1})
    model = prepare_model(load_model(cfg.model), cfg)
    trainable = _trainable(model)
    assert trainable and all(n.startswith("model.layers.1.") or n.startswith("model.norm") for n in trainable)


def test_head_only_trains_the_classifier(tiny_bert):
    cfg = validate_config({"name": "p", "model": {"name_or_path": str(tiny_bert),
                                                  "task": "sequence_classification", "num_labels": 2},
                           "data": {"train": ["x"], "format": "classification"},
                           "train": {"freeze": {"head_only": True}}})
    model = prepare_model(load_model(cfg.model, None), cfg)
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}


def test_a_pattern_that_matches_nothing_is_a_user_error(tiny_llama):
    cfg = _config(tiny_llama, freeze={"patterns": ["model.embedding.*"]})
    message = r"train.freeze.patterns\[0\]: 'model.embedding.\*' matches no parameter"
    with pytest.raises(UserError, match=message):
        prepare_model(load_model(cfg.model), cfg)


def test_lora_trains_only_adapters_and_starts_as_the_base_model(tiny_llama):
    import torch

    cfg = _config(tiny_llama, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    base = load_model(cfg.model)
    model = prepare_model(load_model(cfg.model), cfg)
    trainable = _trainable(model)
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


def test_lora_with_unknown_target_modules_is_a_user_error(tiny_llama):
    cfg = _config(tiny_llama, lora={"target_modules": ["not_a_module"]})
    with pytest.raises(UserError, match="model.lora.target_modules"):
        prepare_model(load_model(cfg.model), cfg)


def test_activation_checkpointing_is_switched_on_in_the_model(tiny_llama):
    # Per block, by checkpointing its forward: transformers' own switch acts only in train() mode,
    # and the loop trains the model as from_pretrained left it (eval mode, dropout off).
    cfg = _config(tiny_llama, activation_checkpointing=True)
    model = prepare_model(load_model(cfg.model), cfg)
    blocks = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert blocks and all("forward" in vars(b) for b in blocks) and model.config.use_cache is False
    plain = prepare_model(load_model(cfg.model), _config(tiny_llama))
    assert not any("forward" in vars(m) for m in plain.modules())
