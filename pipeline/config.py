"""The run config: pydantic models, YAML loading, dotted CLI overrides, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline import config_errors
from pipeline.attention import check_run_attention
from pipeline.config_consolidate import ConsolidateConfig
from pipeline.config_errors import Section
from pipeline.config_evaluate import MAX_BATCH, EvaluateConfig  # noqa: F401 - re-exported
from pipeline.config_launch import LaunchConfig, ranks_per_node
from pipeline.config_model import MAX_LABELS, LoraConfig, ModelConfig  # noqa: F401 - re-exported
from pipeline.config_sources import ENTRY_TAGS, SourceEntry
from pipeline.config_tracking import TrackingConfig
from pipeline.errors import UserError

# Bounds far above any real run that stop absurd values at `validate` instead of hours later (or in
# the kernel's OOM killer): the sizes of batches, label sets and names.
MAX_NAME = 200  # run names; a temporary name adds 14 characters, and a path component holds 255 bytes


class FieldNames(Section):
    instruction: str = Field("instruction", description="format instruction: the task.")
    input: str = Field(
        "input", description="format instruction: optional extra input (may be missing or empty).")
    output: str = Field("output", description="format instruction: the answer (the loss target).")
    prompt: str = Field("prompt", description="format prompt_completion: the prompt.")
    completion: str = Field(
        "completion", description="format prompt_completion: the answer (the loss target).")
    messages: str = Field("messages", description="format chat: the list of turns (e.g. conversations).")
    role: str = Field("role", description="format chat: a turn's role key (e.g. from).")
    content: str = Field("content", description="format chat: a turn's text key (e.g. value).")


# Which loss_on values each format allows; the first is the default.
LOSS_ON = {"text": ("all",), "classification": ("all",), "instruction": ("completion", "all"),
           "prompt_completion": ("completion", "all"), "chat": ("assistant", "all")}


# Keys that mean something for one data.format only.
FORMAT_ONLY_KEYS = {"chat_template": "chat", "role_map": "chat", "text_pair_field": "classification"}
CHAT_ROLES = ("system", "user", "assistant", "tool")


def inline_template(value: str) -> bool:
    """data.chat_template's text is the Jinja template itself (it holds {{ or {% and names no file), not
    the path of a file holding one."""
    if "{{" not in value and "{%" not in value:
        return False
    try:
        return not Path(value).is_file()
    except OSError:  # a template's text is no usable path (too long a name)
        return True


class DataConfig(Section):
    train: list[SourceEntry] = Field(
        min_length=1, description="Training files or globs (jsonl, parquet, csv, txt); an entry may also be "
        "{path, weight, limit} to up- or down-weight a source or cap its rows, or a Hugging Face dataset: "
        "{hf, subset, split, revision, data_files} or {path: SAVE_TO_DISK_FOLDER}.")
    eval: list[SourceEntry] = Field(
        default_factory=list, description="Held-out files or datasets, as in train (weight does not apply); "
        "when empty, eval_fraction of train is held out.")
    format: Literal["text", "instruction", "chat", "prompt_completion", "classification"] = Field(
        "text", description="Row format: text (causal LM), instruction (alpaca instruction/input/output), "
        "chat (messages rendered with a chat template), prompt_completion, or classification (text + label).")
    text_field: str = Field("text", description="Field holding the text (text, classification).")
    text_pair_field: str | None = Field(
        None, description="classification: optional field with a second text (sentence pairs).")
    label_field: str = Field("label", description="Field holding the label (classification).")
    fields: FieldNames = Field(
        default_factory=FieldNames, description="Source field names of the other formats.")
    role_map: dict[str, str] = Field(
        default_factory=dict, description="chat: source role names to system/user/assistant/tool, e.g. "
        "{human: user, gpt: assistant}.")
    chat_template: str | None = Field(
        None, description="chat: a Jinja chat template, inline (text holding {{ or {%) or the path of a "
        "file holding one; null: the tokenizer's own chat template.")
    loss_on: Literal["all", "completion", "assistant"] | None = Field(
        None, description="Tokens the loss counts: all; completion (the answer of instruction / "
        "prompt_completion rows); assistant (the assistant turns of chat rows). null: completion, assistant "
        "or all by format.")
    labels: list[str] | None = Field(
        None, max_length=MAX_LABELS,
        description="Label names in index order; rows may give a name or an index. null: inferred from "
        "the training split (sorted names; recorded in the shard manifest).")
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train rows held out by a stable hash of the row.")
    num_shards: int = Field(
        4, ge=1, le=10_000, description="Number of parquet shards the shard stage writes per split.")
    num_workers: int = Field(
        1, ge=1, le=1024,
        description="Workers the shard and tokenize stages spread their work over (one source file "
        "or one shard piece per task; processes, or threads for tokenize with a fast tokenizer); the output "
        "is the same for any value.")
    max_seq_len: int = Field(
        128, ge=8, le=1_048_576, description="Tokens per example; see overlong for longer ones.")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Examples longer than max_seq_len: truncate the end, drop them (tokenize "
        "rejects), or stop with an error naming the row.")
    packing: bool = Field(
        False, description="Pack several examples into each row of up to max_seq_len tokens (causal LM "
        "formats); attention and positions restart at every example, so the loss is the same as unpacked.")
    max_reject_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="Fail before training when more than this share of rows is "
        "rejected (shard and tokenize rejects together).")

    @field_validator("loss_on")
    @classmethod
    def _loss_on_fits_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed = LOSS_ON.get(info.data.get("format", "text"), ())
        if value is not None and allowed and value not in allowed:
            raise ValueError(f"format {info.data['format']!r} allows only {' or '.join(allowed)}")
        return value

    @field_validator("chat_template", "text_pair_field", "role_map")
    @classmethod
    def _only_for_its_format(cls, value: str | dict | None, info: ValidationInfo) -> str | dict | None:
        needed = FORMAT_ONLY_KEYS[info.field_name]
        if value not in (None, {}) and info.data.get("format") != needed:
            raise ValueError(f"only applies to format {needed!r}")
        return value

    @field_validator("role_map")
    @classmethod
    def _roles_known(cls, value: dict[str, str]) -> dict[str, str]:
        wrong = sorted({role for role in value.values() if role not in CHAT_ROLES})
        if wrong:
            raise ValueError(f"maps to {', '.join(map(repr, wrong))}; roles are {', '.join(CHAT_ROLES)}")
        return value

    @field_validator("eval")
    @classmethod
    def _eval_unweighted(cls, value: list) -> list:
        if any(not isinstance(entry, str) and entry.weight != 1.0 for entry in value):
            raise ValueError("weight applies to data.train sources only (held-out rows count once)")
        return value

    @field_validator("packing")
    @classmethod
    def _packing_needs_causal_lm(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("format") == "classification":
            raise ValueError("format 'classification' cannot be packed (one label per row); set it to false")
        return value

    @model_validator(mode="after")
    def _default_loss_on(self) -> DataConfig:
        if self.loss_on is None:
            self.loss_on = LOSS_ON[self.format][0]
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="ZeRO stage: 1 optimizer, 2 + gradients, 3 + parameters.")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="Keep optimizer state in host memory.")
    offload_params: Literal["none", "cpu"] = Field(
        "none", description="Keep parameters in host memory (stage 3).")
    config: str | None = Field(
        None, description="A DeepSpeed JSON (e.g. ds_configs/zero3.json); its \"auto\" fields come from this "
        "run config.")

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedConfig:
        if self.offload_params == "cpu" and self.zero_stage != 3:
            raise ValueError("train.deepspeed.offload_params: cpu needs zero_stage: 3")
        return self


class FSDPConfig(Section):
    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after forward (less memory, one more all-gather).")
    cpu_offload: bool = Field(False, description="Keep sharded parameters and gradients in host memory.")


class FreezeConfig(Section):
    patterns: list[str] = Field(
        default_factory=list, description="Parameter-name globs to freeze, e.g. 'model.embed_tokens.*'.")
    train_last_layers: int | None = Field(
        None, ge=0, le=100_000,
        description="Freeze everything but the last N transformer layers and the head.")
    head_only: bool = Field(False, description="Freeze everything but the task head.")


class TrainConfig(Section):
    strategy: Literal["single", "ddp", "deepspeed", "fsdp"] = Field(
        "single", description="single process, or data parallel (ddp), DeepSpeed ZeRO, or FSDP2 across "
        "ranks.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="strategy: deepspeed.")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="strategy: fsdp (FSDP2 fully_shard).")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where training runs: cuda (an error on a node without a GPU), cpu (gloo, even "
        "where CUDA exists), or auto: cuda when present, else cpu with a warning when a node runs several "
        "ranks or the job is a SLURM one.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer block's activations in backward (less memory, ~30% "
        "more compute), for every strategy (FSDP2: the block is wrapped before fully_shard).")
    compile: bool = Field(
        False, description="torch.compile each transformer block's forward (strategies single and ddp; "
        "others train uncompiled, with a warning). The first steps pay the compilation.")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="Partial fine-tuning.")
    sample_ledger: bool = Field(
        False, description="Write train/ledger/rank-N.jsonl: the row ids each rank trained at each step.")
    epochs: float = Field(
        1.0, gt=0, le=100_000, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(
        None, ge=1, le=10**10, description="Optimizer steps; overrides epochs when set.")
    micro_batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Examples per forward pass per rank.")
    grad_accum: int = Field(
        1, ge=1, le=MAX_BATCH, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH,
        description="Examples per optimizer step over all ranks; when set, grad_accum is derived "
        "from it (global / (micro_batch_size x ranks)), so the run resumes unchanged at any world size.")
    lr: float = Field(5.0e-5, gt=0, le=10, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps with linear warmup.")
    weight_decay: float = Field(
        0.0, ge=0.0, le=100, description="AdamW weight decay (not applied to biases/norms).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32, or bf16 autocast. On a CPU without native bf16 (no avx512_bf16/AMX/ARM "
        "bf16) bf16 is emulated, ~20x slower: training runs in fp32 there, with a warning giving the "
        "measured cost, unless allow_slow_bf16.")
    fused_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="The causal LM loss without full-vocabulary fp32 logits. auto: Liger's fused "
        "linear cross-entropy on CUDA when liger-kernel is installed, else the loss in chunks of tokens from "
        "the final hidden states (same result); on: Liger's kernel or an error; off: full logits.")
    allow_slow_bf16: bool = Field(
        False, description="Train in bf16 even on a CPU without native bf16 (see precision).")
    checkpoint_every: int = Field(100, ge=1, le=10**10, description="Optimizer steps between checkpoints.")
    keep_last: int = Field(2, ge=1, le=10_000, description="Complete checkpoints kept on disk.")
    log_every: int = Field(1, ge=1, le=10**10, description="Optimizer steps between logged metrics.")
    eval_every: int | None = Field(
        None, ge=1, le=10**10, description="Optimizer steps between scorings of the held-out split during "
        "training (capped by evaluate.max_rows; loss, and accuracy/macro-F1 for classification, by step).")
    keep_best: bool = Field(
        False, description="Keep the checkpoint with the lowest held-out loss (needs eval_every) besides the "
        "keep_last ones; consolidate.checkpoint: best picks it.")


class RunConfig(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=MAX_NAME,
        description="Run name; the run directory's name.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    consolidate: ConsolidateConfig = Field(default_factory=ConsolidateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="after")
    def _task_matches_format(self) -> RunConfig:
        classify = self.model.task == "sequence_classification"
        if classify != (self.data.format == "classification"):
            raise ValueError(
                f"model.task {self.model.task!r} needs data.format "
                f"{'classification' if classify else 'text'!r}, got {self.data.format!r}")
        if classify:
            self._check_labels()
            if self.evaluate.lm_eval is not None:
                raise ValueError("evaluate.lm_eval scores language models: it needs model.task causal_lm")
        self._check_launch()
        check_run_attention(self.model.attn_implementation, self.train.device, self.launch.backend)
        if (self.train.keep_best or self.consolidate.checkpoint == "best") and not self.train.eval_every:
            key = "train.keep_best" if self.train.keep_best else "consolidate.checkpoint: best"
            raise ValueError(f"{key} needs train.eval_every (the best checkpoint is the one with the lowest "
                             "held-out loss)")
        if self.consolidate.checkpoint == "best" and not self.train.keep_best:
            raise ValueError("consolidate.checkpoint: best needs train.keep_best: true")
        return self

    def _check_launch(self) -> None:
        ranks = ranks_per_node(self.launch, self.train.strategy, self.train.device) * self.launch.nnodes
        if self.launch.backend == "local" and ranks > 1:
            raise ValueError(
                f"launch.nproc_per_node/nnodes ask for {ranks} ranks; set launch.backend: torchrun")
        if self.train.strategy == "single" and ranks > 1:
            raise ValueError(f"train.strategy 'single' cannot use {ranks} ranks; use ddp, fsdp or deepspeed")
        # Under SLURM the rendezvous host is the allocation's first node, known only inside the job.
        if self.launch.nnodes > 1 and not self.launch.rdzv_endpoint and self.launch.backend != "slurm":
            raise ValueError("launch.nnodes > 1 needs launch.rdzv_endpoint (HOST:PORT of the first node)")
        if self.train.deepspeed.config and self.train.strategy != "deepspeed":
            raise ValueError("train.deepspeed.config is set but train.strategy is not 'deepspeed'")
        if self.launch.node_rank >= self.launch.nnodes:
            raise ValueError(f"launch.node_rank {self.launch.node_rank} must be below launch.nnodes "
                             f"{self.launch.nnodes}")
        self._check_batch(ranks)

    def _check_batch(self, ranks: int) -> None:
        # Training draws a whole optimizer step's row ids at once; more than MAX_BATCH is a mistake.
        train = self.train
        step = train.global_batch_size or train.micro_batch_size * train.grad_accum * ranks
        if step > MAX_BATCH:
            raise ValueError(f"train: {step} examples per optimizer step (micro_batch_size x grad_accum x "
                             f"ranks) is more than {MAX_BATCH}; lower train.micro_batch_size or grad_accum")

    def _check_labels(self) -> None:
        labels, num = self.data.labels, self.model.num_labels
        if labels is not None and num is not None and len(labels) != num:
            raise ValueError(f"model.num_labels is {num} but data.labels has {len(labels)} names")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError("data.labels has duplicate names")
        if num is None and labels is not None:
            self.model.num_labels = len(labels)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply `a.b=value` overrides, validate; UserError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read config: {err}") from None
    config_errors.check_nesting(text, path)
    raw = _parse_yaml(path, text)
    lines = config_errors.yaml_lines(text)
    for item in overrides:
        key = _apply_override(raw, item)
        for loc in [loc for loc in lines if loc[: len(key)] == key]:
            del lines[loc]  # the value now comes from the command line, not from that line
    config_errors.check_expansion(raw, path)
    return validate_config(raw, path, lines)


def validate_config(raw: dict, path: Path | str = "<config>", lines: dict | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        found = config_errors.error_lines(err.errors(), path, lines or {}, RunConfig, ENTRY_TAGS)
        raise UserError(found) from None


def _parse_yaml(path: Path, text: str) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError:  # PyYAML's int() of a number longer than Python converts
        digits = re.search(r"[0-9_]{4301,}", text)
        where = f"{path}:{text.count(chr(10), 0, digits.start()) + 1}" if digits else str(path)
        raise UserError(f"{where}: invalid YAML: a number with more than 4300 digits") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the config must be a YAML mapping of sections (name, model, data, ...)")
    return raw


def _apply_override(raw: dict, item: str) -> tuple[str, ...]:
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r}: expected KEY.SUB=VALUE, e.g. train.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = parsed
    return tuple(parts)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
