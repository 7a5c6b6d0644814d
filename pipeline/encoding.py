"""Shard rows -> token ids and the per-token loss mask, for every data.format.

An example is built from spans of text, each either counted by the loss or not (the prompt, the
non-assistant turns of a chat). Each span is tokenized on its own and the ids are concatenated,
so a span boundary never falls inside a token and the mask is exact by construction.

The stored `loss_mask` (only when data.loss_on is not `all`) has a 1 at every token the loss
counts, i.e. every token the model must predict from the tokens before it; the first token is
never counted. `num_targets` is the sum of the mask (len - 1 without a mask, 1 for classification).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DataConfig
from pipeline.errors import UserError
from pipeline.tokenized import output_schema
from pipeline.tokenizer import rust_tokenizer

Span = tuple[str, bool]  # (text, counted by the loss)


def id_lists(encoded: list[list[int]], eos: int | None) -> pa.ListArray:
    """Token id lists as one Arrow list<int32> array, `eos` appended to each list not already ending
    with it: built from the flat ids with numpy (the tokenize stage's hot path), not list by list."""
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    ends = np.cumsum(lengths)
    flat = np.fromiter(chain.from_iterable(encoded), np.int32, int(ends[-1]) if len(ends) else 0)
    if eos is not None:
        last = np.full(len(encoded), -1, np.int64)
        last[lengths > 0] = flat[ends[lengths > 0] - 1]
        missing = last != eos
        flat = np.insert(flat, ends[missing], eos)
        lengths = lengths + missing
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1: counted target
    length: int  # before truncation

    def cut(self, max_len: int) -> Example:
        return Example(self.ids[:max_len], self.mask[:max_len], self.length)


@dataclass
class EncodedBatch:
    columns: dict[str, list | pa.Array] = field(default_factory=dict)  # Arrow arrays from the text fast path
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (row in batch, reason)
    truncated: int = 0
    dropped: int = 0


def template_messages(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard messages as the chat template takes them: keys the source did not give left out (a
    template tests `message.tool_calls is defined`), tool_calls decoded from their JSON text."""
    messages = []
    for message in stored:
        turn = {key: value for key, value in message.items() if value is not None}
        if "tool_calls" in turn:
            turn["tool_calls"] = json.loads(turn["tool_calls"])
        messages.append(turn)
    return messages


class ChatRenderer:
    """Renders a conversation with a chat template and splits it into assistant and other spans."""

    def __init__(self, tokenizer, template: str | None):
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def spans(self, messages: list[dict[str, str]]) -> list[Span]:
        """Incremental rendering: the text up to each assistant turn, then up to its end, must
        extend the text before it; the difference is the turn (its trailing whitespace excluded,
        so the counted part ends at the template's end-of-turn token)."""
        spans: list[Span] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._extend(done, self.render(messages[:index], generation_prompt=True), index)
            after = self._extend(before, self.render(messages[: index + 1]), index)
            answer = after[len(before):].rstrip()
            spans += [(before[len(done):], False), (answer, True)]
            done = before + answer
        rest = self._extend(done, self.render(messages), len(messages))
        return [s for s in spans + [(rest[len(done):], False)] if s[0]]

    @staticmethod
    def _extend(prefix: str, text: str, index: int) -> str:
        if not text.startswith(prefix):
            raise ValueError(f"the chat template is not incremental at message {index} (the rendering "
                             "of the earlier messages is not a prefix of it)")
        return text


class Encoder:
    """Turns a batch of shard rows into token ids and loss masks, applying data.overlong."""

    def __init__(self, tokenizer, data: DataConfig, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.data = data
        self.max_len = data.max_seq_len
        self.classification = data.format == "classification"
        self.masked = data.loss_on != "all"
        self.chat = ChatRenderer(tokenizer, chat_template) if data.format == "chat" else None
        # A fast tokenizer's Rust backend, called directly: ids only, no offsets, no Python-side
        # BatchEncoding (the tokenize stage's hot path). Slow tokenizers go through __call__.
        self.rust = rust_tokenizer(tokenizer)

    @property
    def schema(self) -> pa.Schema:
        return output_schema(self.classification, self.masked)

    @property
    def column_wise(self) -> bool:
        """Plain text, loss on every token, truncation, no packing: the common pretraining-style case
        takes the column-wise path (the same rows, built in Arrow rather than per-row lists)."""
        return (self.data.format == "text" and not self.masked and self.data.overlong == "truncate"
                and not self.data.packing)

    def __call__(self, rows: dict[str, list]) -> EncodedBatch:
        if self.column_wise:
            return self._text_columns(rows["text"])
        out = EncodedBatch({name: [] for name in self.schema.names})
        for index, item in enumerate(self.examples(rows)):
            if isinstance(item, str):
                out.rejects.append((index, item))
            else:
                self._fit(item, rows, index, out)
        return out

    def examples(self, rows: dict[str, list]) -> list[Example | str]:
        """One Example (or a reject reason) per row, before the overlong policy."""
        if self.classification:
            return self._classification(rows)
        if self.chat is not None:
            return [self._chat(template_messages(messages)) for messages in rows["messages"]]
        if self.data.format == "text":
            return [self._from_ids([(ids, True)]) for ids in self._with_eos(self._encode(rows["text"], True))]
        prompts = self._encode(rows["prompt"], True)
        completions = self._with_eos(self._encode(rows["completion"], False))
        return [self._from_ids([(self._without_eos(p), False), (c, True)])
                for p, c in zip(prompts, completions)]

    def _text_columns(self, texts: list[str]) -> EncodedBatch:
        full = id_lists(self._encode(texts, True), self.tokenizer.eos_token_id)
        lengths = pc.list_value_length(full)
        targets = pc.subtract(pc.min_element_wise(lengths, self.max_len), 1).cast(pa.int32())
        keep = pc.greater(targets, 0)
        rejects = [(i, "no answer tokens left after truncation to max_seq_len")
                   for i, kept in enumerate(keep.to_pylist()) if not kept] if not pc.all(keep).as_py() else []
        columns = {"input_ids": pc.list_slice(full, 0, self.max_len).filter(keep),
                   "num_targets": targets.filter(keep)}
        truncated = pc.sum(pc.greater(lengths, self.max_len)).as_py() or 0
        return EncodedBatch(columns, rejects, truncated=truncated)

    def _fit(self, example: Example, rows: dict[str, list], index: int, out: EncodedBatch) -> None:
        if example.length > self.max_len:
            if self.data.overlong == "error":
                raise UserError(f"{rows['source'][index]}:{rows['line'][index]}: example of {example.length} "
                                f"tokens is longer than data.max_seq_len {self.max_len} "
                                "(data.overlong: error)")
            if self.data.overlong == "drop":
                out.dropped += 1
                out.rejects.append((index, f"longer than max_seq_len ({example.length} tokens)"))
                return
            example = example.cut(self.max_len)
            out.truncated += 1
        targets = 1 if self.classification else sum(example.mask)
        if targets == 0:
            out.rejects.append((index, "no answer tokens left after truncation to max_seq_len"))
            return
        self._append(out.columns, example, targets, rows, index)

    def _append(self, columns: dict[str, list], example: Example, targets: int, rows: dict,
                index: int) -> None:
        columns["input_ids"].append(example.ids)
        columns["num_targets"].append(targets)
        if self.masked:
            columns["loss_mask"].append(example.mask)
        if self.classification:
            columns["label"].append(rows["label"][index])

    def _from_ids(self, parts: list[tuple[list[int], bool]]) -> Example:
        ids, mask = [], []
        for part, counted in parts:
            ids += part
            mask += [int(counted or not self.masked)] * len(part)
        if mask:
            mask[0] = 0  # nothing predicts the first token
        return Example(ids, mask, len(ids))

    def _chat(self, messages: list[dict[str, str]]) -> Example | str:
        try:
            spans = self.chat.spans(messages)
        except Exception as err:  # a template's raise_exception or a Jinja error: this row only
            return f"chat template failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        encoded = self._encode([text for text, _ in spans], False)
        return self._from_ids(list(zip(encoded, [counted for _, counted in spans])))

    def _classification(self, rows: dict[str, list]) -> list[Example]:
        texts, pairs = rows["text"], rows.get("text_pair")
        encoded = self._encode_with_pairs(texts, pairs)
        lengths = [len(seq) for seq in encoded]
        # Re-encoding only the long rows keeps the tokenizer's closing special tokens in place.
        long = [i for i, n in enumerate(lengths) if n > self.max_len]
        if long and self.data.overlong == "truncate":
            again = self._encode_with_pairs([texts[i] for i in long],
                                            [pairs[i] for i in long] if pairs else None, self.max_len)
            for i, seq in zip(long, again):
                encoded[i] = seq
        return [Example(seq, [], n) for seq, n in zip(encoded, lengths)]

    def _encode_with_pairs(self, texts: list[str], pairs: list[str] | None,
                           max_len: int | None = None) -> list[list[int]]:
        """Ids of texts (and their pairs) with the tokenizer's special tokens, as a plain call makes them."""
        if self.rust is not None:
            return self.rust.ids(list(zip(texts, pairs)) if pairs else texts, True, max_len)
        truncation = {"truncation": True, "max_length": max_len} if max_len is not None else {}
        return self.tokenizer(texts, pairs, return_attention_mask=False, return_token_type_ids=False,
                              **truncation)["input_ids"]

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        if self.rust is None:
            return self.tokenizer(texts, add_special_tokens=special, return_attention_mask=False,
                                  return_token_type_ids=False)["input_ids"]
        return self.rust.ids(texts, special)

    def _with_eos(self, encoded: list[list[int]]) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            return encoded
        return [seq + [eos] if not seq or seq[-1] != eos else seq for seq in encoded]

    def _without_eos(self, seq: list[int]) -> list[int]:
        # Tokenizers whose post-processor appends EOS would otherwise end the prompt with it.
        eos = self.tokenizer.eos_token_id
        return seq[:-1] if eos is not None and len(seq) > 1 and seq[-1] == eos else seq
