"""Naming what changed in a stage's inputs, and telling an extension of training from a change."""

from pipeline.changes import VERSION_KEY, Change, changes, describe, is_extension, stage_changes

EXTENDABLE = ("train.max_steps", "train.epochs")


def test_changes_are_named_by_dotted_config_keys():
    before = {"train": {"lr": 5e-5, "seed": 0}, "model files": {"config.json": "aa"}}
    after = {"train": {"lr": 1e-4, "seed": 0}, "model files": {"config.json": "aa", "extra.json": "bb"}}
    found = changes(before, after)
    assert [str(c) for c in found] == ["model files.extra.json: (unset) -> bb", "train.lr: 5e-05 -> 0.0001"]


def test_only_a_growing_length_is_an_extension():
    assert is_extension([Change("train.max_steps", 500, 800)], EXTENDABLE)
    assert is_extension([Change("train.epochs", 1.0, 2.5)], EXTENDABLE)
    assert not is_extension([Change("train.max_steps", 800, 500)], EXTENDABLE)
    assert not is_extension([Change("train.max_steps", None, 500)], EXTENDABLE)
    assert not is_extension([Change("train.max_steps", 500, 800), Change("train.lr", 1e-4, 2e-4)], EXTENDABLE)
    assert not is_extension([], EXTENDABLE)


def test_a_record_from_an_older_ftpipe_is_said_so():
    found = stage_changes({"fingerprint": "0123"}, {"train": {"lr": 1.0}}, version=1)
    assert found[0] == Change(VERSION_KEY, None, 1)
    assert describe(found) == "it was written by an older ftpipe that did not record its inputs"


def test_a_long_list_is_cut_and_counted():
    found = [Change(f"k{i}", i, i + 1) for i in range(5)]
    assert describe(found) == "k0: 0 -> 1; k1: 1 -> 2; k2: 2 -> 3; and 2 more"
