"""What the CLI loads: commands that never train skip torch and transformers, and DeepSpeed still gets
its accelerator chosen before it is first imported."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.process import reporting_errors
from tests.helpers import ftpipe_imports

REPO = Path(__file__).resolve().parents[3]


def _python(code: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "TRANSFORMERS_VERBOSITY")}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_validate_imports_neither_torch_nor_transformers(write_cfg):
    assert ftpipe_imports("validate", write_cfg()) == {"torch": False, "transformers": False}


def test_deepspeed_gets_its_accelerator_before_its_first_import():
    seen = _python("import json, os\nfrom launch.process import quiet_libraries\nquiet_libraries()\n"
                   "before = os.environ.get('DS_ACCELERATOR')\nimport deepspeed, torch\n"
                   "print(json.dumps({'before': before, 'after': os.environ.get('DS_ACCELERATOR'), "
                   "'cuda': torch.cuda.is_available(), "
                   "'device': deepspeed.get_accelerator().device_name()}))")
    assert seen["before"] is None
    if not seen["cuda"]:  # this is what needs the hook: DeepSpeed on a machine without CUDA
        assert seen["after"] == "cpu" and seen["device"] == "cpu"


def test_transformers_is_quiet_whether_imported_before_or_after():
    for first in ("", "import transformers\n"):
        level = _python(first + "import json\nfrom launch.process import quiet_libraries\nquiet_libraries()\n"
                        "from transformers.utils import logging\n"
                        "print(json.dumps([logging.get_verbosity(), logging.is_progress_bar_enabled()]))")
        assert level == [40, False], first  # 40: logging.ERROR


@pytest.mark.parametrize("error,line", [
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x/config.yaml"),
     "ftpipe: error: /runs/x/config.yaml: Permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/runs/x"),
     "ftpipe: error: /runs/x: Read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"),
     "ftpipe: error: No space left on device (the system did not say on which file)"),
])
def test_an_os_error_is_one_line_and_exit_2(capsys, error, line):
    seen = []

    def command() -> int:
        raise error

    assert reporting_errors(command, seen.append) == 2
    assert capsys.readouterr().err == line + "\n"
    assert [str(e) for e in seen] == [line.removeprefix("ftpipe: error: ")]  # a worker leaves it too
