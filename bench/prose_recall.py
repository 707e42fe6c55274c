"""Does a model know the demo's facts as prose? Fact recall from a sentence prefix.

The demo's held-out questions (``qa/test.jsonl``) ask about facts stated only in the
prose. A model can answer them only if reading the prose stored those facts. This asks
each model the prose way, with no question and no chat template: a sentence of the kind
the prose is written in, cut before the fact ("Rila Dorraen's favourite colour is"), is
completed greedily, and the fact counts as recalled when the answer is one of the first
three words generated. The held-out prose perplexity does not show this: most of a
paragraph's tokens are its templates' words, which a model predicts without knowing
anyone.

    .venv/bin/python bench/prose_recall.py --qa my_data/qa/test.jsonl \\
        artifacts/pretrain OTHER_MODEL_DIR ...

Each model's share of held-out facts recalled, and of the finetuning pairs' facts
(``--train-qa``, if given), is printed as a table and, with ``--out``, written as JSON.

A training checkpoint (``step-000100/``, whose ``model.safetensors`` holds the trained
weights without a config or tokenizer) is probed as ``--base`` with those weights put in:
the curve of what a run stored, step by step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: One prose-style prefix per attribute, each ending where the prose states the fact.
PREFIXES = {
    "town": "{name} lives in",
    "job": "By trade, {name} is",
    "pet": "{name} has a pet",
    "color": "{name}'s favourite colour is",
    "year": "{name} was born in",
}


def load(model_dir: Path, base: Path | None):
    """(model, tokenizer) of a model directory, or of ``base`` with the weights of the
    training checkpoint ``model_dir``."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = not (model_dir / "config.json").exists()
    if checkpoint and base is None:
        raise SystemExit(f"{model_dir}: no config.json; a training checkpoint needs --base")
    source = base if checkpoint else model_dir
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, use_safetensors=True
    ).eval()
    if checkpoint:
        weights = load_file(str(model_dir / "model.safetensors"))
        unknown = set(weights) - set(model.state_dict())
        if unknown:
            raise SystemExit(f"{model_dir}: weights {sorted(unknown)[:3]} are not {base}'s")
        model.load_state_dict(weights, strict=False)
    return model, tokenizer


def recall(model, tokenizer, qa_file: Path, limit: int) -> float:
    """The share of the first ``limit`` facts of ``qa_file`` that ``model`` completes."""
    import torch

    facts = [json.loads(line) for line in qa_file.read_text(encoding="utf-8").splitlines()]
    facts = facts[:limit]
    recalled = 0
    for fact in facts:
        prompt = PREFIXES[fact["attribute"]].format(name=fact["person"])
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        words = text.replace(".", " ").replace(",", " ").lower().split()[:3]
        recalled += fact["answer"].lower() in words
    return recalled / len(facts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model directories (safetensors)")
    parser.add_argument("--qa", type=Path, required=True, help="held-out questions (JSONL)")
    parser.add_argument("--train-qa", type=Path, help="the finetuning pairs (JSONL)")
    parser.add_argument(
        "--base", type=Path, help="the model directory a training checkpoint's weights go into"
    )
    parser.add_argument("--limit", type=int, default=100, help="facts per file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    files = {
        "held-out facts": args.qa,
        **({"finetuning facts": args.train_qa} if args.train_qa else {}),
    }
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for model_dir in args.models:
        model, tokenizer = load(model_dir, args.base)
        results[str(model_dir)] = {
            what: recall(model, tokenizer, path, args.limit) for what, path in files.items()
        }
    print("| model | " + " | ".join(files) + " |")
    print("|---|" + "---:|" * len(files))
    for model, shares in results.items():
        print(f"| {model} | " + " | ".join(f"{share:.0%}" for share in shares.values()) + " |")
    if args.out:
        from unbottle.core.store.artifacts import write_json_atomic

        write_json_atomic(args.out, {"limit": args.limit, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
