"""data.format instruction / prompt_completion / chat / classification pairs: the tokenize stage
counts exactly the answer tokens, bad rows land in the rejects files with their reason, and
data.overlong drops, stops or truncates long examples."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline.config import validate_config
from pipeline.errors import UserError
from pipeline.formats import render_instruction
from pipeline.tokenized import open_split
from pipeline.train.data import BatchLayout, TrainBatches, collate
from tests import fixtures
from tests.helpers import ftpipe, manifest

# trim_blocks is on in transformers' Jinja environment: newlines are written as string literals.
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
EOS = "</s>"

INSTRUCTION_ROWS = [
    {"instruction": "name a red thing", "input": "", "output": "the sun at night"},
    {"instruction": "describe the cat", "input": "the cat sat on the mat", "output": "a happy cat"},
    {"instruction": "say good", "output": "good"},
]
PROMPT_ROWS = [{"prompt": "the dog ran", "completion": " fast and happy"},
               {"prompt": "red blue", "completion": " green"}]
CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "be short"}, {"role": "user", "content": "the cat"},
                  {"role": "assistant", "content": "sat on the mat"}]},
    {"messages": [{"role": "user", "content": "good day"}, {"role": "assistant", "content": "great day"},
                  {"role": "user", "content": "bad night"}, {"role": "assistant", "content": "sad moon"}]},
]


def answers(fmt: str) -> list[list[str]]:
    """What the loss must count in each example: every answer followed by the end token."""
    if fmt == "instruction":
        return [[r["output"] + EOS] for r in INSTRUCTION_ROWS]
    if fmt == "prompt_completion":
        return [[r["completion"] + EOS] for r in PROMPT_ROWS]
    return [[m["content"] + EOS for m in r["messages"] if m["role"] == "assistant"] for r in CHAT_ROWS]


def config(tmp_path: Path, model: Path, rows: list[dict], fmt: str, name: str = "fmt",
           train: dict | None = None, **data) -> Path:
    source = fixtures.write_jsonl(tmp_path / f"{name}.jsonl", rows)
    raw = fixtures.causal_config(tmp_path, model, source, train=train or {}, data={
        "format": fmt, "eval_fraction": 0.0, "max_seq_len": 160, **data})
    raw["name"] = name
    return fixtures.write_config(tmp_path / f"{name}.yaml", raw)


def tokenize(cfg_path: Path) -> int:
    return ftpipe("run", cfg_path, "--no-progress", "--stages", "shard,tokenize")


def tokenized(tmp_path: Path, name: str, split: str = "train") -> pa.Table:
    return open_split(tmp_path / "runs" / name / "tokenize" / split)


def counted_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive counted tokens."""
    runs, current = [], []
    for token, keep in zip(ids + [None], mask + [0]):
        if keep:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="module")
def llama_with_template(tiny_llama, tmp_path_factory, tokenizer) -> Path:
    """The fixture model with the chat template in the tokenizer instead of a file."""
    folder = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(tiny_llama, folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    tokenizer.chat_template = None
    return folder


@pytest.mark.parametrize("fmt", ["instruction", "prompt_completion", "chat-file", "chat-inline",
                                 "chat-tokenizer"])
def test_only_answer_tokens_are_counted(tmp_path, tiny_llama, llama_with_template, tokenizer, fmt):
    rows = {"instruction": INSTRUCTION_ROWS, "prompt_completion": PROMPT_ROWS}.get(fmt, CHAT_ROWS)
    extra, model = {}, tiny_llama
    if fmt == "chat-file":
        (tmp_path / "chat.jinja").write_text(TEMPLATE)
        extra = {"chat_template": str(tmp_path / "chat.jinja")}
    if fmt == "chat-inline":
        extra = {"chat_template": TEMPLATE}
    if fmt == "chat-tokenizer":
        model = llama_with_template
    assert tokenize(config(tmp_path, model, rows, fmt.split("-")[0], **extra)) == 0
    table = tokenized(tmp_path, "fmt")
    ids, masks = table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()
    got = sorted(counted_runs(tokenizer, i, m) for i, m in zip(ids, masks))
    assert got == sorted(answers(fmt.split("-")[0]))
    assert table.column("num_targets").to_pylist() == [sum(m) for m in masks]
    assert all(m[0] == 0 and len(m) == len(i) for i, m in zip(ids, masks))
    tok = manifest(tmp_path / "runs" / "fmt", "tokenize")
    assert tok["splits"]["train"]["targets"] == sum(sum(m) for m in masks) and tok["rejected"] == 0
    # the train batch ignores exactly the uncounted tokens, after the causal shift
    batches = TrainBatches(table, BatchLayout(len(ids), 1, 1), seed=0, pad_id=3)
    batch = batches.micro_batch(0, 0, 0)
    assert int((batch["labels"][:, 1:] != -100).sum()) == batches.global_targets(0) and "rows" in batch


def test_instruction_prompt_uses_the_documented_template(tmp_path, tiny_llama, tokenizer):
    assert tokenize(config(tmp_path, tiny_llama, INSTRUCTION_ROWS, "instruction")) == 0
    texts = sorted(tokenizer.decode(ids)
                   for ids in tokenized(tmp_path, "fmt").column("input_ids").to_pylist())
    assert render_instruction("say good") == "### Instruction:\nsay good\n\n### Response:\n"
    expected = sorted(render_instruction(r["instruction"], r.get("input", "")) + r["output"] + EOS
                      for r in INSTRUCTION_ROWS)
    assert texts == expected and "### Input:\nthe cat sat on the mat\n\n" in "".join(texts)


def test_loss_on_all_stores_no_mask(tmp_path, tiny_llama):
    assert tokenize(config(tmp_path, tiny_llama, PROMPT_ROWS, "prompt_completion", loss_on="all")) == 0
    table = tokenized(tmp_path, "fmt")
    assert "loss_mask" not in table.column_names
    assert table.column("num_targets").to_pylist() == (
        [len(i) - 1 for i in table.column("input_ids").to_pylist()])


def test_classification_with_text_pairs(tmp_path, tiny_bert):
    rows = [{"premise": "the cat sat", "hypothesis": "a cat", "label": "positive"},
            {"premise": "the dog ran", "hypothesis": "red moon", "label": "negative"}]
    source = fixtures.write_jsonl(tmp_path / "pairs.jsonl", rows + [{"premise": "no pair", "label": 0}])
    raw = fixtures.classification_config(tmp_path, tiny_bert, source, data={
        "text_field": "premise", "text_pair_field": "hypothesis", "eval_fraction": 0.0,
        "max_reject_fraction": 0.5})
    assert tokenize(fixtures.write_config(tmp_path / "c.yaml", raw)) == 0
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(str(tiny_bert))
    texts = sorted(bert.decode(ids) for ids in tokenized(tmp_path, "cls").column("input_ids").to_pylist())
    assert texts == ["[CLS] the cat sat [SEP] a cat [SEP]", "[CLS] the dog ran [SEP] red moon [SEP]"]
    rejects = (tmp_path / "runs" / "cls" / "shard" / "data" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(r)["reason"] for r in rejects] == ["missing field 'hypothesis'"]


# --- bad input ---------------------------------------------------------------------------------

BAD_ROWS = {
    "instruction": [
        ({"instruction": "ok", "output": "fine"}, None),
        ({"instruction": "no output"}, "missing field 'output'"),
        ({"instruction": "", "output": "x"}, "empty text in field 'instruction'"),
        ({"instruction": "x", "input": 3, "output": "x"}, "field 'input' must be a string, got int"),
        ({"instruction": "x", "output": ["a"]}, "field 'output' must be a string, got list"),
    ],
    "prompt_completion": [
        ({"prompt": "ok", "completion": "fine"}, None),
        ({"prompt": "no completion"}, "missing field 'completion'"),
        ({"prompt": " ", "completion": "x"}, "empty text in field 'prompt'"),
        ({"prompt": "x", "completion": 1.5}, "field 'completion' must be a string, got float"),
    ],
    "chat": [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}, None),
        ({"text": "no messages"}, "missing field 'messages'"),
        ({"messages": "hello"}, "field 'messages' must be a list of messages, got str"),
        ({"messages": ["hello"]}, "messages[0] must be an object with role and content, got str"),
        ({"messages": [{"role": "bot", "content": "x"}]},
         "messages[0]: unknown role 'bot'; map it to system, user, assistant, tool with data.role_map"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
         "messages[1]: empty text in field 'content'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
         "messages[1]: missing field 'content'"),
        ({"messages": [{"role": "user", "content": "only a question"}]},
         "no assistant turn in field 'messages'"),
        ({"messages": []}, "no assistant turn in field 'messages'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "call it"}]},
         "messages[1]: field 'tool_calls' must be a list of objects"),
    ],
}


@pytest.mark.parametrize("fmt", list(BAD_ROWS))
def test_bad_rows_land_in_rejects_with_reason(tmp_path, tiny_llama, fmt):
    rows = [row for row, _ in BAD_ROWS[fmt]]
    extra = {"chat_template": str(tmp_path / "t.jinja")} if fmt == "chat" else {}
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert tokenize(config(tmp_path, tiny_llama, rows, fmt, max_reject_fraction=1.0, **extra)) == 0
    rejects = [json.loads(line) for line in
               (tmp_path / "runs" / "fmt" / "shard" / "data" / "rejects.jsonl").read_text().splitlines()]
    want = [(line, reason) for line, (_, reason) in enumerate(BAD_ROWS[fmt], start=1) if reason]
    assert [(r["line"], r["reason"]) for r in rejects] == want
    assert all(r["file"] == str(tmp_path / "fmt.jsonl") for r in rejects)
    assert tokenized(tmp_path, "fmt").num_rows == 1


def test_renamed_fields(tmp_path, tiny_llama):
    rows = [{"q": "the cat", "a": "sat"}, {"q": "the dog"}]
    cfg = config(tmp_path, tiny_llama, rows, "prompt_completion", max_reject_fraction=1.0,
                 fields={"prompt": "q", "completion": "a"})
    assert tokenize(cfg) == 0
    assert tokenized(tmp_path, "fmt").num_rows == 1
    assert "missing field 'a'" in (tmp_path / "runs" / "fmt" / "shard" / "data" / "rejects.jsonl").read_text()


# --- overlong examples -------------------------------------------------------------------------

LONG = "the cat sat on the mat and the dog ran fast " * 4
OVERLONG_ROWS = [{"prompt": "short", "completion": " good"},          # line 1: fits
                 {"prompt": "short", "completion": LONG},              # line 2: long answer
                 {"prompt": LONG, "completion": " good"}]              # line 3: long prompt


def test_overlong_drop_goes_to_tokenize_rejects(tmp_path, tiny_llama):
    cfg = config(tmp_path, tiny_llama, OVERLONG_ROWS, "prompt_completion", max_seq_len=16, overlong="drop",
                 max_reject_fraction=1.0)
    assert tokenize(cfg) == 0
    rejects = [json.loads(line) for line in (tmp_path / "runs" / "fmt" / "tokenize" / "rejects.jsonl").open()]
    assert sorted(r["line"] for r in rejects) == [2, 3]
    assert all(r["reason"].startswith("longer than max_seq_len (") and r["reason"].endswith(" tokens)")
               for r in rejects)
    assert ({r["file"] for r in rejects} == {str(tmp_path / "fmt.jsonl")}
            and all("shard" in r for r in rejects))
    tok = manifest(tmp_path / "runs" / "fmt", "tokenize")
    assert (tok["splits"]["train"]["dropped"] == 2 and tok["rejected"] == 2
            and tok["splits"]["train"]["rows"] == 1)


def test_overlong_truncate_keeps_answers_and_rejects_prompt_only(tmp_path, tiny_llama):
    cfg = config(tmp_path, tiny_llama, OVERLONG_ROWS, "prompt_completion", max_seq_len=16,
                 max_reject_fraction=1.0)
    assert tokenize(cfg) == 0
    rejects = [json.loads(line) for line in (tmp_path / "runs" / "fmt" / "tokenize" / "rejects.jsonl").open()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (3, "no answer tokens left after truncation to max_seq_len")]
    table = tokenized(tmp_path, "fmt")
    assert table.num_rows == 2 and max(len(i) for i in table.column("input_ids").to_pylist()) == 16
    assert table.column("num_targets").to_pylist() == [sum(m) for m in table.column("loss_mask").to_pylist()]
    assert manifest(tmp_path / "runs" / "fmt", "tokenize")["splits"]["train"]["truncated"] == 2


def test_overlong_error_names_the_row(tmp_path, tiny_llama, capsys):
    cfg = config(tmp_path, tiny_llama, OVERLONG_ROWS, "prompt_completion", max_seq_len=16, overlong="error")
    assert tokenize(cfg) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(rf"ftpipe: error: {re.escape(str(tmp_path / 'fmt.jsonl'))}:[23]: example of "
                        r"\d+ tokens is longer than data.max_seq_len 16 \(data.overlong: error\)", last), last


def test_reject_fraction_counts_tokenize_rejects(tmp_path, tiny_llama, capsys):
    cfg = config(tmp_path, tiny_llama, OVERLONG_ROWS, "prompt_completion", max_seq_len=16, overlong="drop")
    assert tokenize(cfg) == 2
    err = capsys.readouterr().err
    assert "data: 2 of 3 rows rejected (66.7% > data.max_reject_fraction 1.0%)" in err
    assert not (tmp_path / "runs" / "fmt" / "tokenize" / "manifest.json").exists()


# --- config and collate ------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    ({"format": "text", "loss_on": "completion"}, "data.loss_on: format 'text' allows only all"),
    ({"format": "chat", "loss_on": "completion"},
     "data.loss_on: format 'chat' allows only assistant or all"),
    ({"format": "instruction", "chat_template": "t.jinja"},
     "data.chat_template: only applies to format 'chat'"),
])
def test_format_key_combinations(tmp_path, data, message):
    raw = fixtures.causal_config(tmp_path, tmp_path, tmp_path / "x.jsonl", data=data)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        validate_config(raw)
    defaults = {f: validate_config(fixtures.causal_config(tmp_path, tmp_path, tmp_path, data={"format": f}))
                .data.loss_on for f in ("text", "instruction", "prompt_completion", "chat")}
    assert defaults == {"text": "all", "instruction": "completion", "prompt_completion": "completion",
                        "chat": "assistant"}


def test_collate_ignores_unmasked_tokens_and_padding():
    batch = collate([[5, 6, 7], [8, 9]], pad_id=0, masks=[[0, 1, 1], [0, 0]])
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert collate([[5, 6], [7]], pad_id=0)["labels"].tolist() == [[5, 6], [7, -100]]
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))


# --- end to end --------------------------------------------------------------------------------

def test_instruction_run_end_to_end(tmp_path, tiny_llama):
    rows = [{"instruction": f"say {w}", "input": s if i % 2 else "", "output": s}
            for i, (w, s) in enumerate(zip(fixtures.WORDS * 3, fixtures.sentences(60, seed=4)))]
    cfg = config(tmp_path, tiny_llama, rows, "instruction", train={"max_steps": 2}, eval_fraction=0.2,
                 max_seq_len=120)
    assert ftpipe("run", cfg, "--no-progress") == 0
    run_dir = tmp_path / "runs" / "fmt"
    assert manifest(run_dir, "train")["steps"] == 2
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["eval_tokens"] == manifest(run_dir, "tokenize")["splits"]["eval"]["targets"]
    samples = [json.loads(line) for line in (run_dir / "evaluate" / "samples.jsonl").open()]
    assert samples and all(s["prompt"].endswith("### Response:\n") for s in samples)


@pytest.mark.parametrize("where", ["file", "inline"])
def test_chat_template_content_is_part_of_the_tokenize_fingerprint(tmp_path, tiny_llama, where):
    from pipeline.config import load_config
    from pipeline.runner import plan

    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    value = str(template) if where == "file" else TEMPLATE
    cfg = config(tmp_path, tiny_llama, CHAT_ROWS, "chat", chat_template=value)
    assert tokenize(cfg) == 0
    changed = TEMPLATE.replace("<|", "<<|") + "\n"
    if where == "file":
        template.write_text(changed)
    else:
        cfg = config(tmp_path, tiny_llama, CHAT_ROWS, "chat", chat_template=changed)
    with pytest.raises(UserError, match=r"^tokenize: data\.chat_template: [0-9a-f]{32} -> [0-9a-f]{32} "
                                        r"since it finished[^\n]*$"):
        plan(load_config(cfg), ["shard", "tokenize"])
    forced = plan(load_config(cfg), ["shard", "tokenize"], force=("tokenize",))
    actions = {p.name: (p.action, p.reason) for p in forced}
    assert actions["shard"][0] == "skip" and actions["tokenize"] == ("run", "forced")


def test_the_same_template_inline_or_in_a_file_is_no_change(tmp_path, tiny_llama):
    from pipeline.config import load_config
    from pipeline.runner import plan

    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    assert tokenize(config(tmp_path, tiny_llama, CHAT_ROWS, "chat", chat_template=str(template))) == 0
    inline = config(tmp_path, tiny_llama, CHAT_ROWS, "chat", chat_template=TEMPLATE)
    actions = {p.name: p.action for p in plan(load_config(inline), ["shard", "tokenize"])}
    assert actions["shard"] == actions["tokenize"] == "skip"


def test_chat_without_any_template_is_a_one_line_error(tmp_path, tiny_llama, capsys):
    assert tokenize(config(tmp_path, tiny_llama, CHAT_ROWS, "chat")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ftpipe: error: data.chat_template: the tokenizer of {str(tiny_llama)!r} has no chat template; "
        "set data.chat_template to a Jinja template or a file holding one")


@pytest.mark.parametrize("where", ["file", "inline"])
def test_a_chat_template_of_broken_syntax_is_one_error_before_any_row(tmp_path, tiny_llama, capsys, where):
    broken = TEMPLATE.replace("{% endif %}{{ '\\n' }}", "{{ '\\n' }}", 1)  # an if never closed
    template = tmp_path / "broken.jinja"
    template.write_text("{# ChatML-like #}\n" + broken)
    value = str(template) if where == "file" else "{# ChatML-like #}\n" + broken
    cfg = config(tmp_path, tiny_llama, CHAT_ROWS, "chat", chat_template=value)
    for command in (("validate", cfg), ("run", cfg, "--no-progress", "--stages", "shard,tokenize")):
        assert ftpipe(*command) == 2
        named = str(template) if where == "file" else "inline template"
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"ftpipe: error: data.chat_template: {named}, line 2: Encountered unknown tag 'endfor'. You "
            "probably made a nesting mistake. Jinja is expecting this tag, but currently looking for 'elif' "
            "or 'else' or 'endif'. The innermost block that needs to be closed is 'if'.")
    assert not (tmp_path / "runs" / "fmt" / "shard").exists()


def test_a_template_with_transformers_generation_tags_passes_the_check(tmp_path, tiny_llama):
    """{% generation %} is a tag of transformers' Jinja environment, not of plain Jinja."""
    tagged = TEMPLATE.replace("{{ eos_token }}", "{% generation %}{{ eos_token }}{% endgeneration %}")
    assert tokenize(config(tmp_path, tiny_llama, CHAT_ROWS, "chat", chat_template=tagged)) == 0


def test_template_errors_reject_the_row(tmp_path, tiny_llama):
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                        "turns') }}{% endif %}" + TEMPLATE.split("{% for m in messages %}", 1)[1])
    cfg = config(tmp_path, tiny_llama, CHAT_ROWS, "chat", chat_template=str(template),
                 max_reject_fraction=1.0)
    assert tokenize(cfg) == 0
    rejects = [json.loads(line) for line in (tmp_path / "runs" / "fmt" / "tokenize" / "rejects.jsonl").open()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(1, "chat template failed: no system turns")]
