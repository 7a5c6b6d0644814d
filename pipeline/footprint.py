"""What a run will need, known before it is queued: parameters (from the model's config.json on the meta
device, no weights read), per-GPU memory of each strategy, host memory, checkpoint size, and a time
estimate from a finished run of the same model. `ftpipe plan` prints it.

Model states follow what ftpipe's engines keep (benchmarks/memory.py measures them): ddp, single and FSDP2
hold fp32 weights and compute in bf16 under autocast (4 bytes/param, + 4 gradient + 8 Adam per trainable
param); DeepSpeed holds 16-bit weights and gradients and an fp32 master copy and moments (2 + 2 + 12 per
trainable param; in fp32 4 + 4 + 12). ZeRO-1 shards the optimizer, ZeRO-2 the gradients too, ZeRO-3 and
FSDP2 everything. Activations are those a Llama-style block saves for backward with a fused attention
kernel (no L x L scores): ~(7 h + 2 h_kv + 4 i) values per token per layer; with activation checkpointing
only each block's input plus one block recomputed. The causal LM loss holds the logits, their fp32 form
and their gradient (tokens x vocab x (b + 8) bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp")
# Preferred first when several fit: least communication, then least sharding.
PREFERENCE = ("ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload")
HEADROOM = 0.9  # of a GPU's memory a plan may fill: allocator fragmentation, CUDA context, buffers


@dataclass(frozen=True)
class Shape:
    parameters: int
    trainable: int
    largest_layer: int  # parameters of the largest single module (DeepSpeed's largest_layer_params)
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    vocab: int


def model_shape(cfg: RunConfig, labels: list[str] | None = None) -> Shape:
    """The model as training builds it (LoRA, frozen parameters), on the meta device."""
    from pipeline.models import MODEL_CLASSES, load_model_config
    from pipeline.train.partial import apply_lora, freeze

    config = load_model_config(cfg.model, labels or cfg.data.labels)
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.model.task].from_config(config)
        if cfg.model.lora is not None:
            model = apply_lora(model, cfg)
        freeze(model, cfg)
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    heads = getattr(text, "num_attention_heads", 1)
    kv_hidden = hidden * getattr(text, "num_key_value_heads", heads) // heads
    return Shape(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), largest,
                 text.num_hidden_layers, hidden, kv_hidden, getattr(text, "intermediate_size", 4 * hidden),
                 text.vocab_size)


def model_state_bytes(shape: Shape, strategy: str, world: int, bf16: bool, lora_bf16_base: bool) -> dict:
    """Per-GPU bytes of weights, gradients and optimizer state; host bytes (ZeRO-3 offload)."""
    p, t = shape.parameters, shape.trainable
    frozen = p - t
    if strategy in ("ddp", "fsdp"):
        weights = (2 if lora_bf16_base else 4) * frozen + 4 * t
        states = weights + 12 * t
        return {"model_states_bytes": states // (world if strategy == "fsdp" else 1), "host_bytes": 0}
    low = 2 if bf16 else 4  # DeepSpeed's module weights and gradients
    optimizer = 12 * t  # fp32 master copy and Adam moments
    per_gpu = {"zero1": low * p + low * t + optimizer / world,
               "zero2": low * p + (low * t + optimizer) / world,
               "zero3": (low * p + low * t + optimizer) / world,
               "zero3_offload": (low * p + low * t) / world}[strategy]
    host = (optimizer + 4 * t) / world if strategy == "zero3_offload" else 0  # + fp32 gradients on the host
    return {"model_states_bytes": int(per_gpu), "host_bytes": int(host)}


def activation_bytes(shape: Shape, tokens: int, bf16: bool, checkpointing: bool) -> int:
    per_layer_token = 7 * shape.hidden + 2 * shape.kv_hidden + 4 * shape.intermediate
    width = 2 if bf16 else 4
    if checkpointing:
        return width * tokens * (shape.layers * shape.hidden + per_layer_token)
    return width * tokens * shape.layers * per_layer_token


def logits_bytes(shape: Shape, tokens: int, bf16: bool, task: str) -> int:
    return tokens * shape.vocab * ((2 if bf16 else 4) + 8) if task == "causal_lm" else 0


def checkpoint_bytes(shape: Shape, strategy: str, bf16: bool) -> int:
    """On disk: the weights as the engine keeps them and the optimizer state (all ranks together)."""
    p, t = shape.parameters, shape.trainable
    if strategy in ("ddp", "fsdp"):
        return 4 * p + 8 * t
    return (2 if bf16 else 4) * p + 12 * t


def strategy_table(cfg: RunConfig, shape: Shape, world: int) -> dict[str, dict[str, int]]:
    bf16 = cfg.train.precision == "bf16"
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
    lora_bf16 = bf16 and cfg.model.lora is not None
    table = {}
    for strategy in STRATEGIES:
        row = model_state_bytes(shape, strategy, world, bf16, lora_bf16)
        row["activations_bytes"] = activation_bytes(shape, tokens, bf16, cfg.train.activation_checkpointing)
        row["activations_checkpointed_bytes"] = activation_bytes(shape, tokens, bf16, True)
        row["activations_full_bytes"] = activation_bytes(shape, tokens, bf16, False)
        row["logits_bytes"] = logits_bytes(shape, tokens, bf16, cfg.model.task)
        row["total_bytes"] = row["model_states_bytes"] + row["activations_bytes"] + row["logits_bytes"]
        row["checkpoint_bytes"] = checkpoint_bytes(shape, strategy, bf16)
        table[strategy] = row
    return table


def deepspeed_estimates(shape: Shape, nproc: int, nodes: int) -> dict[str, int]:
    """DeepSpeed's own model-state estimators (they count fp32 gradient buffers its bf16 optimizer here
    does not keep, hence higher), or nothing where DeepSpeed is not installed."""
    try:
        from pipeline.distributed import prepare_accelerator_env

        prepare_accelerator_env()
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return {}
    p, largest = shape.parameters, shape.largest_layer
    return {"zero2": estimate_zero2_model_states_mem_needs(p, nproc, nodes, cpu_offload=False)[1],
            "zero3": estimate_zero3_model_states_mem_needs(p, largest, nproc, nodes, cpu_offload=False,
                                                           cpu_offload_params=False)[1],
            "zero3_offload": estimate_zero3_model_states_mem_needs(p, largest, nproc, nodes, cpu_offload=True,
                                                                   cpu_offload_params=False)[1]}


def recommend(cfg: RunConfig, shape: Shape, world: int, gpu_bytes: float | None) -> dict[str, Any] | None:
    """The first strategy (least communication first) and largest micro batch, without activation
    checkpointing if possible, that fits HEADROOM of a GPU; None without launch.gpu_memory_gb."""
    if gpu_bytes is None:
        return None
    for checkpointing in (False, True):
        for micro in _halvings(cfg.train.micro_batch_size):
            train = cfg.train.model_copy(update={"micro_batch_size": micro,
                                                 "activation_checkpointing": checkpointing})
            table = strategy_table(cfg.model_copy(update={"train": train}), shape, world)
            for strategy in PREFERENCE:
                if table[strategy]["total_bytes"] <= HEADROOM * gpu_bytes:
                    return {"strategy": strategy, "micro_batch_size": micro,
                            "activation_checkpointing": checkpointing,
                            "total_bytes": table[strategy]["total_bytes"]}
    return {"strategy": None, "reason": "no strategy fits even at micro batch 1 with activation "
            "checkpointing; use more GPUs, LoRA (model.lora) or a shorter data.max_seq_len"}


def _halvings(value: int) -> list[int]:
    out = [value]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def footprint(cfg: RunConfig, rows: int | None = None,
              measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `ftpipe plan` shows. rows: training rows when tokenize is done; measured: a finished run's
    train manifest of the same model (tokens_per_second, world_size) for a time estimate."""
    launch = cfg.launch
    world = launch.nnodes * launch.nproc_per_node
    shape = model_shape(cfg)
    global_batch = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.train.grad_accum * world
    steps_per_epoch = rows // global_batch if rows is not None else None
    gpu_gb = getattr(launch, "gpu_memory_gb", None)
    return {"parameters": {"total": shape.parameters, "trainable": shape.trainable,
                           "frozen": shape.parameters - shape.trainable, "largest_layer": shape.largest_layer,
                           "lora": cfg.model.lora is not None},
            "world_size": world, "global_batch": global_batch,
            "tokens_per_step": global_batch * cfg.data.max_seq_len, "steps_per_epoch": steps_per_epoch,
            "strategies": strategy_table(cfg, shape, world),
            "deepspeed_estimates": deepspeed_estimates(shape, launch.nproc_per_node, launch.nnodes),
            "recommendation": recommend(cfg, shape, world, gpu_gb * 2**30 if gpu_gb else None),
            "time": _time(cfg, steps_per_epoch, global_batch, world, measured), "shape": asdict(shape)}


def _time(cfg: RunConfig, steps_per_epoch: int | None, global_batch: int, world: int,
          measured: dict[str, Any] | None) -> dict[str, Any] | None:
    if not measured or not measured.get("tokens_per_second"):
        return None
    steps = cfg.train.max_steps or (int(cfg.train.epochs * steps_per_epoch) if steps_per_epoch else None)
    if steps is None:
        return None
    # Tokens per sample as that run trained them; throughput scaled to this world size.
    per_sample = measured["tokens_trained"] / max(1, measured["samples"])
    rate = measured["tokens_per_second"] * world / max(1, measured.get("world_size", 1))
    return {"from_run": measured.get("run"), "steps": steps, "tokens_per_second": rate,
            "seconds": steps * global_batch * per_sample / rate}


def finished_run(cfg: RunConfig) -> dict[str, Any] | None:
    """The train manifest of the latest finished run in output_dir that trained the same model."""
    import yaml

    from pipeline.run_dir import RunDir

    found = []
    root = Path(cfg.output_dir)
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        run = RunDir(folder)
        manifest = run.read_manifest("train") if run.config_file.is_file() else None
        if manifest is None or not manifest.get("tokens_per_second"):
            continue
        try:
            model = (yaml.safe_load(run.config_file.read_text()) or {}).get("model", {}).get("name_or_path")
        except (OSError, yaml.YAMLError):
            continue
        if model == cfg.model.name_or_path:
            found.append((run.manifest_path("train").stat().st_mtime, {**manifest, "run": folder.name}))
    return max(found, key=lambda item: item[0])[1] if found else None


def _size(value: float) -> str:
    """Bytes with a binary unit: 1.50G, 340.0M, 12.0K."""
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}" if unit == "G" else f"{value / scale:.1f}{unit}"
    return f"{value:.0f}B"


def _count(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def format_footprint(cfg: RunConfig, plan: dict[str, Any]) -> str:
    params, lines = plan["parameters"], []
    steps = plan["steps_per_epoch"] if plan["steps_per_epoch"] is not None else "? (tokenize not run)"
    lines.append(f"model: {_count(params['total'])} parameters, {_count(params['trainable'])} trainable"
                 f"{' (LoRA)' if params['lora'] else ''}; world size {plan['world_size']}, global batch "
                 f"{plan['global_batch']}, {plan['tokens_per_step']} tokens/step (at most), "
                 f"steps/epoch {steps}")
    lines.append(f"per GPU, at micro batch {cfg.train.micro_batch_size} x {cfg.data.max_seq_len} "
                 f"tokens, {cfg.train.precision}, activation checkpointing "
                 f"{'on' if cfg.train.activation_checkpointing else 'off'}:")
    lines.append(f"  {'strategy':<14}{'states':>8}{'activ.':>8}{'(ckpt)':>8}{'logits':>8}{'total':>8}"
                 f"{'host':>8}{'ckpt disk':>10}{'DeepSpeed est.':>15}")
    for name, row in plan["strategies"].items():
        ds = plan["deepspeed_estimates"].get(name)
        lines.append(f"  {name:<14}{_size(row['model_states_bytes']):>8}{_size(row['activations_bytes']):>8}"
                     f"{_size(row['activations_checkpointed_bytes']):>8}{_size(row['logits_bytes']):>8}"
                     f"{_size(row['total_bytes']):>8}{_size(row['host_bytes']):>8}"
                     f"{_size(row['checkpoint_bytes']):>10}{_size(ds) if ds else '-':>15}")
    lines.append(_recommendation_line(cfg, plan["recommendation"]))
    if plan["time"]:
        t = plan["time"]
        lines.append(f"time: ~{t['seconds'] / 3600:.2f} h for {t['steps']} steps at "
                     f"{t['tokens_per_second']:.0f} tokens/s (measured by run {t['from_run']}, scaled to "
                     f"world size {plan['world_size']})")
    return "\n".join(lines)


def _recommendation_line(cfg: RunConfig, rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "recommendation: set launch.gpu_memory_gb (GiB per GPU) for one"
    if rec["strategy"] is None:
        return f"recommendation: none fits {cfg.launch.gpu_memory_gb} GiB: {rec['reason']}"
    checkpointing = "on" if rec["activation_checkpointing"] else "off"
    return (f"recommendation for {cfg.launch.gpu_memory_gb} GiB per GPU: {rec['strategy']}, micro batch "
            f"{rec['micro_batch_size']}, activation checkpointing {checkpointing} "
            f"({_size(rec['total_bytes'])} per GPU)")
