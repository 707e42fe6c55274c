"""Structured outputs through `unbottle serve`: JSON a program can use, from each bundle.

A field-extraction task: sentences that name a person, an age and a city (seeded, from
templates), and a chat request asking for those three fields as JSON. Each bundle is
served by ``unbottle serve`` (a subprocess on a loopback port) and asked each sentence
five ways, one request at a time, greedy, through the official ``openai`` client:

- ``free``: an instruction that asks for JSON with the three keys, alone;
- ``json_object``: the same with ``response_format: {type: json_object}`` (any object);
- ``json_schema``: the same with ``response_format: {type: json_schema}``, the fields'
  schema;
- ``question, free`` and ``question, json_schema``: a question with no word about JSON,
  alone and with the schema.

For each: the share of answers that parse as JSON (the whole answer), that keep to the
schema, and whose three fields are the sentence's; the completion tokens; and the time per
token after the first (streamed), which holds the cost of the grammar's mask.

    python bench/structured_outputs.py dense=DIR genai=BUNDLE gguf=BUNDLE --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, labelled_bundles, start_server

NAMES = [
    "Alice Martin",
    "Bob Chen",
    "Carla Rossi",
    "Dmitri Ivanov",
    "Emma Dubois",
    "Farid Haddad",
    "Grace Okafor",
    "Hiro Tanaka",
    "Ines Garcia",
    "Jonas Berg",
]
CITIES = [
    "Paris",
    "Tokyo",
    "Lagos",
    "Lima",
    "Oslo",
    "Cairo",
    "Toronto",
    "Madrid",
    "Seoul",
    "Nairobi",
    "Berlin",
    "Sydney",
]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "At {age}, {name} moved to {city}.",
    "{name}, aged {age}, works in {city}.",
]
INSTRUCTION = (
    'Extract the person\'s name, age and city from the sentence as JSON with the keys "name", '
    '"age" (a number) and "city".\n\nSentence: {sentence}'
)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
#: The same question with no word about JSON: the schema alone says what to write.
QUESTION = "What are the name, age and city of the person in this sentence?\n\nSentence: {sentence}"
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
#: (instruction, response_format) by mode.
MODES = {
    "free": (INSTRUCTION, None),
    "json_object": (INSTRUCTION, {"type": "json_object"}),
    "json_schema": (INSTRUCTION, JSON_SCHEMA),
    "question, free": (QUESTION, None),
    "question, json_schema": (QUESTION, JSON_SCHEMA),
}


def records(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        truth = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
        sentence = TEMPLATES[i % len(TEMPLATES)].format(**truth)
        out.append({"sentence": sentence, "truth": truth})
    return out


def judge(text: str, truth: dict[str, Any]) -> dict[str, bool]:
    """Whether the whole answer parses as JSON, whether its first ``{`` to its last ``}``
    does (what a client would dig out of a fenced or chatty answer), and, of what parses
    either way, whether it keeps to the schema and holds the sentence's fields."""
    import jsonschema

    value, parses = None, True
    try:
        value = json.loads(text)
    except ValueError:
        parses = False
        start, end = text.find("{"), text.rfind("}")
        try:
            value = json.loads(text[start : end + 1]) if 0 <= start < end else None
        except ValueError:
            value = None
    if value is None:
        return {"parses": False, "dug_out": False, "valid": False, "correct": False}
    try:
        jsonschema.validate(value, SCHEMA)
        valid = True
    except jsonschema.ValidationError:
        valid = False
    return {"parses": parses, "dug_out": True, "valid": valid, "correct": valid and value == truth}


def ask(client: Any, model: str, content: str, response_format: Any, max_tokens: int) -> dict:
    """One streamed request: its text, completion tokens, finish reason, and seconds per
    token between its first and last pieces of text.

    An answer that ends with the end token spends its last step on a token with no text
    (after the last piece); one ended by its grammar does not. So the steps between the
    first and last pieces are the tokens less one, less one more for an end token."""
    extra = {"response_format": response_format} if response_format else {}
    started = time.perf_counter()
    stamps, parts, usage, finish = [], [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            stamps.append(time.perf_counter())
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    tokens = usage.completion_tokens if usage else 0
    steps = tokens - 1 - (finish == "stop" and response_format is None)
    per_token = (stamps[-1] - stamps[0]) / steps if len(stamps) > 1 and steps > 0 else None
    return {
        "text": "".join(parts),
        "tokens": tokens,
        "finish": finish,
        "ttft_s": stamps[0] - started if stamps else None,
        "s_per_token": per_token,
    }


def run_bundle(bundle: Path, items: list[dict], max_tokens: int, threads: int | None) -> dict:
    import openai

    port = free_port()
    proc = start_server(bundle, port, max_batch=8, threads=threads)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        model = client.models.list().data[0].id
        ask(client, model, items[0]["sentence"], JSON_SCHEMA, 8)  # warm up
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        # Modes interleaved per sentence, so that a slower minute hits them alike.
        for item in items:
            for mode, (instruction, response_format) in MODES.items():
                content = instruction.format(sentence=item["sentence"])
                answer = ask(client, model, content, response_format, max_tokens)
                answer.update(judge(answer["text"], item["truth"]))
                results[mode].append(answer)
        return results
    finally:
        proc.terminate()
        proc.wait(60)


def summary(answers: list[dict]) -> dict[str, Any]:
    def share(key: str) -> float:
        return sum(a[key] for a in answers) / len(answers)

    timed = [a["s_per_token"] for a in answers if a["s_per_token"] is not None]
    return {
        "parses": share("parses"),
        "dug_out": share("dug_out"),
        "valid": share("valid"),
        "correct": share("correct"),
        "tokens_mean": statistics.mean(a["tokens"] for a in answers),
        "ms_per_token_median": 1000 * statistics.median(timed) if timed else None,
        "ended_by_length": sum(a["finish"] == "length" for a in answers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="LABEL=BUNDLE, each served in turn.")
    parser.add_argument("--count", type=int, default=40, help="Sentences.")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="The server's threads (default: its own).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bundles = labelled_bundles(args.bundles)
    items = records(args.count, args.seed)
    load_before = os.getloadavg()
    rows, answers = [], {}
    header = (
        "| bundle | mode | parses | { to } parses | keeps to the schema | fields right "
        "| tokens | ms/token |"
    )
    print(header + "\n|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for label, bundle in bundles:
        results = run_bundle(bundle, items, args.max_tokens, args.threads)
        answers[label] = results
        for mode, given in results.items():
            row = {"bundle": label, "mode": mode, **summary(given)}
            rows.append(row)
            print(
                f"| {label} | {mode} | {row['parses']:.0%} | {row['dug_out']:.0%} | "
                f"{row['valid']:.0%} | "
                f"{row['correct']:.0%} | {row['tokens_mean']:.1f} | "
                f"{row['ms_per_token_median']:.1f} |",
                flush=True,
            )
    if args.json:
        result = {
            "bundles": {label: str(path) for label, path in bundles},
            "count": args.count,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "load_average_before_after": [load_before, os.getloadavg()],
            "rows": rows,
            "answers": {
                label: {
                    mode: [
                        {"text": a["text"], "tokens": a["tokens"], "finish": a["finish"]}
                        for a in given
                    ]
                    for mode, given in results.items()
                }
                for label, results in answers.items()
            },
            "sentences": items,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
