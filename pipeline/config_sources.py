"""The entries of data.train / data.eval: a file or glob, or a mapping that names a file source or a
Hugging Face dataset (loaded with datasets.load_dataset, or a save_to_disk folder)."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Field, Tag, model_validator

from pipeline.config_errors import Section

# Keys that mean something only for a dataset loaded with datasets.load_dataset (`hf`).
HF_ONLY = ("subset", "revision", "data_files")


class SourceSpec(Section):
    path: str | None = Field(
        None, description="A file or glob (jsonl, parquet, csv, txt), or a folder written by a datasets "
        "save_to_disk (a DatasetDict folder takes `split`).")
    hf: str | None = Field(
        None, description="A Hugging Face dataset for datasets.load_dataset: a hub name (read from the HF "
        "cache; offline runs set HF_DATASETS_OFFLINE=1) or a local dataset repo folder (e.g. parquet files).")
    subset: str | None = Field(None, description="hf: the dataset's configuration (subset) name.")
    split: str = Field("train", description="hf, or a DatasetDict folder in path: the split read.")
    revision: str | None = Field(
        None, description="hf: the hub revision (commit, tag or branch) to pin; recorded in the shard "
        "manifest.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="hf: data files (globs) of the dataset repo to load, as datasets.load_dataset "
        "takes them.")
    weight: float = Field(
        1.0, gt=0, le=1000, description="Times each training row of this source is seen per epoch: 2 doubles "
        "it, 0.5 keeps a stable half (chosen by row hash). Held-out rows count once.")
    limit: int | None = Field(
        None, ge=1, description="At most this many valid rows from each file (or the dataset) of this "
        "source (its first ones).")

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSpec:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of path (a file, glob or save_to_disk folder) or hf "
                             "(a dataset for datasets.load_dataset)")
        extra = [key for key in HF_ONLY if getattr(self, key) is not None]
        if self.hf is None and extra:
            raise ValueError(f"{', '.join(extra)} only applies to hf sources")
        return self


# A path string or a source mapping; the tags keep pydantic from reporting both alternatives for one
# mistake, and error messages leave them out.
ENTRY_TAGS = ("file", "source")
SourceEntry = Annotated[
    Union[Annotated[str, Tag("file")], Annotated[SourceSpec, Tag("source")]],  # noqa: UP007 - Tag needs Union
    Discriminator(lambda v: "source" if isinstance(v, (dict, SourceSpec)) else "file"),
]
