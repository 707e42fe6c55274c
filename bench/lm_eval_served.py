"""lm-evaluation-harness through `unbottle serve`: each shipped bundle scored in its runtime.

Each bundle is served by ``unbottle serve`` (a subprocess, on a loopback port) and scored
by lm-eval's ``local-completions`` model, which reads log-likelihoods from the server's
``echo`` + ``logprobs`` and tokenizes through its ``/tokenize`` endpoint
(``tokenizer_backend=remote``), as a user would score a deployed model. ``--hf DIR`` adds
lm-eval's own ``hf`` model on a float directory in this process, the reference the
served float bundle should match.

Two local tasks, built from the held-out fifth of compress_real's text (Python's bundled
documentation topics, which no variant was calibrated on), in a scratch folder:

- ``heldout_cloze`` (multiple choice): a passage's first sentences, and which of four
  sentences comes next: the true one, or the sentence at the same place in three other
  passages (seeded). ``acc`` and ``acc_norm`` (lm-eval's length-normalized accuracy).
- ``heldout_rolling`` (``loglikelihood_rolling``): held-out paragraphs of 200 characters
  or more, code included, scored token by token:
  ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``.

Wall time per bundle counts the harness's requests, not the server's start.

    python bench/lm_eval_served.py dense=DIR genai=BUNDLE gguf=BUNDLE --hf DIR --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_real as real
from serve_load import free_port, labelled_bundles, start_server

CLOZE = """\
task: heldout_cloze
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc}}
  - {{metric: acc_norm}}
"""

ROLLING = """\
task: heldout_rolling
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity}}
  - {{metric: byte_perplexity}}
  - {{metric: bits_per_byte}}
"""

SENTENCE = re.compile(r"(?<=[a-z0-9)\"][.!?])\s+(?=[A-Z\"])")


def passages(text: str) -> list[list[str]]:
    """The held-out text's prose paragraphs as sentences: those of 2 to 15 sentences of
    15 to 400 characters (no code examples or grammar rules)."""
    out = []
    for paragraph in text.split("\n\n"):
        flat = " ".join(paragraph.split())
        if not flat or any(mark in paragraph for mark in (">>>", "::")):
            continue
        sentences = SENTENCE.split(flat)
        if 2 <= len(sentences) <= 15 and all(15 <= len(s) <= 400 for s in sentences):
            out.append(sentences)
    return out


def build_tasks(folder: Path, cloze_docs: int, rolling_docs: int, seed: int) -> dict[str, int]:
    """The two tasks' data and YAML in ``folder``: cloze questions from up to
    ``cloze_docs`` prose passages, and the first ``rolling_docs`` held-out paragraphs of
    200 characters or more, code included, for the rolling log-likelihood."""
    _, held_out = real.split_topics()
    cloze = passages(held_out)
    draw = random.Random(seed)
    draw.shuffle(cloze)
    cloze = cloze[:cloze_docs]
    rolling = [p.strip() for p in held_out.split("\n\n") if len(p.strip()) >= 200]
    rolling = rolling[:rolling_docs]
    rows = []
    for i, sentences in enumerate(cloze):
        cut = draw.randrange(1, len(sentences))  # the sentence to guess, after one at least
        others = draw.sample([p for j, p in enumerate(cloze) if j != i], 3)
        wrong = [p[min(cut, len(p) - 1)] for p in others]
        choices = [sentences[cut], *wrong]
        draw.shuffle(choices)
        context = " ".join(sentences[:cut])
        rows.append(
            {
                "context": context,
                "choices": [" " + c for c in choices],
                "label": choices.index(sentences[cut]),
            }
        )
    (folder / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [{"text": text} for text in rolling]
    (folder / "rolling.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    (folder / "cloze.yaml").write_text(CLOZE.format(data=folder / "cloze.jsonl"))
    (folder / "rolling.yaml").write_text(ROLLING.format(data=folder / "rolling.jsonl"))
    return {"cloze": len(rows), "rolling": len(texts)}


def evaluate(folder: Path, model: str, model_args: dict[str, Any]) -> tuple[dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["heldout_cloze", "heldout_rolling"],
        task_manager=TaskManager(include_path=str(folder)),
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    wall = time.perf_counter() - started
    metrics = {
        f"{task}/{name.split(',')[0]}": value
        for task, values in out["results"].items()
        for name, value in values.items()
        if isinstance(value, float) and "stderr" not in name
    }
    return metrics, wall


def served(folder: Path, bundle: Path, threads: int | None) -> tuple[dict, float]:
    port = free_port()
    proc = start_server(bundle, port, max_batch=8, threads=threads)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        context = httpx.get(url + "/tokenizer_info").json()["model_max_length"]
        return evaluate(
            folder,
            "local-completions",
            {
                "base_url": f"{url}/v1/completions",
                "model": name,
                "tokenizer_backend": "remote",
                "max_length": min(context, 2048),
            },
        )
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="LABEL=BUNDLE, each served in turn.")
    parser.add_argument("--hf", type=Path, help="A float directory for lm-eval's hf model.")
    parser.add_argument("--cloze-docs", type=int, default=100)
    parser.add_argument("--rolling-docs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="The server's threads (default: its own).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bundles = labelled_bundles(args.bundles)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        counts = build_tasks(folder, args.cloze_docs, args.rolling_docs, args.seed)
        print(f"tasks: {counts}", flush=True)
        runs = [(label, lambda b=path: served(folder, b, args.threads)) for label, path in bundles]
        if args.hf is not None:
            runs.append(
                (
                    "lm-eval hf (in process)",
                    lambda: evaluate(
                        folder,
                        "hf",
                        {"pretrained": str(args.hf), "device": "cpu", "max_length": 2048},
                    ),
                )
            )
        for label, run in runs:
            metrics, wall = run()
            rows.append({"label": label, "wall_s": wall, **metrics})
            print(
                f"{label}: cloze acc {metrics['heldout_cloze/acc']:.3f}, acc_norm "
                f"{metrics['heldout_cloze/acc_norm']:.3f}, word ppl "
                f"{metrics['heldout_rolling/word_perplexity']:.3f}, bits/byte "
                f"{metrics['heldout_rolling/bits_per_byte']:.4f}, {wall:.0f} s",
                flush=True,
            )
    if args.json:
        result = {
            "bundles": {label: str(path) for label, path in bundles},
            "hf": str(args.hf) if args.hf else None,
            "tasks": counts,
            "seed": args.seed,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "load_average_before_after": [load_before, os.getloadavg()[0]],
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
