"""Evaluation: metrics, the batches each rank scores, their exact reduction, max_rows, precision, and
batched generation with left padding."""

import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import evaluate
from pipeline.config import validate_config
from pipeline.digests import DigestCache
from pipeline.distributed import DistEnv, all_reduce_sum_array
from pipeline.eval_metrics import (
    capped,
    confusion_counts,
    language_model_metrics,
    language_model_sums,
    rank_batches,
    summarize_confusion,
    summarize_predictions,
)
from pipeline.stages import STAGES
from tests import fixtures

PAD = 3


def test_classification_metrics_match_hand_counts():
    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    metrics = summarize_predictions(truth, predicted, 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3)


def _rows(count: int, vocab: int, labels: int | None = None, seed: int = 0) -> pa.Table:
    """Tokenized rows of varied lengths, as tokenize writes them (num_targets: next-token targets)."""
    rng = random.Random(seed)
    ids = [[rng.randrange(4, vocab) for _ in range(rng.randint(3, 12))] for _ in range(count)]
    columns = {"input_ids": ids, "num_targets": [len(i) - 1 for i in ids]}
    if labels:
        columns["label"] = [rng.randrange(labels) for _ in ids]
    return pa.table(columns)


def _ranks(world_size: int) -> list[DistEnv]:
    return [DistEnv(rank, world_size) for rank in range(world_size)]


def test_every_batch_of_one_process_is_scored_by_exactly_one_rank_in_lockstep():
    table = _rows(11, 50)  # 4 batches of 3
    def share(dist: DistEnv) -> list[list[list[int]]]:
        return [rows.column("input_ids").to_pylist() for rows, _ in rank_batches(table, 3, PAD, dist)
                if rows is not None]

    def forwards(dist: DistEnv) -> int:
        return len(list(rank_batches(table, 3, PAD, dist)))

    alone = share(DistEnv())
    for world_size in (2, 3, 5):
        shares = [share(d) for d in _ranks(world_size)]
        assert sorted(b for share in shares for b in share) == sorted(alone)
        assert shares[1] == alone[1::world_size]  # strided: the batches themselves, not only their rows
        # a sharded model needs every rank in every forward: as many on each rank, fillers uncounted
        assert {forwards(d) for d in _ranks(world_size)} == {-(-4 // world_size)}


def test_max_rows_is_the_first_rows_for_any_world_size():
    table = _rows(11, 50)
    assert capped(table, None) is table
    assert capped(table, 4).to_pylist() == table.slice(0, 4).to_pylist()
    assert capped(table, 400).num_rows == 11


def test_the_reduction_keeps_exact_dtypes_and_refuses_lossy_ones():
    counts = np.array([[3, 1], [0, 2**40]], dtype=np.int64)
    reduced = all_reduce_sum_array(counts)  # no process group: this process's own sums, a copy
    assert reduced.dtype == np.int64 and (reduced == counts).all() and reduced is not counts
    with pytest.raises(AssertionError, match="float64 or int64"):
        all_reduce_sum_array(np.zeros(2, dtype=np.float32))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bert_classifier(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3).eval()


def test_two_ranks_sums_add_up_to_the_one_process_metrics(llama, bert_classifier):
    """The ranks' shares summed as all_reduce sums them give one process's numbers."""
    text, labelled = _rows(13, 250), _rows(13, 150, labels=3)
    with torch.inference_mode():
        alone = language_model_sums(llama, text, 4, PAD, DistEnv())
        split = sum(language_model_sums(llama, text, 4, PAD, d) for d in _ranks(2))
        confusion = confusion_counts(bert_classifier, labelled, 4, 0, 3, DistEnv())
        confusions = [confusion_counts(bert_classifier, labelled, 4, 0, 3, d) for d in _ranks(2)]
    assert split[1] == alone[1] == sum(text.column("num_targets").to_pylist())
    loss = language_model_metrics(alone)["loss"]
    assert language_model_metrics(split)["loss"] == pytest.approx(loss, rel=1e-12)
    assert all(c.any() for c in confusions) and (sum(confusions) == confusion).all()
    assert summarize_confusion(sum(confusions)) == summarize_confusion(confusion)


def test_later_keys_at_their_defaults_leave_the_evaluate_fingerprint_as_it_was(tmp_path):
    """Evaluations finished before evaluate.max_rows, prompts, temperature and top_p existed stay up to
    date; setting one redoes them, and so does a change in the prompts file."""
    cfg = validate_config(fixtures.causal_config(tmp_path, tmp_path, tmp_path / "x.jsonl"))
    covered = STAGES["evaluate"].config_inputs(cfg, DigestCache(tmp_path / "digests.json"))
    assert covered == {"evaluate": {"batch_size": 8, "compare_base": False, "num_generations": 2,
                                    "max_new_tokens": 5}, "train": {"seed": 0}}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n")
    set_keys = {"max_rows": 5, "temperature": 0.7, "top_p": 0.9, "prompts": str(prompts)}
    for key, value in set_keys.items():
        setattr(cfg.evaluate, key, value)
    inputs = STAGES["evaluate"].config_inputs(cfg, DigestCache(tmp_path / "digests.json"))
    assert {k: inputs["evaluate"][k] for k in set_keys} == set_keys
    prompts.write_text("the dog\n")
    assert STAGES["evaluate"].config_inputs(cfg, DigestCache(tmp_path / "d2.json")) != inputs


def _config(tmp_path, tiny_llama, precision: str):
    return validate_config(fixtures.causal_config(tmp_path, tiny_llama, tmp_path / "x.jsonl",
                                                  train={"precision": precision}))


def test_bf16_training_evaluates_in_bf16_close_to_fp32(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    table, losses = _rows(8, 250), {}
    for precision in ("fp32", "bf16"):
        cfg = _config(tmp_path, tiny_llama, precision)
        model = evaluate.on_device(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), cfg,
                                   torch.device("cpu"))
        assert {p.dtype for p in model.parameters()} == {evaluate.eval_dtype(cfg)}
        losses[precision] = evaluate.score(model, cfg, table, PAD, DistEnv())["loss"]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)


def test_batched_generation_pads_on_the_left_and_matches_one_prompt_at_a_time(llama):
    """Prompts of different lengths in one batch: each continues its own prompt. (Right padding made
    the shorter prompts continue their padding here: other tokens.)"""
    prompts = [[5, 9, 20, 33, 41, 7, 8], [12, 40], [100, 101, 102, 50]]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        batched = evaluate.generate(llama, prompts, PAD, 6, cpu)
        alone = [evaluate.generate(llama, [p], PAD, 6, cpu)[0] for p in prompts]
    ids, mask = evaluate.left_padded(prompts, PAD)
    assert ids[1].tolist() == [PAD] * 5 + [12, 40] and mask[1].tolist() == [0] * 5 + [1, 1]
    assert batched == alone


def test_generation_prompts_take_a_packed_rows_first_example_up_to_its_answer():
    table = pa.table({"input_ids": [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]],
                      "loss_mask": [[0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 1]],
                      "seq_lens": [[4, 3], [4]]})
    assert evaluate.generation_prompts(table, 5) == [([1, 2], [3, 4]), ([8, 9, 10], [11])]
    plain = pa.table({"input_ids": [[1, 2, 3, 4, 5]]})
    assert evaluate.generation_prompts(plain, 1) == [([1, 2], [3, 4, 5])]
