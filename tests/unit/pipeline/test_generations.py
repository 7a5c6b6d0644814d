"""Generations: prompts from evaluate.prompts (chat runs through the training chat template), greedy and
seeded sampling, the base model's continuation beside the fine-tuned one, the samples as an MLflow
table file, and the model card's metrics. The evaluate stage runs in-process on a tokenized run whose
"consolidated model" is the tiny model with its weights moved (no training needed)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import evaluate, preflight, shard, tokenize
from pipeline.config import validate_config
from pipeline.distributed import DistEnv
from pipeline.errors import UserError
from pipeline.model_card import METRICS_START, NOT_EVALUATED, card_text
from pipeline.prompts import Prompt, PromptEntry, encoded, read_prompts
from pipeline.tokenizer import load_tokenizer
from tests import fixtures
from tests.stage_runs import run_stage, stage_context

TEMPLATE = ("{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
EVALUATE = {"batch_size": 2, "num_generations": 3, "max_new_tokens": 6, "max_rows": 4}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama):
    """Shard and tokenize here; the model folder is the tiny model with noise added (so that base and
    fine-tuned continue differently), with a model card as consolidate writes it."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("gens")
    data = fixtures.write_jsonl(tmp / "text.jsonl", [{"text": s} for s in fixtures.sentences(40)])
    (tmp / "prompts.txt").write_text("the cat sat\n\na dog ran far\n")
    fixtures.write_jsonl(tmp / "prompts.jsonl", [{"prompt": "the mat", "reference": "is red"},
                                                 {"prompt": "one bird"}])
    raw = fixtures.causal_config(tmp, tiny_llama, data, evaluate=EVALUATE)
    cfg = validate_config(raw)
    ctx = stage_context(cfg)
    run_stage(shard, cfg, ctx)
    run_stage(tokenize, cfg, ctx)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(ctx.run_dir.model_dir)
    load_tokenizer(tiny_llama).save_pretrained(ctx.run_dir.model_dir)
    return tmp, raw, ctx


def _evaluate(lm_run, **section):
    tmp, raw, ctx = lm_run
    card = card_text(validate_config(raw), ctx.run_dir, False, ctx.run_dir.model_dir)
    (ctx.run_dir.model_dir / "README.md").write_text(card)
    cfg = validate_config(fixtures.merge(raw, {"evaluate": section}))
    metrics = evaluate.run(cfg, ctx)["metrics"]
    out = ctx.run_dir.stage("evaluate")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return samples, json.loads((out / "samples.json").read_text()), metrics


def test_prompts_file_prompts_are_the_samples(lm_run):
    tmp = lm_run[0]
    samples, table, _ = _evaluate(lm_run, prompts=str(tmp / "prompts.txt"))
    assert [s["prompt"] for s in samples] == ["the cat sat", "a dog ran far"]
    assert all(s["generated"] for s in samples) and "generated_base" not in samples[0]
    assert table == {"columns": ["prompt", "reference", "generated"],
                     "data": [[s["prompt"], s["reference"], s["generated"]] for s in samples]}
    jsonl = read_prompts(tmp / "prompts.jsonl", chat=False)
    assert jsonl == [PromptEntry("the mat", "is red"), PromptEntry("one bird")]


def test_compare_base_puts_the_base_continuation_beside_and_fills_the_card(lm_run):
    tmp, raw, ctx = lm_run
    samples, table, metrics = _evaluate(lm_run, compare_base=True)
    assert len(samples) == 3 and table["columns"][-1] == "generated_base"  # held-out prompts
    assert any(s["generated_base"] != s["generated"] for s in samples)
    card = (ctx.run_dir.model_dir / "README.md").read_text()
    assert NOT_EVALUATED not in card
    row = next(line for line in card.splitlines() if line.startswith("| perplexity |"))
    assert row == f"| perplexity | {metrics['base']['perplexity']:.4g} | {metrics['perplexity']:.4g} |"
    assert card.index("## Evaluation") < card.index(METRICS_START) < card.index(row)


def test_sampling_is_reproducible_with_the_seed_and_differs_from_greedy(lm_run):
    from transformers import AutoModelForCausalLM

    _, raw, ctx = lm_run
    model = AutoModelForCausalLM.from_pretrained(ctx.run_dir.model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(ctx.run_dir.model_dir)
    prompts = [Prompt("", ids) for ids in ([5, 9, 20], [12, 40, 7, 8])]

    def generated(seed: int, **section) -> list[str]:
        cfg = validate_config(fixtures.merge(raw, {"evaluate": {**section, "max_new_tokens": 8},
                                                   "train": {"seed": seed}}))
        return evaluate.generations(model, tokenizer, prompts, cfg, 0, DistEnv())

    sampled = generated(1, temperature=1.5, top_p=0.95)
    assert generated(1, temperature=1.5, top_p=0.95) == sampled
    assert generated(2, temperature=1.5, top_p=0.95) != sampled
    greedy = generated(1)
    assert greedy != sampled and generated(2) == greedy  # greedy: deterministic, whatever the seed


def test_chat_prompts_render_through_the_training_template(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.chat_template = TEMPLATE  # as consolidate saves it with the model
    messages = [{"role": "system", "content": "be short"}, {"role": "user", "content": "good day"}]
    prompts = encoded([PromptEntry("the cat"), PromptEntry(messages)], tokenizer, chat=True)
    for prompt, turns in zip(prompts, [[{"role": "user", "content": "the cat"}], messages]):
        assert prompt.ids == tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                           tokenize=True)["input_ids"]
        assert prompt.text.endswith("assistant\n")


def test_a_bad_prompts_file_is_refused_at_validate_naming_its_line(lm_run, tmp_path):
    _, raw, _ = lm_run
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    cfg = validate_config(fixtures.merge(raw, {"evaluate": {"prompts": str(bad)}}))
    with pytest.raises(UserError, match=rf"evaluate.prompts: {bad}:2: no \"prompt\" text"):
        preflight.check_inputs(cfg)
    classify = fixtures.merge(raw, {"model": {"task": "sequence_classification", "num_labels": 2},
                                    "data": {"format": "classification"}, "evaluate": {"prompts": str(bad)}})
    with pytest.raises(UserError, match="evaluate.prompts: only causal_lm runs generate"):
        preflight.check_inputs(validate_config(classify))
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UserError, match=r":1: \"messages\" needs data.format chat"):
        read_prompts(bad, chat=False)
    with pytest.raises(UserError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt", chat=False)
