"""Tiny real models, tokenizers and datasets built in a second, for tests on CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

WORDS = ("the cat dog sat on mat ran fast slow red blue green big small house tree river "
         "sun moon star day night good bad happy sad film movie plot actor scene great awful").split()
POSITIVE = ("good", "great", "happy", "wonderful", "excellent", "love")
NEGATIVE = ("bad", "awful", "sad", "terrible", "boring", "hate")


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(count)]


def labelled(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        positive = rng.random() < 0.5
        filler = [rng.choice(WORDS[:20]) for _ in range(rng.randint(3, 8))]
        filler.insert(rng.randrange(len(filler) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"text": " ".join(filler), "label": "positive" if positive else "negative"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_model_dir(folder: Path, config: dict | None = None) -> Path:
    """A model directory that passes the checks before a run without holding a model: a config.json,
    a tokenizer_config.json and a safetensors file with no tensors (an 8-byte header length, then the
    header `{}`)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {}))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    return folder


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (300 tokens) trained on `sentences` in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(400, seed=1) + [" ".join(POSITIVE + NEGATIVE)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = tiny_bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_tiny_bert(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(sentences(300, seed=2) + [" ".join(POSITIVE + NEGATIVE)] * 5,
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def causal_config(tmp: Path, model: Path, source: Path, **sections) -> dict:
    cfg = {
        "name": "lm", "output_dir": str(tmp / "runs"),
        "model": {"name_or_path": str(model), "task": "causal_lm"},
        "data": {"train": [str(source)], "format": "text", "eval_fraction": 0.2, "num_shards": 2,
                 "max_seq_len": 32},
        "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_ratio": 0.1,
                  "checkpoint_every": 2, "keep_last": 2, "seed": 0},
        "evaluate": {"batch_size": 8, "num_generations": 2, "max_new_tokens": 5},
        "tracking": {"enabled": False, "report": False},
    }
    return merge(cfg, sections)


def classification_config(tmp: Path, model: Path, source: Path, **sections) -> dict:
    cfg = {
        "name": "cls", "output_dir": str(tmp / "runs"),
        "model": {"name_or_path": str(model), "task": "sequence_classification"},
        "data": {"train": [str(source)], "format": "classification", "labels": ["negative", "positive"],
                 "eval_fraction": 0.2, "num_shards": 2, "max_seq_len": 24},
        "train": {"max_steps": 30, "micro_batch_size": 16, "lr": 3e-3, "checkpoint_every": 10, "seed": 0},
        "evaluate": {"batch_size": 32, "compare_base": True},
        "tracking": {"enabled": False, "report": False},
    }
    return merge(cfg, sections)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


LM_EVAL_TASK = "tiny_continuations"
LM_EVAL_DOCS = 6


def write_lm_eval_task(folder: Path) -> Path:
    """An lm-eval task for evaluate.lm_eval, read from local files only: the perplexity and greedy
    accuracy of a continuation (loglikelihood) over LM_EVAL_DOCS documents."""
    folder.mkdir(parents=True)
    docs = [{"context": " ".join(s.split()[:3]), "continuation": " " + " ".join(s.split()[3:])}
            for s in sentences(LM_EVAL_DOCS, seed=5)]
    data = write_jsonl(folder / "docs.jsonl", docs)
    (folder / f"{LM_EVAL_TASK}.yaml").write_text(
        f"task: {LM_EVAL_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\ntarget_delimiter: ''\nmetric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder
