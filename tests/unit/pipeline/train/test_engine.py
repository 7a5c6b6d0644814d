"""Every strategy's engine satisfies TrainEngine, the one interface the loop and checkpoints use."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline import distributed
from pipeline.config import validate_config
from pipeline.train.build import build_engine
from pipeline.train.ds_engine import DeepSpeedEngine
from pipeline.train.engine import DDPEngine, SingleEngine, TrainEngine, lr_factor
from pipeline.train.fsdp import FSDPEngine
from tests.fixtures import causal_config
from tests.helpers import REPO

# Read from the Protocol itself, so that a member added there is checked in every engine too.
ATTRIBUTES = sorted(TrainEngine.__annotations__)  # set on instances (in __init__)
METHODS = sorted(name for name, value in vars(TrainEngine).items()
                 if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)))


def _config(tmp_path: Path, model: Path, **train):
    return validate_config(causal_config(tmp_path, model, tmp_path / "data.jsonl", train=train))


def test_the_protocol_lists_what_the_loop_and_checkpoints_call():
    assert ATTRIBUTES == ["model"]
    assert METHODS == sorted(["device", "unwrapped", "autocast", "backward", "step", "set_lr", "save", "load",
                              "describe"])


@pytest.mark.parametrize("engine_class", [SingleEngine, DDPEngine, FSDPEngine, DeepSpeedEngine])
def test_every_engine_class_defines_every_method_with_its_parameters(engine_class):
    for name in METHODS:
        declared, defined = vars(TrainEngine)[name], inspect.getattr_static(engine_class, name, None)
        assert defined is not None, f"{engine_class.__name__} lacks {name}"
        assert isinstance(defined, property) == isinstance(declared, property), name
        if inspect.isfunction(declared):
            assert list(inspect.signature(defined).parameters) == list(inspect.signature(declared).parameters)


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_built_engines_satisfy_the_protocol(tmp_path, tiny_llama, strategy):
    cfg = _config(tmp_path, tiny_llama, strategy=strategy)
    dist = distributed.init(need_group=strategy != "single")
    try:
        engine = build_engine(cfg, dist)
        assert isinstance(engine, TrainEngine)
        assert engine.describe()["world_size"] == 1
    finally:
        distributed.shutdown()


DEEPSPEED = textwrap.dedent('''
    import json, os, shlex, sys
    from pathlib import Path
    import torch
    from pipeline import distributed
    from pipeline.config import validate_config
    from pipeline.errors import UserError
    from pipeline.train.build import build_engine
    from pipeline.train.engine import TrainEngine

    class Payload:  # unpickling it touches the marker file
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(sys.argv[3])}",)

    cfg = validate_config(json.loads(Path(sys.argv[1]).read_text()))
    engine = build_engine(cfg, distributed.init(need_group=True))
    folder = Path(sys.argv[2])
    engine.save(folder)
    engine.load(folder)  # what it wrote itself loads
    # DeepSpeed's loader unpickles anything: a file others could have written is refused first.
    target = folder / "deepspeed" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload()}, target)
    target.chmod(0o664)
    try:
        engine.load(folder)
        refused = ""
    except UserError as err:
        refused = str(err)
    print(json.dumps({"protocol": isinstance(engine, TrainEngine), **engine.describe(), "refused": refused}))
    distributed.shutdown()
''')


def test_a_built_deepspeed_engine_satisfies_the_protocol_and_refuses_foreign_files(tmp_path, tiny_llama):
    # Its own process: DeepSpeed keeps global state that must not leak into other tests.
    config, marker = tmp_path / "config.json", tmp_path / "payload-ran"
    train = {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}
    config.write_text(json.dumps(causal_config(tmp_path, tiny_llama, tmp_path / "data.jsonl", train=train)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DEEPSPEED, str(config), str(tmp_path / "step-000001"),
                           str(marker)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    described = json.loads(done.stdout.strip().splitlines()[-1])
    refused = described.pop("refused")
    assert described == {"protocol": True, "format": "deepspeed", "world_size": 1, "zero_stage": 2,
                         "tag": "deepspeed"}
    assert "mp_rank_00_model_states.pt: writable by group or others" in refused
    assert not marker.exists(), "the payload ran"


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 10, 0.2) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and lr_factor(10, 10, 0.2) == 0.0
    # The schedule follows samples: two steps of 4 samples land where one of 8 does.
    assert lr_factor(20, 40, 0.1, global_batch=4) == lr_factor(20, 40, 0.1, global_batch=8) < 1.0
    assert lr_factor(0, 40, 0.5, global_batch=4) == 0.2


def test_adamw_is_fused_where_torch_has_the_kernel_and_foreach_for_deepspeed(tmp_path, tiny_llama):
    from pipeline.train.build import pretrained
    from pipeline.train.engine import build_optimizer

    cfg = _config(tmp_path, tiny_llama)
    model = pretrained(cfg, torch.device("cpu"))
    assert build_optimizer(model, cfg.train).defaults["fused"] is True  # torch 2.13 has a CPU kernel
    client = build_optimizer(model, cfg.train, fused=False).defaults  # what DeepSpeed's ZeRO wraps
    assert client["foreach"] is True and not client["fused"]
