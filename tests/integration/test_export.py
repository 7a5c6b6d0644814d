"""The model that leaves a chat run renders what it was trained on, and `ftpipe export` turns any
complete checkpoint into a verified folder, refusing what it must not write or cannot read."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.model_card import NOT_EVALUATED
from pipeline.tokenized import open_split
from tests import fixtures
from tests.helpers import assert_same_weights, ftpipe, manifest

# Turns open with the tokenizer's <s> and close with </s>: special tokens, rendered as text.
TEMPLATE = ("{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
CHATS = [[{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}],
         [{"role": "system", "content": "be short"}, {"role": "user", "content": "good day"},
          {"role": "assistant", "content": "great day"}, {"role": "user", "content": "bad night"},
          {"role": "assistant", "content": "sad moon"}]]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_llama):
    """Two training steps on chat rows with a data.chat_template file, a checkpoint at each step."""
    tmp = tmp_path_factory.mktemp("chat")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    source = fixtures.write_jsonl(tmp / "chat.jsonl", [{"messages": m} for m in CHATS])
    cfg = fixtures.causal_config(tmp, tiny_llama, source, name="chat", data={
        "format": "chat", "chat_template": str(tmp / "chat.jinja"), "eval_fraction": 0.0, "num_shards": 1,
        "max_seq_len": 160},
        train={"max_steps": 2, "checkpoint_every": 1, "micro_batch_size": 2, "grad_accum": 1})
    path = fixtures.write_config(tmp / "chat.yaml", cfg)
    assert ftpipe("run", path, "--no-progress", "--stages", "shard,tokenize,train,consolidate") == 0
    return tmp / "runs" / "chat"


def test_the_model_renders_chats_as_training_saw_them(chat_run, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(chat_run / "consolidate" / "model")
    rendered = sorted(tokenizer.apply_chat_template(m, tokenize=True)["input_ids"] for m in CHATS)
    trained = sorted(open_split(chat_run / "tokenize" / "train").column("input_ids").to_pylist())
    assert rendered == trained
    assert AutoTokenizer.from_pretrained(tiny_llama).chat_template is None  # it came from data.chat_template


def test_the_model_folder_has_a_card_of_the_run(chat_run, tiny_llama):
    """README.md: base model, training summary, data sources with their row counts, prompt format, and
    an evaluation section the evaluate stage fills in; listed with the folder's files."""
    card = (chat_run / "consolidate" / "model" / "README.md").read_text()
    assert "README.md" in manifest(chat_run, "consolidate")["files"]
    for section in ("## Training", "## Data", "## Prompt format", "## Evaluation", NOT_EVALUATED):
        assert section in card
    assert card.startswith(f'---\nbase_model: "{tiny_llama}"\nlibrary_name: transformers\n')
    assert "| steps | 2 |" in card and "| strategy | single |" in card and "| learning rate | 0.001 |" in card
    assert f"| `{chat_run.parent.parent / 'chat.jsonl'}` | 2 | 0 |" in card
    assert f"Chat template ({chat_run.parent.parent / 'chat.jinja'}) saved with the tokenizer" in card


def test_export_writes_any_complete_step_verified(chat_run, tmp_path, capsys):
    assert ftpipe("export", chat_run, "--step", "1", "--out", tmp_path / "step1") == 0
    assert ftpipe("export", chat_run, "--step", "2", "--out", tmp_path / "step2") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("verified weights+forward")  # no logits were recorded at step 1
    assert out[1].endswith("verified logits+weights")  # the final step: against train/verify.pt
    final = AutoModelForCausalLM.from_pretrained(chat_run / "consolidate" / "model").state_dict()
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "step2").state_dict(), final)
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "step1").state_dict()
    assert any(not first[k].equal(final[k]) for k in final)
    assert AutoTokenizer.from_pretrained(tmp_path / "step1").chat_template == TEMPLATE
    assert "| steps | 1 |" in (tmp_path / "step1" / "README.md").read_text()  # the card of what it holds
    assert manifest(chat_run, "consolidate")["checkpoint"] == "train/checkpoints/step-000002"


def test_export_refuses_what_it_cannot_do_and_writes_nothing(chat_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (chat_run / "consolidate").iterdir())
    cases = [(["--step", "3", "--out", tmp_path / "a"], "step-000003 does not exist; complete "
              f"checkpoints in {chat_run / 'train' / 'checkpoints'}: steps 1, 2"),
             (["--step", "1", "--out", tmp_path / "full"], "exists and is not an empty folder"),
             (["--step", "1", "--out", chat_run / "consolidate" / "mine"],
              "only the consolidate stage writes")]
    for args, message in cases:
        capsys.readouterr()
        assert ftpipe("export", chat_run, *args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (chat_run / "consolidate").iterdir()) == before
