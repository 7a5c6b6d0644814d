"""Hugging Face datasets as sources: `{hf: NAME, subset, split, revision, data_files}` through
datasets.load_dataset (a hub name from the HF cache, or a local dataset repo folder) and
`{path: DIR}` for a save_to_disk folder. The loaded datasets are memory-mapped Arrow, read a batch
at a time; `datasets` is imported only when a run has such a source."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class DatasetRef:
    """One dataset split. kind: hf (datasets.load_dataset) or disk (datasets.load_from_disk)."""

    kind: str
    name: str
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    data_files: str | None = None  # JSON of data.*.data_files (hashable)
    entry: str = field(default="", compare=False)  # the config key, e.g. data.train[0]

    @property
    def label(self) -> str:
        """How rows and rejects name the source: hf:NAME[/SUBSET]:SPLIT[@REVISION], or the folder."""
        if self.kind == "disk":
            return f"{self.name}:{self.split}"
        subset = f"/{self.subset}" if self.subset else ""
        return f"hf:{self.name}{subset}:{self.split}" + (f"@{self.revision}" if self.revision else "")

    def record(self) -> dict[str, Any]:
        """What the shard manifest records of it (the pinned revision included)."""
        keys = ("kind", "name", "subset", "split", "revision")
        found = {key: getattr(self, key) for key in keys}
        return {**found, "data_files": json.loads(self.data_files) if self.data_files else None}


def is_saved_dataset(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and any((path / name).is_file() for name in SAVED_MARKERS)


@functools.lru_cache(maxsize=32)
def load(ref: DatasetRef) -> Any:
    """The dataset split (memory-mapped, nothing read yet); UserError naming the config key."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if ref.kind == "disk":
            return _saved_split(datasets.load_from_disk(ref.name), ref)
        files = json.loads(ref.data_files) if ref.data_files else None
        return datasets.load_dataset(ref.name, ref.subset, split=ref.split, revision=ref.revision,
                                     data_files=files)
    except UserError:
        raise
    except ConnectionError as err:
        raise UserError(f"{ref.entry}.hf: {ref.name!r} is neither a local dataset folder nor in the Hugging "
                        f"Face datasets cache ({datasets.config.HF_DATASETS_CACHE}), and the hub cannot be "
                        f"reached: {_first_line(err)}") from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        what = "path" if ref.kind == "disk" else "hf"
        raise UserError(f"{ref.entry}.{what}: cannot load {ref.name!r}: {_first_line(err)}") from None


def _saved_split(loaded: Any, ref: DatasetRef) -> Any:
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return loaded
    if ref.split not in loaded:
        raise UserError(f"{ref.entry}.split: {ref.name} has no split {ref.split!r} (it has "
                        f"{', '.join(loaded.keys())})")
    return loaded[ref.split]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def dataset_digest(ref: DatasetRef, columns: list[str]) -> dict[str, Any]:
    """What a shard piece of this dataset depends on: the dataset's own fingerprint (which datasets
    derives from its files or its pinned revision) and the columns read, not a walk of its cache."""
    dataset = load(ref)
    return {**ref.record(), "fingerprint": dataset._fingerprint,
            "columns": [c for c in columns if c in dataset.column_names]}


def class_label_names(ref: DatasetRef, column: str) -> list[str] | None:
    """The names of the column when the dataset declares it a ClassLabel (ids in the rows)."""
    import datasets

    feature = load(ref).features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def dataset_batches(ref: DatasetRef, columns: list[str], batch_size: int) -> Iterator[pa.Table]:
    """The split's rows, `columns` only (those it has), as Arrow tables of batch_size rows."""
    dataset = load(ref)
    present = [c for c in columns if c in dataset.column_names]
    if not present:  # no column the format reads: every row is rejected for its missing field
        import pyarrow as pa

        for start in range(0, dataset.num_rows, batch_size):
            yield pa.table({"_": [None] * min(batch_size, dataset.num_rows - start)})
        return
    yield from dataset.select_columns(present).with_format("arrow").iter(batch_size=batch_size)
