"""Speculative decoding by prompt lookup against plain decoding, one request at a time.

The serving engine with ``speculative`` set checks a draft of a lone sequence's next
tokens, read off its prompt and answer, in the same call as its next token
(core/serving/speculative.py). What that buys depends on how much of the answer repeats
what came before, and on what a call of several tokens costs the runtime against a call
of one. So four kinds of chat request, each a few prompts:

- ``rewrite``: correct the spelling of a paragraph and write it out (the answer copies
  the prompt);
- ``code``: add a docstring to a short function from Python's standard library and write
  the whole function out;
- ``extract``: name, age and city of a sentence as JSON, constrained by a schema
  (bench/structured_outputs.py's sentences);
- ``story``: a short story on a topic (little to copy: what a miss costs).

The bundles in turn, in this process: each loaded once, one engine on it with no prompt
cache, whose setting (plain, then each ``--tokens`` count of drafted tokens) is switched
between requests. In each round every prompt is generated greedily once with each
setting, in an order rotated by one setting per prompt. Decode tokens/s counts the
tokens after the first (the prefill's) over the time from the first token to the last; a
workload's rate in a round is its tokens over its time. Ratios are to the plain setting
in the same round; their median (min-max) over rounds is printed, and every round's
figures go to ``--json``.

With ``--http`` the same requests go through ``unbottle serve`` (one server per setting)
and the official ``openai`` client, streamed.

    python bench/speculative.py genai=BUNDLE gguf=BUNDLE --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, labelled_bundles, start_server
from structured_outputs import INSTRUCTION, SCHEMA, judge, records

from unbottle.core.serving.engine import Engine, SamplingParams, Sequence, load_bundle
from unbottle.core.serving.grammar import compile_grammar
from unbottle.core.serving.speculative import SpeculativeConfig

#: Paragraphs with a few misspellings each, for the model to write out corrected.
PARAGRAPHS = [
    "The libary will be closed on monday for repairs to the roof. Books that are due that "
    "day can be returned on tuesday without a fine. The reading room on the second floor "
    "will open again next week, once the new lights have been instaled.",
    "Our team meets every thursday at ten in the small conference room. Please bring your "
    "notes from the last meeting and a list of the tasks you finished. If you can not come, "
    "send a short sumary to the group by email before the meeting starts.",
    "To make the bread, mix the flour, the salt and the yeast in a large bowl. Add warm "
    "water slowly and knead the dough for ten minutes untill it is smooth. Leave it to rise "
    "for an hour, then bake it in a hot oven for thirty minutes.",
    "The train to the coast leaves the central station at eight in the morning. Tickets can "
    "be bought at the station or online, and children under twelve travel for half the "
    "price. The journey takes about three hours, with one stop in the valey.",
    "Water the plants in the garden early in the morning, before the sun is high. Tomatoes "
    "need more water than herbs, and the roses should be cut back in the autum. Keep the "
    "tools in the shed so that they do not rust in the rain.",
    "The museum has a new exhibition about the history of the city harbour. It shows old "
    "maps, models of ships and photographs of the people who worked on the docks. The "
    "exhibition is open every day exept monday until the end of the year.",
]
REWRITE = "Correct the spelling mistakes in this text and write the whole text out:\n\n{text}"
CODE = (
    "Add a docstring to this Python function and write the whole function out:\n\n"
    "```python\n{code}```"
)
STORY = "Write a short story about {topic}."
TOPICS = [
    "a lighthouse keeper",
    "a lost cat in a big city",
    "a robot learning to paint",
    "two friends on a mountain",
    "a baker who wakes up late",
    "a message in a bottle",
]


def functions() -> list[str]:
    """Short functions of the standard library, their docstrings removed."""
    import ast
    import calendar
    import fnmatch
    import shlex
    import shutil
    import string
    import textwrap

    sources = []
    for function in (
        string.capwords,
        shutil.copyfileobj,
        textwrap.indent,
        fnmatch.filter,
        shlex.join,
        calendar.leapdays,
    ):
        lines = textwrap.dedent(inspect.getsource(function)).splitlines(keepends=True)
        first = ast.parse("".join(lines)).body[0].body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            del lines[first.lineno - 1 : first.end_lineno]  # the model is asked to write one
        sources.append("".join(lines))
    return sources


def workloads(count: int) -> dict[str, list[tuple[str, str | None, Any]]]:
    """(user message, grammar or None, the right answer or None) per prompt, by workload."""
    extract = compile_grammar("json", SCHEMA)
    return {
        "rewrite": [(REWRITE.format(text=p), None, None) for p in PARAGRAPHS[:count]],
        "code": [(CODE.format(code=c), None, None) for c in functions()[:count]],
        "extract": [
            (INSTRUCTION.format(sentence=r["sentence"]), extract, r["truth"])
            for r in records(count, seed=0)
        ],
        "story": [(STORY.format(topic=t), None, None) for t in TOPICS[:count]],
    }


def chat(tokenizer: Any, message: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True
    )


def generate(engine: Engine, ids: list[int], params: SamplingParams) -> dict[str, Any]:
    """One request alone: its tokens, text, and decode time after its first token."""
    done = threading.Event()
    first: list[tuple[float, int]] = []

    def sink(seq: Sequence, text: str, finish: str | None) -> None:
        if not first:
            first.append((time.perf_counter(), len(seq.generated)))
        if finish:
            done.set()

    seq = Sequence(ids, params, sink)
    engine.submit([seq])
    done.wait()
    ended = time.perf_counter()
    while engine.running:  # the sequence is told before the engine lets go of its cache
        time.sleep(0.001)
    ((started, before),) = first
    return {
        "tokens": seq.generated,
        "text": seq.text,
        "decoded": len(seq.generated) - before,
        "seconds": ended - started,
    }


def in_rounds(
    names: list[str],
    items: dict[str, list[tuple[Any, str | None, Any]]],
    rounds: int,
    ask: Callable[[str, Any, str | None], dict[str, Any]],
) -> list[dict[str, dict[str, dict[str, Any]]]]:
    """Every prompt of every workload once per setting in each round, the settings' order
    rotated by one per prompt. ``ask(setting, prompt, grammar)`` gives one answer's
    decoded tokens, seconds, drafted and accepted tokens and text. Per round, workload and
    setting: their sums, the answers, and how many hold the right fields (extract)."""
    per_round = []
    for r in range(rounds):
        this: dict[str, dict[str, dict[str, Any]]] = {}
        for workload, prompts in items.items():
            cell: dict[str, dict[str, Any]] = {
                n: {"decoded": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "texts": [],
                    "correct": 0}
                for n in names
            }  # fmt: skip
            for p, (prompt, grammar, truth) in enumerate(prompts):
                shift = (r + p) % len(names)
                for name in names[shift:] + names[:shift]:
                    out = ask(name, prompt, grammar)
                    for key in ("decoded", "seconds", "drafted", "accepted"):
                        cell[name][key] += out[key]
                    cell[name]["texts"].append(out["text"])
                    if truth is not None:
                        cell[name]["correct"] += judge(out["text"], truth)["correct"]
            this[workload] = cell
            rates = {n: c["decoded"] / c["seconds"] for n, c in cell.items()}
            print(
                f"  round {r + 1} {workload}: "
                + ", ".join(f"{n} {v:.1f}" for n, v in rates.items())
                + " tokens/s",
                flush=True,
            )
        per_round.append(this)
    return per_round


def measure(
    bundle: Path, drafts: list[int], rounds: int, count: int, new: int, lookup: tuple[int, int]
) -> dict[str, Any]:
    loaded = load_bundle(bundle, {"prompt_cache": False, "max_batch": 1})
    backend, tokenizer = loaded.backend, loaded.tokenizer
    settings: dict[str, SpeculativeConfig | None] = {"plain": None}
    for k in drafts:
        settings[f"k={k}"] = SpeculativeConfig(
            num_speculative_tokens=k, prompt_lookup_min=lookup[0], prompt_lookup_max=lookup[1]
        )
    # One engine, its setting switched between requests: llama.cpp's OpenMP threads are
    # a team per calling thread, and a second engine's team made every call 3x slower.
    engine = Engine(backend, tokenizer, max_batch=1, eos_token_ids=loaded.eos_token_ids)
    engine.start()

    def ask(name: str, ids: list[int], grammar: str | None) -> dict[str, Any]:
        engine.speculative = settings[name]
        drafted, accepted = engine.drafted_tokens, engine.accepted_tokens
        out = generate(engine, ids, SamplingParams(max_tokens=new, grammar=grammar))
        out["drafted"] = engine.drafted_tokens - drafted
        out["accepted"] = engine.accepted_tokens - accepted
        return out

    chats = {
        workload: [(chat(tokenizer, message), grammar, truth) for message, grammar, truth in asks]
        for workload, asks in workloads(count).items()
    }
    try:
        per_round = in_rounds(list(settings), chats, rounds, ask)
    finally:
        engine.stop()
    return {"settings": {n: c.model_dump() if c else None for n, c in settings.items()},
            "rounds": per_round}  # fmt: skip


def measure_http(
    bundle: Path, drafts: list[int], rounds: int, count: int, new: int, lookup: tuple[int, int]
) -> dict[str, Any]:
    """:func:`measure` through ``unbottle serve``: one server per setting, the official
    client streaming each chat request (extract's schema as ``response_format``); decode
    time from the first piece of text to the end, drafts from each server's /metrics."""
    import httpx
    import openai

    settings: dict[str, dict[str, Any] | None] = {"plain": None}
    for k in drafts:
        settings[f"k={k}"] = {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_min": lookup[0],
            "prompt_lookup_max": lookup[1],
        }
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    servers, clients = {}, {}

    def counts(url: str) -> tuple[float, float]:
        lines = httpx.get(url).text.splitlines()
        value = {
            line.split()[0]: float(line.split()[1])
            for line in lines
            if line.startswith("unbottle_spec")
        }
        return (
            value["unbottle_spec_decode_drafted_tokens_total"],
            value["unbottle_spec_decode_accepted_tokens_total"],
        )

    def ask(name: str, message: str, grammar: str | None) -> dict[str, Any]:
        client, metrics = clients[name]
        before = counts(metrics)
        first, text, tokens = None, "", 0
        stream = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": message}],
            max_tokens=new,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            response_format=schema if grammar else None,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        ended = time.perf_counter()
        after = counts(metrics)
        return {
            "decoded": tokens - 1 if first else 0,  # nothing written: no decode to time
            "seconds": ended - first if first else 0.0,
            "drafted": int(after[0] - before[0]),
            "accepted": int(after[1] - before[1]),
            "text": text,
        }

    try:
        for name, config in settings.items():
            port = free_port()
            extra = ["--speculative-config", json.dumps(config)] if config else []
            servers[name] = start_server(bundle, port, 1, None, prompt_cache=False, extra=extra)
            clients[name] = (
                openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0),
                f"http://127.0.0.1:{port}/metrics",
            )
        per_round = in_rounds(list(settings), workloads(count), rounds, ask)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(30)
    return {"settings": settings, "rounds": per_round, "through": "unbottle serve"}


def step_costs(bundle: Path, sizes: list[int], calls: int = 30) -> dict[str, float]:
    """Milliseconds of a check of n tokens after a 64-token prompt (the median of
    ``calls``), by n: what a draft adds to a step."""
    import torch

    from unbottle.core.serving.engine import _Batch

    loaded = load_bundle(bundle, {"prompt_cache": False, "max_batch": 1})
    backend = loaded.backend
    ids = list(range(1000, 1064))
    _, cache = backend.prefill(ids)
    if backend.owns_cache:
        rows, width = cache, 0
    else:
        batch = _Batch(backend.right_padded)
        batch.add(None, cache, backend.context)
        batch.make_room(backend.context, max(sizes))
        rows, width = batch.buffers, batch.width
    out = {}
    with torch.inference_mode():
        for n in sizes:
            times = []
            for _ in range(calls + 3):
                started = time.perf_counter()
                backend.verify([1000 + i for i in range(n)], len(ids), rows, width)
                times.append(time.perf_counter() - started)
                if backend.owns_cache:
                    backend.truncate(rows, len(ids))
            out[str(n)] = 1000 * statistics.median(times[3:])
    return out


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A row per workload and setting: median tokens/s, ratio to plain (median, min, max
    over rounds), acceptance, and the share of answers whose text is plain's."""
    rows = []
    rounds = result["rounds"]
    for workload in rounds[0]:
        for name in rounds[0][workload]:
            rates = [rd[workload][name]["decoded"] / rd[workload][name]["seconds"] for rd in rounds]
            plain = [
                rd[workload]["plain"]["decoded"] / rd[workload]["plain"]["seconds"] for rd in rounds
            ]
            ratios = [a / b for a, b in zip(rates, plain, strict=True)]
            drafted = sum(rd[workload][name]["drafted"] for rd in rounds)
            accepted = sum(rd[workload][name]["accepted"] for rd in rounds)
            texts = [t for rd in rounds for t in rd[workload][name]["texts"]]
            plain_texts = [t for rd in rounds for t in rd[workload]["plain"]["texts"]]
            same = sum(a == b for a, b in zip(texts, plain_texts, strict=True)) / len(texts)
            correct = sum(rd[workload][name]["correct"] for rd in rounds) / len(texts)
            decoded = sum(rd[workload][name]["decoded"] for rd in rounds)
            rows.append(
                {
                    "workload": workload,
                    "setting": name,
                    "tokens_per_s": statistics.median(rates),
                    "ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "accepted_share": accepted / drafted if drafted else None,
                    "tokens_per_step": decoded / max(1, decoded - accepted) if drafted else 1.0,
                    "same_text": same,
                    "correct": correct,  # extract's answers with the sentence's fields
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="LABEL=BUNDLE")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2, 3, 5],
                        help="Drafted tokens per step, one setting each.")  # fmt: skip
    parser.add_argument("--lookup", type=int, nargs=2, default=[2, 3], metavar=("MIN", "MAX"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=6, help="Prompts per workload.")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--http",
        action="store_true",
        help="Through `unbottle serve` and the openai client, one server per setting.",
    )
    parser.add_argument(
        "--step-costs",
        action="store_true",
        help="Only time a check of 1, 2, 3 and 5 tokens in each bundle's runtime.",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.step_costs:
        costs = {}
        print("| bundle | 1 token (ms) | 2 | 3 | 5 |\n|---|---:|---:|---:|---:|")
        for label, path in labelled_bundles(args.bundles):
            ms = costs[label] = step_costs(path, [1, 2, 3, 5])
            print(
                f"| {label} | {ms['1']:.2f} | "
                + " | ".join(f"{ms[n]:.2f} ({ms[n] / ms['1']:.2f}x)" for n in ("2", "3", "5"))
                + " |",
                flush=True,
            )
        if args.json:
            args.json.write_text(json.dumps({"step_costs_ms": costs}, indent=2) + "\n")
        return
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "rounds": args.rounds,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "lookup": args.lookup,
        "results": {},
    }
    for label, path in labelled_bundles(args.bundles):
        print(f"{label} ({path})", flush=True)
        run = measure_http if args.http else measure
        lookup = tuple(args.lookup)
        result = run(path, args.tokens, args.rounds, args.prompts, args.new_tokens, lookup)
        rows = summarize(result)
        out["results"][label] = {"bundle": str(path), **result, "summary": rows}
        print("| workload | setting | tokens/s | × plain (min–max) | drafts kept | tokens/step "
              "| text as plain | fields right |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
        for row in rows:
            kept = "–" if row["accepted_share"] is None else f"{row['accepted_share']:.0%}"
            print(
                f"| {row['workload']} | {row['setting']} | {row['tokens_per_s']:.1f} | "
                f"{row['ratio']:.2f} ({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) | {kept} | "
                f"{row['tokens_per_step']:.2f} | {row['same_text']:.0%} | "
                + (f"{row['correct']:.0%} |" if row["workload"] == "extract" else "– |"),
                flush=True,
            )
        if args.json:  # after each bundle, so a long run keeps what it measured
            args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
