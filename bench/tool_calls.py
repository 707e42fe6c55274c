"""Forced tool calls through `unbottle serve`: does each bundle call the right tool, right?

Three tools (the weather in a city, the sum of two numbers, a person's record) and
requests that each need one of them, made from templates with seeded values. Each bundle
is served by ``unbottle serve`` and asked every request with ``tool_choice: "required"``
(the model picks the tool) through the official ``openai`` client, greedy, one at a time.
A model whose chat template ignores ``tools`` (SmolLM2's does) sees neither the tools'
names nor their descriptions: the grammar lets it write only a valid call, and the test is
whether it picks the tool and arguments the request asks for.

Scored per request: a complete call (``finish_reason: tool_calls``), one call only, the
right tool, the right arguments (exactly the request's values).

    python bench/tool_calls.py dense=DIR genai=BUNDLE gguf=BUNDLE --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, labelled_bundles, start_server

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Madrid", "Seoul", "Berlin"]
NAMES = ["Alice Martin", "Bob Chen", "Carla Rossi", "Hiro Tanaka", "Ines Garcia"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "The sum of two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "save_person",
            "description": "Save a person's name and age.",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
        },
    },
]


def requests(count: int, seed: int) -> list[dict[str, Any]]:
    """(question, the call it needs), the three tools in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            city = rng.choice(CITIES)
            out.append(
                {
                    "question": f"What is the weather like in {city} right now?",
                    "call": {"name": "get_weather", "arguments": {"city": city}},
                }
            )
        elif kind == 1:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(
                {
                    "question": f"What is {a} plus {b}?",
                    "call": {"name": "add", "arguments": {"a": a, "b": b}},
                }
            )
        else:
            name, age = rng.choice(NAMES), rng.randint(18, 90)
            out.append(
                {
                    "question": f"Please save {name}, who is {age} years old.",
                    "call": {"name": "save_person", "arguments": {"name": name, "age": age}},
                }
            )
    return out


def run_bundle(
    bundle: Path, items: list[dict], max_tokens: int, threads: int | None, parallel: bool
) -> list:
    import openai

    port = free_port()
    proc = start_server(bundle, port, max_batch=8, threads=threads)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        model = client.models.list().data[0].id
        answers = []
        for item in items:
            out = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": item["question"]}],
                tools=TOOLS,
                tool_choice="required",
                parallel_tool_calls=parallel,
                max_tokens=max_tokens,
                temperature=0,
            )
            choice = out.choices[0]
            calls = [
                {"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                for c in choice.message.tool_calls or []
            ]
            answers.append({"finish": choice.finish_reason, "calls": calls})
        return answers
    finally:
        proc.terminate()
        proc.wait(60)


def score(items: list[dict], answers: list[dict]) -> dict[str, float]:
    def share(test: Any) -> float:
        return sum(bool(test(i, a)) for i, a in zip(items, answers, strict=True)) / len(items)

    return {
        "complete": share(lambda i, a: a["finish"] == "tool_calls"),
        "one_call": share(lambda i, a: len(a["calls"]) == 1),
        "right_tool": share(lambda i, a: a["calls"] and a["calls"][0]["name"] == i["call"]["name"]),
        "right_call": share(lambda i, a: a["calls"][:1] == [i["call"]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="LABEL=BUNDLE, each served in turn.")
    parser.add_argument("--count", type=int, default=30, help="Requests (a third per tool).")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="The server's threads (default: its own).")
    parser.add_argument(
        "--one-call", action="store_true", help="parallel_tool_calls false: one call each."
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    items = requests(args.count, args.seed)
    rows, answers = [], {}
    print(
        "| bundle | complete calls | one call | right tool | right tool and arguments |\n"
        "|---|---:|---:|---:|---:|",
        flush=True,
    )
    for label, bundle in labelled_bundles(args.bundles):
        answers[label] = run_bundle(bundle, items, args.max_tokens, args.threads, not args.one_call)
        row = {"bundle": label, **score(items, answers[label])}
        rows.append(row)
        print(
            f"| {label} | {row['complete']:.0%} | {row['one_call']:.0%} | "
            f"{row['right_tool']:.0%} | {row['right_call']:.0%} |",
            flush=True,
        )
    if args.json:
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "count": args.count,
            "seed": args.seed,
            "parallel_tool_calls": not args.one_call,
            "rows": rows,
            "requests": items,
            "answers": answers,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
