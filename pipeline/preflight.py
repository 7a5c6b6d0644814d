"""Checks `validate` (and every run or submission) makes of the files a config names, before
anything is written: the model directory, the output folder, and whether a batch can fit in memory.
Import-light (no torch; transformers only to compile a data.chat_template): the command line runs it before
choosing what to import."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, inline_template
from pipeline.digests import WEIGHT_SUFFIXES
from pipeline.errors import UserError
from pipeline.prompts import read_prompts
from pipeline.sources import check_paths
from pipeline.tokenizer import template_text

HUB_ID = r"[\w.-]+(/[\w.-]+)?"
NAME_MAX = 255  # bytes in one path component on every file system ftpipe is used on
PATH_MAX = 4096
# One of these is in every folder AutoTokenizer loads from (fast, sentencepiece or vocab-file tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
# Longest suffix ftpipe puts under a run directory (stage, parts/NNNNN, temporaries, file names).
RUN_DIR_DEPTH = 200


def check_inputs(cfg: RunConfig) -> None:
    """Every check a config gets before anything runs; UserError naming the key on the first problem."""
    check_paths(cfg)
    if cfg.data.chat_template is not None:
        check_template(cfg.data.chat_template)
    if cfg.train.deepspeed.config:
        check_json_file("train.deepspeed.config", Path(cfg.train.deepspeed.config))
    if cfg.evaluate.prompts:
        if cfg.model.task != "causal_lm":
            raise UserError(f"evaluate.prompts: only causal_lm runs generate; model.task is {cfg.model.task}")
        read_prompts(cfg.evaluate.prompts, cfg.data.format == "chat")  # a bad line now, not after training
    model_config = check_model(cfg.model.name_or_path)
    check_output(cfg)
    if model_config is not None:
        check_memory(cfg, model_config)


def check_template(template: str) -> None:
    """data.chat_template: an inline template or an existing file, either of valid Jinja syntax."""
    if not inline_template(template):
        try:
            found = Path(template).is_file()
        except OSError as err:  # a name longer than the file system allows
            raise UserError(f"data.chat_template: {err.strerror}: {template[:60]!r}...") from None
        if not found:
            raise UserError(f"data.chat_template: no file {template!r} (inline templates hold {{{{ or {{%)")
    template_text(template)


def check_model(name: str) -> dict[str, Any] | None:
    """A local model directory with a config.json and weights, or something that can only be a hub
    id; returns the local config.json (None for a hub id)."""
    local = Path(name)
    try:
        exists = local.exists()
    except OSError as err:  # a name longer than the file system allows
        raise UserError(f"model.name_or_path: {_short(name)}: {err.strerror}") from None
    if not exists:
        _check_hub_id(name)
        return None
    if not local.is_dir():
        raise UserError(f"model.name_or_path: {name!r} is a file, not a model directory")
    config = _model_config(local)
    _check_weights(local)
    if not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model.name_or_path: {name!r} has no tokenizer files "
                        f"({', '.join(TOKENIZER_FILES[:3])}, ...); tokenize would stop after shard")
    return config


def check_json_file(key: str, path: Path) -> dict[str, Any]:
    """A JSON object in a file the config names (read at train time; checked now)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise UserError(f"{key}: cannot read {_short(str(path))!r}: {reason}") from None
    except ValueError as err:
        raise UserError(f"{key}: {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {path}: expected a JSON object")
    return data


def _check_hub_id(name: str) -> None:
    # A path that is missing must not be sent to the hub: say that the folder is not there.
    first = name.split("/")[0]
    if name.startswith(("/", ".", "~")) or ("/" in name and first and Path(first).is_dir()):
        hint = " ('~' is not expanded; write the full path)" if name.startswith("~") else ""
        raise UserError(f"model.name_or_path: no directory {name!r}{hint}")
    if not re.fullmatch(HUB_ID, name):
        raise UserError(f"model.name_or_path: {name!r} is neither a local directory nor a hub id")


def _model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"model.name_or_path: {str(folder)!r} has no config.json")
    return check_json_file("model.name_or_path", path)


def _check_weights(folder: Path) -> None:
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise UserError(f"model.name_or_path: {str(folder)!r} has no weight files "
                        f"({', '.join('*' + s for s in WEIGHT_SUFFIXES[:2])}, ...)")
    for path in weights:
        if path.suffix == ".safetensors":
            _check_safetensors(path)


def _check_safetensors(path: Path) -> None:
    """The header (8-byte length, JSON) is whole and every tensor it lists ends inside the file:
    catches empty, truncated and foreign files without reading the weights."""
    size = path.stat().st_size
    problem = "empty" if size == 0 else None
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 8 + length <= size else None
    except (OSError, ValueError) as err:
        problem, header = str(err), None
    if header is None or not isinstance(header, dict):
        raise UserError(f"model.name_or_path: {path}: not a safetensors file ({problem or 'bad header'})")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    if 8 + length + max(ends, default=0) > size:
        raise UserError(f"model.name_or_path: {path}: truncated ({size} bytes, its header lists "
                        f"{8 + length + max(ends)})")


def check_output(cfg: RunConfig) -> None:
    """output_dir and the run directory can be folders, with names the file system accepts."""
    run_dir = cfg.run_dir
    for part in run_dir.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise UserError(f"output_dir: a folder name of {_short(part)!r} is longer than the "
                            f"{NAME_MAX} bytes file systems allow")
    if len(str(run_dir.absolute())) + RUN_DIR_DEPTH > PATH_MAX:
        raise UserError(f"output_dir: {_short(str(run_dir))!r} is too long a path for the files of a run "
                        f"(at most {PATH_MAX - RUN_DIR_DEPTH} characters)")
    for folder in (run_dir, *run_dir.parents):
        try:
            exists = folder.exists()
        except OSError as err:  # no permission to look
            raise UserError(f"output_dir: cannot look at {str(folder)!r}: {err.strerror}") from None
        if exists:
            if not folder.is_dir():
                key = "name" if folder == run_dir else "output_dir"
                raise UserError(f"{key}: {str(folder)!r} is a file, not a folder")
            return


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def check_memory(cfg: RunConfig, model_config: dict[str, Any]) -> None:
    """Refuse a batch whose forward pass cannot fit in the memory it will have: a floor (logits and
    one activation per layer in fp32), so only absurd sizes are refused."""
    available, where = _memory(cfg)
    if available is None:
        return
    for key, batch in (("train.micro_batch_size", cfg.train.micro_batch_size),
                       ("evaluate.batch_size", cfg.evaluate.batch_size)):
        need = _forward_bytes(cfg, model_config, batch)
        if need > available:
            raise UserError(
                f"{key}: {batch} examples x {cfg.data.max_seq_len} tokens need at least {need / 2**30:.1f} "
                f"GiB for one forward pass of this model, more than {where} ({available / 2**30:.1f} GiB); "
                f"lower {key} or data.max_seq_len")


def _forward_bytes(cfg: RunConfig, model_config: dict[str, Any], batch: int) -> int:
    tokens = batch * cfg.data.max_seq_len
    width = _positive_int(model_config, "hidden_size", "n_embd", "d_model")
    layers = _positive_int(model_config, "num_hidden_layers", "n_layer", "num_layers")
    outputs = _positive_int(model_config, "vocab_size") if cfg.model.task == "causal_lm" else 0
    return 4 * tokens * (outputs + width * layers)


def _positive_int(config: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _memory(cfg: RunConfig) -> tuple[int | None, str]:
    """Bytes of memory the run's processes can use, and what that is, or None when unknown."""
    if cfg.launch.backend == "slurm":
        mem = cfg.launch.slurm.mem
        match = re.fullmatch(r"([0-9]+)([KMGT]?)B?", (mem or "").strip().upper())
        if not match or match.group(1) == "0":  # --mem=0: the whole node, of unknown size here
            return None, ""
        scale = {"K": 2**10, "": 2**20, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)]
        return int(match.group(1)) * scale, "launch.slurm.mem"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    except (ValueError, OSError):
        return None, ""
