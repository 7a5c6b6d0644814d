"""Reading pickles from a run directory without running code someone else put there.

A pickle can name any importable function and call it while loading. Where we read pickles ourselves
(DeepSpeed checkpoint files in consolidate) only torch's weights_only allowlist gets through;
where only a library can read a format and it unpickles without such a list (the `.metadata` of a
DCP checkpoint, DeepSpeed's own loader on resume), the files must belong to this user and be
writable by nobody else: whoever could plant a payload there could already run code as this user.
"""

from __future__ import annotations

import functools
import os
import pickle
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.errors import UserError

_FOREIGN_WRITE = stat.S_IWGRP | stat.S_IWOTH


class Opaque:
    """Stands in for a DeepSpeed class inside a checkpoint pickle: never imported, never run.

    Unpickling the real classes imports all of DeepSpeed (seconds) for objects we never read, and
    would run their code; an int-valued enum member (ZeroStageEnum) comes back as its plain value.
    """

    def __new__(cls, *args: Any) -> Any:
        if len(args) == 1 and isinstance(args[0], (int, str)):
            return args[0]
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.state = state


@functools.cache
def _allowed_globals() -> dict[str, Any]:
    # torch's own weights_only list: tensor/parameter rebuild functions, storages, dtypes, torch.Size,
    # OrderedDict, a few plain builtins; nothing that reaches the system.
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


class AllowlistUnpickler(pickle.Unpickler):
    """Lets through torch's weights_only globals and DeepSpeed's classes (as Opaque); refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "deepspeed":
            return Opaque
        found = _allowed_globals().get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a tensor or plain data")
        return found


# What torch.load(pickle_module=...) needs of a pickle module.
allowlist_pickle = SimpleNamespace(Unpickler=AllowlistUnpickler, load=pickle.load, __name__="pickle")


def refusal(err: Exception) -> str:
    """The line of torch's long weights_only message that names what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)


def refuse_untrusted(folder: Path) -> None:
    """UserError naming the first file under `folder` owned by another user or writable by group/others."""
    me = os.geteuid()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        info = path.stat()
        if info.st_uid != me:
            raise UserError(f"{path}: owned by uid {info.st_uid}, not by you (uid {me}); ftpipe loads this "
                            "file by unpickling, which can run code, so it refuses (see docs/checkpoints.md)")
        if info.st_mode & _FOREIGN_WRITE:
            mode = stat.filemode(info.st_mode)
            raise UserError(f"{path}: writable by group or others (mode {mode}); ftpipe loads this file "
                            "by unpickling, which can run code, so it refuses; `chmod go-w` it "
                            "if you trust it (see docs/checkpoints.md)")


def make_private(folder: Path) -> None:
    """Drop group/other write from every file under `folder` (a umask of 002 would leave it), so that
    refuse_untrusted accepts what we wrote ourselves."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode
            if mode & _FOREIGN_WRITE:
                path.chmod(stat.S_IMODE(mode) & ~_FOREIGN_WRITE)
