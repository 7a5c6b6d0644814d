"""Consolidation from every checkpoint format, built for real: plain torch, FSDP2 + DCP (1 and 2
ranks), DeepSpeed ZeRO-1/2/3 (2 ranks, gloo); LoRA merged and as an adapter; sharded output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import consolidate, hf_writer
from pipeline.checkpoint_readers import clean_name, open_checkpoint
from pipeline.run_dir import atomic_write_json
from tests import fixtures
from tests.consolidate_runs import peft_model, reloaded_logits, save_torch, save_verify, trained_stage

# Its fixture trains every strategy under torchrun, with one and with two ranks.
pytestmark = pytest.mark.multirank

WORKER = textwrap.dedent('''
    """Train a tiny Llama one step per strategy under torchrun and save each checkpoint."""
    import json, os, sys
    from pathlib import Path
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    MODEL, OUT, MODES = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")

    def batch():
        ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        return {"input_ids": ids, "labels": ids}

    def fresh(freeze=False):
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        if freeze:  # a frozen parameter takes another path through each format
            model.model.norm.weight.requires_grad_(False)
        return model

    def meta(folder, fmt):
        if dist.get_rank() == 0:
            info = {"format": fmt, "world_size": dist.get_world_size()}
            (folder / "meta.json").write_text(json.dumps(info))

    def fsdp(folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        from torch.distributed.fsdp import fully_shard
        model = fresh()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(**batch()).loss.backward()
        opt.step()
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(folder / "dcp"))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            torch.save(full, folder / "expected.pt")
        meta(folder, "dcp")

    def zero(folder, stage, bf16):
        import deepspeed
        model = fresh(freeze=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "bf16": {"enabled": bf16}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        engine.backward(engine(**batch()).loss)
        engine.step()
        engine.save_checkpoint(str(folder), tag="deepspeed")
        meta(folder, "deepspeed")

    dist.init_process_group("gloo")
    for mode in MODES:
        folder = OUT / mode
        folder.mkdir(parents=True, exist_ok=True)
        fsdp(folder) if mode == "fsdp" else zero(folder, int(mode[4]), mode.endswith("bf16"))
        dist.barrier()
    dist.destroy_process_group()
''')


def _torchrun(script: Path, ranks: int, *args: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={ranks}", str(script), *args],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama) -> Path:
    """FSDP2 on 1 and 2 ranks, ZeRO-1/2/3 (and bf16 ZeRO-1/3) on 2: two launches for the module."""
    root = tmp_path_factory.mktemp("checkpoints")
    script = root / "worker.py"
    script.write_text(WORKER)
    _torchrun(script, 2, str(tiny_llama), str(root / "two"), "fsdp,zero1,zero2,zero3,zero1-bf16,zero3-bf16")
    _torchrun(script, 1, str(tiny_llama), str(root / "one"), "fsdp")
    return root


def _assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def _state_keys(model_dir: Path) -> set[str]:
    return set(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


def test_clean_name_strips_wrappers():
    assert clean_name("module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert clean_name("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    peft_key = "base_model.model.score.modules_to_save.default.weight"
    assert clean_name(peft_key) == peft_key


def test_torch_reader_streams_model_pt_with_wrapper_prefixes(tmp_path, tiny_llama):
    state = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, tmp_path / "model.pt")
    atomic_write_json(tmp_path / "meta.json", {"format": "torch", "world_size": 1})
    _assert_equal(dict(open_checkpoint(tmp_path).items()), state)


@pytest.mark.parametrize("ranks", ["one", "two"])
def test_dcp_reader_equals_the_full_state_dict(checkpoints, ranks):
    folder = checkpoints / ranks / "fsdp"
    _assert_equal(dict(open_checkpoint(folder).items()), torch.load(folder / "expected.pt"))


@pytest.mark.parametrize("stage", ["1", "2", "3", "1-bf16", "3-bf16"])
def test_deepspeed_reader_equals_zero_to_fp32(checkpoints, tiny_llama, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = checkpoints / "two" / f"zero{stage}"
    got = dict(open_checkpoint(folder).items())
    expected = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")
    # With bf16 it leaves frozen ZeRO-3 parameters in bf16; ours are all fp32 (exact upcast).
    expected = {k: v.float() if v.is_floating_point() else v for k, v in expected.items()}
    # ZeRO-1 lists no frozen parameters; ours still finds them, so compare on DeepSpeed's keys...
    _assert_equal({k: got[k] for k in expected}, expected)
    # ...and require the full set: every key of the model's state dict, tied lm_head included.
    assert set(got) == _state_keys(tiny_llama)



# --- the stage: run(cfg, ctx) on checkpoints in a run directory ------------------------------


def test_sharded_output_has_an_index_and_loads(tmp_path, tiny_llama, monkeypatch):
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    save_torch(model.state_dict(), step)
    save_verify(model, ctx.run_dir)
    monkeypatch.setattr(hf_writer, "SHARD_BYTES", 64 << 10)
    manifest = consolidate.run(cfg, ctx)
    out = ctx.run_dir.stage("consolidate") / "model"
    index = json.loads((out / hf_writer.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == len(manifest["weight_files"]) - 1 > 2
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as embed_tokens
    assert manifest["verify"] == "logits+weights" and manifest["verify_max_abs_diff"] == 0.0
    assert manifest["parameters"] == model.num_parameters() and (out / "tokenizer.json").is_file()


def test_zero3_checkpoint_consolidates_to_a_loadable_model(tmp_path, tiny_llama, checkpoints):
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, ctx, step = trained_stage(tmp_path, tiny_llama)
    shutil.copytree(checkpoints / "two" / "zero3", step, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(step), tag="deepspeed"))
    save_verify(model, ctx.run_dir)
    manifest = consolidate.run(cfg, ctx)
    assert manifest["format"] == "deepspeed" and manifest["weight_files"] == ["model.safetensors"]


def test_without_verify_file_every_tensor_is_compared(tmp_path, tiny_llama, checkpoints):
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama)
    import shutil

    shutil.copytree(checkpoints / "two" / "fsdp", step, dirs_exist_ok=True)
    manifest = consolidate.run(cfg, ctx)
    assert manifest["verify"] == "weights+forward" and manifest["verify_max_abs_weight_diff"] == 0.0


def test_a_corrupted_write_is_refused_and_nothing_published(tmp_path, tiny_llama, monkeypatch):
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    save_torch(model.state_dict(), step)
    save_verify(model, ctx.run_dir)
    real_add = hf_writer.ShardedSafetensorsWriter.add

    def corrupt(self, name, tensor):
        real_add(self, name, tensor + 1e-3 if name == "model.norm.weight" else tensor)

    monkeypatch.setattr(hf_writer.ShardedSafetensorsWriter, "add", corrupt)
    with pytest.raises(RuntimeError, match="differs from the checkpoint"):
        consolidate.run(cfg, ctx)
    assert not (ctx.run_dir.stage("consolidate") / "model").exists()


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_lora_merge_matches_peft_merge_and_unload(tmp_path, tiny_llama, task):
    lora = {"r": 4, "alpha": 8.0, "target_modules": "all-linear", "merge": True}
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama, task, lora=lora)
    model = peft_model(tiny_llama, task)
    save_torch(model.state_dict(), step)
    save_verify(model, ctx.run_dir)
    manifest = consolidate.run(cfg, ctx)
    merged = model.merge_and_unload().eval()
    saved = torch.load(ctx.run_dir.stage("train") / "verify.pt")
    with torch.no_grad():
        expected = merged(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    torch.testing.assert_close(reloaded_logits(cfg, ctx), expected, atol=1e-5, rtol=0)
    assert manifest["mode"] == "full" and manifest["parameters"] == merged.num_parameters()


def test_lora_adapter_directory_loads_with_peft(tmp_path, tiny_llama):
    lora = {"r": 4, "alpha": 8.0, "target_modules": "all-linear", "merge": False}
    cfg, ctx, step = trained_stage(tmp_path, tiny_llama, "sequence_classification", lora=lora)
    model = peft_model(tiny_llama, "sequence_classification")
    save_torch(model.state_dict(), step)
    expected = save_verify(model, ctx.run_dir)
    manifest = consolidate.run(cfg, ctx)
    out = ctx.run_dir.stage("consolidate") / "model"
    assert manifest["mode"] == "adapter" and manifest["weight_files"] == ["adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama)
    torch.testing.assert_close(reloaded_logits(cfg, ctx), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("merge", [True, False])
def test_lora_run_end_to_end_through_evaluate(tmp_path, tiny_llama, text_data, merge):
    from tests.helpers import ftpipe, manifest

    lora = {"r": 4, "alpha": 8.0, "merge": merge}
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data)
    cfg["model"]["lora"] = lora
    assert ftpipe("run", fixtures.write_config(tmp_path / "lora.yaml", cfg), "--no-progress") == 0
    run = tmp_path / "runs" / "lm"
    assert manifest(run, "consolidate")["mode"] == ("full" if merge else "adapter")
    assert manifest(run, "consolidate")["verify"] == "logits+weights"
    assert json.loads((run / "evaluate" / "metrics.json").read_text())["perplexity"] > 1
