"""Label names for classification: data.labels, or the set inferred from the training split.

A dataset source whose label column is a datasets ClassLabel declares its names (in its id order).
Otherwise inference is a first pass over every data.train source (every row, `limit` not applied) that
collects the distinct values of data.label_field. Each source's values are cached in
`shard/label_scan/NNNNN.json` under the source's fingerprint, written atomically, so a rerun, a
resumed run or each SLURM array task rescans only what changed, and tasks racing on one source
write the same file. The merge is sorted, hence the same in any order and with any worker count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import MAX_LABELS, RunConfig
from pipeline.digests import fingerprint
from pipeline.errors import UserError
from pipeline.hf_sources import class_label_names
from pipeline.readers import read_source
from pipeline.run_dir import RunDir, atomic_write_json
from pipeline.sources import SourceFile, source_key

SCAN_VERSION = 1


def shard_labels(cfg: RunConfig, run_dir: RunDir, sources: list[SourceFile],
                 digests: list[Any]) -> list[str] | None:
    """The label names in id order (data.labels, a ClassLabel's, else inferred), or None: rows give
    indices below model.num_labels. Rows then give a name or an index, as with data.labels."""
    if cfg.data.format != "classification":
        return None
    if cfg.data.labels:
        return list(cfg.data.labels)
    declared = declared_labels(cfg, [s for s in sources if s.held_out is not True])
    if declared is not None:
        return checked_count(declared, cfg)
    folder = run_dir.stage("shard") / "label_scan"
    values: set[int | str] = set()
    for index, (source, digest) in enumerate(zip(sources, digests)):
        if source.held_out is not True:
            values.update(_scanned(cfg, source, digest, folder / f"{index:05d}.json"))
    return infer_labels(values, cfg)


def declared_labels(cfg: RunConfig, sources: list[SourceFile]) -> list[str] | None:
    """The names of the training datasets' ClassLabel label column, when they have one."""
    found = {tuple(names) for s in sources if s.dataset
             and (names := class_label_names(s.dataset, cfg.data.label_field)) is not None}
    if len(found) > 1:
        raise UserError(f"data.train: the datasets' ClassLabel names of '{cfg.data.label_field}' differ "
                        f"({' vs '.join(map(str, sorted(found)))}); set data.labels")
    return list(found.pop()) if found else None


def infer_labels(values: set[int | str], cfg: RunConfig) -> list[str] | None:
    """The sorted names, or None where rows give indices below model.num_labels (it is set and some
    labels are integers). Integers are indices, as with data.labels: alone and without
    model.num_labels, indices 0..max named by their number."""
    indices = [value for value in values if _is_index(value)]
    if cfg.model.num_labels is not None and indices:
        return None
    if len(indices) == len(values):
        names = [str(i) for i in range(max((int(v) for v in indices), default=-1) + 1)]
    else:
        names = sorted({value for value in values if not _is_index(value)})
    return checked_count(names, cfg)


def checked_count(names: list[str], cfg: RunConfig) -> list[str]:
    """The names, if they are two or more and as many as model.num_labels says."""
    num, field = cfg.model.num_labels, cfg.data.label_field
    if len(names) < 2:
        raise UserError(f"data.train: field '{field}' has {len(names)} label(s) ({', '.join(names)}); "
                        "classification needs two or more: check data.label_field or set data.labels")
    if num is not None and num != len(names):
        raise UserError(f"model.num_labels is {num} but data.train has {len(names)} labels in field "
                        f"'{field}' ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); "
                        "set data.labels or fix model.num_labels")
    return names


def _is_index(value: int | str) -> bool:
    return isinstance(value, int) or value.strip().lstrip("-").isdigit()


def _scanned(cfg: RunConfig, source: SourceFile, digest: Any, cache: Path) -> list[int | str]:
    """The source's distinct label values, from its cache file when that matches the source."""
    key = fingerprint({"source": source.name, "digest": digest, "label_field": cfg.data.label_field,
                       "text_field": cfg.data.text_field, "version": SCAN_VERSION})
    try:
        record = json.loads(cache.read_text())
        if record.get("fingerprint") == key:
            return record["values"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    values = sorted(scan(cfg, source), key=lambda v: (isinstance(v, str), v))
    if cache.parents[2].is_dir():  # planning alone (status, validate) creates no run directory
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"fingerprint": key, "source": source.name, "values": values})
    return values


def scan(cfg: RunConfig, source: SourceFile) -> set[int | str]:
    """Distinct label values of one source (bools, nulls and empty strings left to the row checks)."""
    field, values = cfg.data.label_field, set()
    for item in read_source(source, cfg.data):
        value = (item.row or {}).get(field)
        if isinstance(value, (int, str)) and not isinstance(value, bool) and value != "":
            values.add(value)
            if len(values) > MAX_LABELS:
                raise UserError(f"{source_key(source)}: {source.name}: more than {MAX_LABELS} distinct "
                                f"values in field '{field}'; is data.label_field the label?")
    return values
