"""What did training on one corpus cost elsewhere? Perplexity on text of other kinds.

Continued pretraining on a user's corpus stores its facts (``bench/prose_recall.py``),
and can make the model worse at everything else ("catastrophic forgetting"). The
evaluate stage's ``perplexity`` reads only the user's own held-out text, so it cannot
show that. This scores every model on texts it was not trained on, with the evaluate
stage's own ``perplexity`` metric (sliding windows, each token scored once) through the
runtime a model's directory loads in, and prints each model's ratio to the first one
(the released model, normally).

The default texts come with the Python that runs this, so every machine has them:

- ``python-docs``: English prose, the language reference's topics as ``help()`` shows
  them (``pydoc_data.topics``);
- ``python-code``: source code, a fixed list of standard-library modules.

Other files are added with ``--text NAME=PATH``. ::

    .venv/bin/python bench/general_perplexity.py RELEASED artifacts/pretrain \\
        artifacts/finetune --text own=my_data/corpus/valid.txt --out result.json

``--write-texts DIR`` writes what `unbottle data general --out DIR` writes
(``core/data/general.py``): the two halves of the topics as ``python-docs-1.txt`` and
``python-docs-2.txt``, texts for ``pretrain.continued.reference_text`` and
``replay_text`` (replay one half, measure on the other), and ``python-code.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
from pathlib import Path

from unbottle.core.data.general import python_code, python_docs


def perplexity(runner, text: str, max_tokens: int, window: int) -> float:
    """The evaluate stage's ``perplexity`` metric on ``text``."""
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.plugins.metrics import Perplexity

    metric = Perplexity(Perplexity.Config(window=window, max_tokens=max_tokens))
    ctx = EvalContext(
        tokenizer=runner.tokenizer,
        valid_text=text,
        questions=[],
        model_dir=Path("."),
    )
    return metric.measure(runner, ctx)["perplexity"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=Path, help="model directories")
    parser.add_argument("--write-texts", type=Path, metavar="DIR", help="write the texts, exit")
    parser.add_argument(
        "--text", action="append", default=[], metavar="NAME=PATH", help="another text"
    )
    parser.add_argument(
        "--no-default-texts", action="store_true", help="score only the --text files"
    )
    parser.add_argument("--max-tokens", type=int, default=8192, help="scored tokens per text")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    texts = {"python-docs": python_docs(), "python-code": python_code()}
    if args.write_texts:
        from unbottle.core.data.general import write_general_texts

        write_general_texts(args.write_texts)
        return 0
    if not args.models:
        parser.error("give the model directories to measure")
    if args.no_default_texts:
        texts = {}
    for spec in args.text:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            parser.error(f"--text {spec!r}: NAME=PATH of an existing file")
        texts[name] = Path(path).read_text(encoding="utf-8")
    if not texts:
        parser.error("no texts to score: give --text NAME=PATH")

    import torch

    from unbottle.core.models.runtimes import load_runner

    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float]] = {}
    for model_dir in args.models:
        runner = load_runner(model_dir)
        results[str(model_dir)] = {
            name: perplexity(runner, text, args.max_tokens, args.window)
            for name, text in texts.items()
        }
        del runner
    first = results[str(args.models[0])]
    print("| model | " + " | ".join(f"{name} | ×" for name in texts) + " |")
    print("|---|" + "---:|---:|" * len(texts))
    for model, values in results.items():
        cells = " | ".join(f"{values[n]:.3f} | {values[n] / first[n]:.3f}" for n in texts)
        print(f"| {model} | {cells} |")
    if args.out:
        from unbottle.core.store.artifacts import write_json_atomic

        write_json_atomic(
            args.out,
            {
                "python": platform.python_version(),
                "max_tokens": args.max_tokens,
                "window": args.window,
                "texts": {
                    name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()
                },
                "results": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
