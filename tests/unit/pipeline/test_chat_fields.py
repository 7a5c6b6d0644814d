"""Chat rows in other shapes: data.fields names the message list, role and content keys (ShareGPT's
conversations / from / value), data.role_map renames roles, OpenAI-style tool calls reach the template."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import validate_config
from pipeline.encoding import ChatRenderer, template_messages
from pipeline.errors import UserError
from pipeline.formats import RowValidator, shard_schema
from tests import fixtures
from tests.unit.pipeline.test_formats import EOS, TEMPLATE, config, counted_runs, tokenize, tokenized

SHAREGPT = {"fields": {"messages": "conversations", "role": "from", "content": "value"},
            "role_map": {"human": "user", "gpt": "assistant"}}
SHAREGPT_ROWS = [
    {"conversations": [{"from": "system", "value": "be short"}, {"from": "human", "value": "the cat"},
                       {"from": "gpt", "value": "sat on the mat"}]},
    {"conversations": [{"from": "human", "value": "good day"}, {"from": "gpt", "value": "great day"}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "beep"}]},
]
# Renders tool calls and tool results the way hub templates do (tool_calls is defined only when given).
TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}{% if m.content is defined %}{{ m['content'] }}"
    "{% endif %}{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
    "{{ '<call>' + c.function.name + ' ' + (c.function.arguments | tojson) + '</call>' }}"
    "{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% endif %}")
TOOL_ROW = {"messages": [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def test_sharegpt_rows_train_on_the_mapped_assistant_turns(tmp_path, tiny_llama, tokenizer):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    cfg = config(tmp_path, tiny_llama, SHAREGPT_ROWS, "chat", chat_template=str(tmp_path / "t.jinja"),
                 max_reject_fraction=0.5, **SHAREGPT)
    assert tokenize(cfg) == 0
    table = tokenized(tmp_path, "fmt")
    got = sorted(counted_runs(tokenizer, i, m) for i, m in
                 zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()))
    assert got == [["great day" + EOS], ["sat on the mat" + EOS]]
    reject = (tmp_path / "runs" / "fmt" / "shard" / "data" / "rejects.jsonl").read_text()
    assert ("conversations[1]: unknown role 'bot'; map it to system, user, assistant, tool with "
            "data.role_map") in reject


def test_role_map_names_only_the_four_roles(tmp_path, tiny_llama):
    raw = fixtures.causal_config(tmp_path, tiny_llama, tmp_path / "x.jsonl",
                                 data={"format": "chat", "role_map": {"gpt": "bot"}})
    with pytest.raises(UserError, match="data.role_map: .*maps to 'bot'; roles are system, user"):
        validate_config(raw)


def test_tool_calls_pass_through_the_shard_to_the_template(tmp_path, tiny_llama, tokenizer):
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, tmp_path / "x.jsonl",
                                                 data={"format": "chat"}))
    row, problem = RowValidator(cfg.data, None)(TOOL_ROW)
    assert problem is None
    record = {**row, "source": "x.jsonl", "line": 1}
    stored = pa.Table.from_pylist([record], schema=shard_schema(cfg.data)).to_pylist()[0]
    messages = template_messages(stored["messages"])
    assert messages[1] == {"role": "assistant", "tool_calls": TOOL_ROW["messages"][1]["tool_calls"]}
    assert messages[2] == TOOL_ROW["messages"][2]
    spans = ChatRenderer(tokenizer, TOOL_TEMPLATE).spans(messages)
    counted = [text for text, counted in spans if counted]
    assert counted == ['<call>weather {"city": "Paris"}</call>' + EOS, "It is sunny." + EOS]
