"""The work of the GPU check (benchmarks/gpu.py): the model and data it builds, the bf16 matmul peak,
one train (+ evaluate) run through `ftpipe run`, and the packed-vs-unpacked loss check.

Each function here runs in one process (on the GPU, a child of gpu.py per run, so that a crash or a
hang costs one run and the CUDA memory peaks are the run's own); it returns a JSON-able dict.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import gpu_report
from tests import fixtures

# A 0.5B-class Llama (503M parameters, tied embeddings; head_dim 128 as flash kernels like) and a tiny
# one for --cpu-smoke. The model's vocabulary is larger than the tiny tokenizer's: rows it never uses
# still cost their lm_head FLOPs, as a real 32k vocabulary would.
SIZES = {
    "0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 18,
             "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
}
PACKED_ROWS_CHECKED = 4  # packed rows whose examples the loss check scores both ways
NOT_ON_DEVICE = ("mlflow", "deepspeed", "datasets", "submitit")  # missing on the GPU machine, not carried


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(folder: Path, size: str, max_len: int) -> dict[str, Any]:
    """config.json, the tests' tiny tokenizer and random-init bf16 safetensors weights; no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = fixtures.tiny_bpe_tokenizer()
    config = LlamaConfig(**SIZES[size], max_position_embeddings=max_len, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device()):  # random init on the GPU takes a second, on the host ten
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shape = gpu_report.model_shape(model)
    del model
    if device() == "cuda":
        torch.cuda.empty_cache()
    return shape


def scratch_folder(need_gib: float) -> Path:
    """A new folder for models, data and runs: in /dev/shm (memory) when it has room, since every
    run ends with a checkpoint written and fsynced, which on a VM's disk can take longer than training."""
    shm = Path("/dev/shm")
    free = shutil.disk_usage(shm).free / 2**30 if shm.is_dir() else 0.0
    return Path(tempfile.mkdtemp(prefix="ftpipe-gpu-check-", dir=shm if free >= need_gib else None))


def write_documents(path: Path, tokens: int, max_len: int, seed: int = 0) -> Path:
    """Text rows of many lengths (a few words up to 0.6 max_len tokens; about 3 per packed row) for
    `tokens` tokens or so: packing then mixes short and long examples, as fine-tuning sets do."""
    rng = random.Random(seed)
    words_per_token = 0.35  # the tiny BPE's rate on these words, measured
    rows, total = [], 0
    while total < tokens:
        words = rng.randint(8, int(max_len * words_per_token * 0.6))
        rows.append({"text": " ".join(fixtures.sentences(words // 9 + 1, seed=rng.randrange(10**9)))})
        total += int(words / words_per_token)
    return fixtures.write_jsonl(path, rows)


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The run config of one variant: the tests' causal-LM settings at this size and backend."""
    from pipeline.config import EvaluateConfig, TrainConfig

    train = {"strategy": spec["strategy"], "max_steps": spec["steps"],
             "micro_batch_size": spec["micro_batch"], "lr": 1e-4, "precision": spec["precision"],
             "checkpoint_every": 10**6, "keep_last": 1, "seed": 0}
    evaluate: dict[str, Any] = {"batch_size": spec["micro_batch"], "num_generations": 2, "max_new_tokens": 16}
    if "device" in TrainConfig.model_fields:  # train.device (issue 14 section 3), once it lands
        train["device"] = device()
    if "max_rows" in EvaluateConfig.model_fields:  # evaluate.max_rows (section 2), once it lands
        evaluate["max_rows"] = spec["eval_rows"]
    data = {"train": [spec["data"]], "format": "text", "eval_fraction": spec["eval_fraction"],
            "num_shards": 2, "max_seq_len": spec["max_len"], "packing": spec["packed"]}
    return {"name": spec["name"], "output_dir": spec["output_dir"], "data": data, "train": train,
            "model": {"name_or_path": spec["model"], "attn_implementation": spec["attn"]},
            "evaluate": evaluate, "tracking": {"enabled": False}}


def ftpipe_run(config: Path, stages: str) -> None:
    """`ftpipe run CONFIG --stages STAGES`, in this process (so its CUDA memory peaks are ours to read)."""
    from launch.cli import main

    code = main(["run", str(config), "--stages", stages, "--no-progress"])
    if code:
        raise RuntimeError(f"ftpipe run --stages {stages} exited with {code} (its error is printed above)")


def cuda_peaks() -> dict[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def reset_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def train_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """shard, tokenize and train through `ftpipe run`; then consolidate + evaluate when asked."""
    from pipeline.run_dir import RunDir

    config = Path(spec["output_dir"]) / f"{spec['name']}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(run_config(spec), sort_keys=False))
    run_dir = RunDir(Path(spec["output_dir"]) / spec["name"])
    ftpipe_run(config, "shard,tokenize")
    reset_peaks()
    ftpipe_run(config, "train")
    result = {**gpu_report.train_figures(run_dir, spec), **cuda_peaks()}
    if spec.get("evaluate"):
        result["evaluate"] = evaluate_variant(config, run_dir)
    # The check's own scratch: a 0.5B run's checkpoint (weights + AdamW state) is 6 GB.
    shutil.rmtree(run_dir.stage("train") / "checkpoints")
    return result


def evaluate_variant(config: Path, run_dir) -> dict[str, Any]:
    """consolidate + evaluate; the evaluate stage ran on the GPU if it allocated CUDA memory."""
    ftpipe_run(config, "consolidate")
    reset_peaks()
    started = time.perf_counter()
    ftpipe_run(config, "evaluate")
    seconds = time.perf_counter() - started
    peaks = cuda_peaks()
    metrics = json.loads(run_dir.metrics_file.read_text())
    return {"seconds": round(seconds, 2), "device": "cuda" if peaks["peak_allocated_gib"] else "cpu",
            **{k: metrics[k] for k in ("loss", "perplexity", "eval_tokens")}, **peaks}


def loss_check(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The same examples scored packed (restarted position_ids) and unpacked (one per row, padded)
    through the loop's objective, for each backend and precision: the mean losses must agree."""
    from pipeline.tokenized import open_split

    run_dir = Path(spec["tokenized_run"])
    table = open_split(run_dir / "tokenize" / "train").slice(0, PACKED_ROWS_CHECKED)
    pad_id = json.loads((run_dir / "tokenize" / "manifest.json").read_text())["pad_token_id"]
    results = []
    for attn, precision, tolerance in spec["checks"]:
        found: dict[str, Any] = {"attn": attn, "precision": precision, "tolerance": tolerance}
        started = time.perf_counter()
        try:
            packed, unpacked = _both_losses(spec["model"], attn, precision, table, pad_id,
                                            spec["micro_batch"])
        except Exception as err:  # noqa: BLE001 - one backend failing must not hide the others' results
            found["error"] = f"{type(err).__name__}: {err}"[:300]
        else:
            relative = abs(packed - unpacked) / abs(unpacked)
            found.update(packed_loss=packed, unpacked_loss=unpacked, relative_difference=relative,
                         equal=relative <= tolerance)
        results.append({**found, "seconds": round(time.perf_counter() - started, 1)})
        if spec.get("partial"):  # what is done so far survives a timeout (flex_attention compiles)
            Path(spec["partial"]).write_text(json.dumps(results))
    return results


def _both_losses(model_dir: str, attn: str, precision: str, table, pad_id: int,
                 micro_batch: int) -> tuple[float, float]:
    """Mean loss per target of the packed rows in one batch, and of their examples one per row."""
    import contextlib

    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import load_model
    from pipeline.train.data import collate, collate_table

    model = load_model(ModelConfig(name_or_path=model_dir, attn_implementation=attn)).to(device()).eval()
    cast = (torch.autocast(device_type=device(), dtype=torch.bfloat16) if precision == "bf16"
            else contextlib.nullcontext())
    ids, lens = table.column("input_ids").to_pylist(), table.column("seq_lens").to_pylist()
    examples = [row[sum(ls[:i]): sum(ls[: i + 1])] for row, ls in zip(ids, lens) for i in range(len(ls))]
    unpacked = [collate(examples[i: i + micro_batch], pad_id) for i in range(0, len(examples), micro_batch)]
    with torch.no_grad(), cast:
        means = [_mean_loss(model, [collate_table(table, pad_id)]), _mean_loss(model, unpacked)]
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return means[0], means[1]


def _mean_loss(model, batches: list[dict[str, Any]]) -> float:
    import torch

    from pipeline.train.objective import summed_loss

    loss, targets = 0.0, 0
    for batch in batches:
        on_device = {k: v.to(device()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss += float(summed_loss(model, on_device, "causal_lm"))
        targets += int((batch["labels"][:, 1:] != -100).sum())
    return loss / targets


def matmul_peak(size: int, dtype_name: str, repeats: int = 5, per_timing: int = 10) -> dict[str, Any]:
    """The best of `repeats` timings of `per_timing` size^3 matrix products (after warm-up): the
    ceiling MFU is measured against, on this very machine."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device(), dtype=dtype)
    b = torch.randn(size, size, device=device(), dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        _sync()
        best = min(best, (time.perf_counter() - started) / per_timing)
    del a, b
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"size": size, "dtype": dtype_name, "flops_per_second": 2 * size**3 / best,
            "tflops": round(2 * size**3 / best / 1e12, 2)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def imported_but_missing_on_device() -> list[str]:
    """Packages absent on the GPU machine (and not carried) that this process imported: must be none."""
    import sys

    return [name for name in NOT_ON_DEVICE if sys.modules.get(name) is not None]
