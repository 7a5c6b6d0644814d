"""The model that leaves a run: its dtype (and the logit tolerance that goes with it), label names
from the run, and LoRA variants (rsLoRA, DoRA) merged exactly or saved as peft adapters."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline import consolidate
from pipeline.errors import UserError
from pipeline.model_checks import LOGIT_RTOL, stored_dtypes
from pipeline.run_dir import atomic_write_json
from tests.consolidate_runs import peft_model, reloaded_logits, save_torch, save_verify, trained_stage


def _trained_llama(tiny_llama) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    with torch.no_grad():  # weights that are not round in bf16, as training leaves them
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.parametrize("precision, dtype, stored", [("bf16", "auto", "BF16"), ("fp32", "fp16", "F16")])
def test_model_is_written_in_the_training_or_chosen_dtype(tmp_path, tiny_llama, precision, dtype, stored):
    sections = {"train": {"precision": precision}, "consolidate": {"dtype": dtype}}
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama, sections=sections)
    model = _trained_llama(tiny_llama)
    save_torch(model.state_dict(), step)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = save_verify(model, ctx.run_dir)
    manifest = consolidate.run(cfg, ctx)
    out = ctx.run_dir.model_dir
    assert stored_dtypes(out, manifest["weight_files"]) == {stored}
    assert manifest["bytes"] == 2 * model.num_parameters()  # half of fp32 (the tied head written once)
    assert json.loads((out / "config.json").read_text())["dtype"] == {"BF16": "bfloat16",
                                                                      "F16": "float16"}[stored]
    # Rounded weights move the logits a little (the bound is 10% of the largest logit here)...
    assert manifest["verify"] == "logits+weights" and manifest["verify_max_abs_weight_diff"] == 0.0
    assert 0 < manifest["verify_max_abs_diff"] < 0.02 * float(logits.abs().max()) < LOGIT_RTOL["bf16"]
    # ...and the checkpoint rounded to the dtype is exactly what was written.
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[stored]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded[name], tensor.to(torch_dtype).float()), name


def test_16_bit_tolerance_still_refuses_another_models_logits(tmp_path, tiny_llama):
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama, sections={"consolidate": {"dtype": "bf16"}})
    save_torch(_trained_llama(tiny_llama).state_dict(), step)
    save_verify(AutoModelForCausalLM.from_pretrained(tiny_llama), ctx.run_dir)  # the untrained model's
    with pytest.raises(RuntimeError, match=r"max \|logit diff\| [\d.]+ \(allowed [\d.]+ for bf16 weights\)"):
        consolidate.run(cfg, ctx)
    assert not ctx.run_dir.model_dir.exists()


def test_values_beyond_fp16_are_a_one_line_error(tmp_path, tiny_llama):
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama, sections={"consolidate": {"dtype": "fp16"}})
    state = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    state["model.norm.weight"][0] = 1e6
    save_torch(state, step)
    with pytest.raises(UserError, match="consolidate.dtype: model.norm.weight has values beyond fp16"):
        consolidate.run(cfg, ctx)


def test_label_names_come_from_the_shard_manifest(tmp_path, tiny_bert):
    cfg, ctx, step = trained_stage(tmp_path, tiny_bert, "sequence_classification",
                                   sections={"data": {"labels": None}}, num_labels=3)
    atomic_write_json(ctx.run_dir.manifest_path("shard"), {"labels": ["bird", "cat", "dog"]})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    save_torch(model.state_dict(), step)
    consolidate.run(cfg, ctx)
    config = json.loads((ctx.run_dir.model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "bird", "1": "cat", "2": "dog"}
    assert config["label2id"] == {"bird": 0, "cat": 1, "dog": 2}


def test_rslora_dora_merge_exactly_and_load_as_peft_adapters(tmp_path, tiny_llama):
    """Both options at once: a scale of alpha / r (rsLoRA ignored) or magnitudes left out (DoRA
    ignored), in the merge or in the adapter folder, moves the logits far beyond 1e-5."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    variant = {"use_rslora": True, "use_dora": True}
    model = peft_model(tiny_llama, "causal_lm", **variant)
    for merge in (True, False):
        lora = {"r": 4, "alpha": 8.0, "target_modules": "all-linear", "merge": merge, **variant}
        cfg, ctx, step = trained_stage(tmp_path / str(merge), tiny_llama, lora=lora)
        save_torch(model.state_dict(), step)
        expected = save_verify(model, ctx.run_dir)  # the adapter model's own logits, unmerged
        manifest = consolidate.run(cfg, ctx)
        assert manifest["mode"] == ("full" if merge else "adapter")
        torch.testing.assert_close(reloaded_logits(cfg, ctx), expected, atol=1e-5, rtol=0)
    written = safe_open(ctx.run_dir.model_dir / "adapter_model.safetensors", "pt").keys()
    assert set(written) == set(get_peft_model_state_dict(model))  # peft's own names, as other tools read
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded = PeftModel.from_pretrained(base, ctx.run_dir.model_dir)
    saved = torch.load(ctx.run_dir.stage("train") / "verify.pt")
    with torch.no_grad():
        logits = loaded.eval()(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_lora_options_reach_peft_in_training(tiny_llama):
    from pipeline.config import validate_config
    from pipeline.train.partial import apply_lora
    from tests import fixtures

    raw = fixtures.causal_config(tiny_llama.parent, tiny_llama, tiny_llama / "unused.jsonl")
    raw["model"]["lora"] = {"r": 4, "alpha": 8.0, "use_rslora": True, "use_dora": True}
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), validate_config(raw))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 8.0 / 2 and "default" in q_proj.lora_magnitude_vector


def test_an_inline_chat_template_goes_with_the_tokenizer_and_the_card_says_so(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    data = {"format": "chat", "chat_template": template}
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama, sections={"data": data})
    model = _trained_llama(tiny_llama)
    save_torch(model.state_dict(), step)
    save_verify(model, ctx.run_dir)
    consolidate.run(cfg, ctx)
    out = ctx.run_dir.model_dir
    assert AutoTokenizer.from_pretrained(out).chat_template == template
    card = (out / "README.md").read_text()
    assert "Chat template (`data.chat_template`, inline) saved with the tokenizer" in card
    assert template not in card
