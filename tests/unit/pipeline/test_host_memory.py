"""keep_freed_memory: a training process on the CPU stops paying page faults for the blocks every
step frees and allocates again. Each case runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

STEPS = """
import json, resource, sys, torch
from pipeline.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():  # a step's worth of large blocks: allocated, written, freed
    blocks = [torch.ones(16 << 20) for _ in range(4)]  # 4 x 64 MiB, as a chunk of logits
    del blocks
for _ in range(3):  # the heap grows to the step's size first
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steps_after_the_first_reuse_their_memory_without_page_faults():
    default, kept = faults("default"), faults("keep")
    assert kept["kept"] is True
    # 5 steps x 256 MiB: 327,680 pages when every block is mapped afresh (glibc maps any block over
    # 32 MiB on its own and unmaps it when freed)
    assert default["faults"] > 300_000, default
    assert kept["faults"] < default["faults"] / 20, kept
