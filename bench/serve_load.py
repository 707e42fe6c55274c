"""Serving throughput: one stream against N concurrent streams, through the real server.

Starts ``unbottle serve BUNDLE`` on a loopback port (a subprocess, as users run it),
then streams completions with fixed lengths (``ignore_eos``) in two phases of the same
run:

1. single stream: requests one after another;
2. concurrent: ``--concurrency`` streams at once (continuous batching shares the steps);

alternated ``--rounds`` times, so that a change in the machine's other load hits both.

For each phase it reports aggregate generated tokens/s, request latency p50/p99, time
to first token (TTFT) p50/p99 and the gap between a stream's successive text chunks after
its first (inter-token latency, ITL: a chunk is one engine step's text; another request's
prefill between two steps shows here), and the ratio of the two throughputs (target: >= 4x
at 8 streams on the demo model). The client runs on the same machine, so its CPU time
is part of what is measured.

``--threads 1 2`` compares the server's ``threads`` settings in the same run, and
``--also BUNDLE...`` other bundles (a GGUF file in llama.cpp against a genai bundle): each
round starts one server per bundle and setting in turn (the order rotated by one each
round), runs both phases on it and stops it, and the report adds each one's tokens/s over
the first's, round by round.

``--prefix-words N`` starts every prompt with the same passage of N words (a system
prompt), and ``--prompt-cache both`` serves each bundle with llama.cpp's prompt cache on and
off in the same rounds (`unbottle serve --no-prompt-cache`): with it on, a prompt reuses
the cells of a finished request that started the same way. The report adds the share of
prompt tokens the server found cached (its usage's ``cached_tokens``). ``--turns N`` makes
each request a conversation of N: a turn's prompt is the last prompt, its answer and the
next question, as a chat client sends it. ``--prefill-chunk 0
128`` compares the server's ``prefill_chunk`` settings the same way.

``--request-rate R`` makes the concurrent phase open-loop, as vLLM's serving benchmark
does: requests arrive at R a second on average, at exponentially distributed intervals
(a Poisson process, the same arrival times for every setting in a round), whatever the
server's progress; the server still decodes at most ``--concurrency`` at once. A closed
loop (a client waits for its answer before it sends again) slows its arrivals when the
server slows, and so hides the queueing that real traffic meets.

    python bench/serve_load.py artifacts/deploy
    python bench/serve_load.py artifacts/deploy --concurrency 8 --max-tokens 64 --json out.json
    python bench/serve_load.py artifacts/deploy --threads 1 2 --rounds 5
    python bench/serve_load.py GENAI_BUNDLE --also GGUF_BUNDLE --rounds 5
    python bench/serve_load.py GGUF_BUNDLE --prefix-words 300 --prompt-cache both
    python bench/serve_load.py BUNDLE --prefix-words 300 --prompt-cache off --prefill-chunk 0 128
    python bench/serve_load.py BUNDLE --prefix-words 300 --request-rate 0.8 --prefill-chunk 0 128
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Question: Where does {name} live?\nAnswer:",
    "Question: What is the job of {name}?\nAnswer:",
    "Question: What pet does {name} have?\nAnswer:",
    "Question: In which year was {name} born?\nAnswer:",
]
NAMES = ["Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Grace", "Heidi"]
#: Repeated to make ``--prefix-words``: what a system prompt of a question-answering
#: service says.
PASSAGE = str.split(
    "You answer questions about the people of a small town. Each answer is one short "
    "sentence, in plain words, and names the person asked about. When the records do not "
    "say, answer that they do not say, and never guess. The town keeps records of where "
    "each person lives, what work they do, the pets they keep and the year they were born."
)


def prefix_of(words: int) -> str:
    """The shared start of every prompt: ``words`` words of :data:`PASSAGE`, repeated."""
    if not words:
        return ""
    return " ".join(PASSAGE[i % len(PASSAGE)] for i in range(words)) + "\n\n"


def labelled_bundles(items: list[str]) -> list[tuple[str, Path]]:
    """``LABEL=BUNDLE`` arguments, each a directory, as (label, path) pairs."""
    bundles = []
    for item in items:
        label, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"error: {item!r}: expected LABEL=BUNDLE_DIRECTORY")
        bundles.append((label, Path(path)))
    return bundles


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    started = time.perf_counter()
    ttft = None
    tokens = prompt_tokens = cached = 0
    arrivals: list[float] = []
    text = ""
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                text += chunk["choices"][0]["text"]
                arrivals.append(time.perf_counter())
                if ttft is None:
                    ttft = arrivals[0] - started
            if chunk.get("usage"):
                usage = chunk["usage"]
                tokens, prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return time.perf_counter() - started, ttft, tokens, prompt_tokens, cached, gaps, text


async def phase(
    url: str,
    model: str,
    requests: int,
    concurrency: int,
    max_tokens: int,
    prefix: str = "",
    turns: int = 1,
    rate: float | None = None,
    seed: int = 0,
) -> dict:
    """``requests`` conversations of ``turns`` requests each: a turn's prompt is the last
    one, its answer and the next question. ``concurrency`` at a time, or with ``rate``
    each conversation starts at its time in a Poisson process of that rate (``seed``)."""
    conversations = [
        [
            PROMPTS[(i + t) % len(PROMPTS)].format(name=NAMES[(i + t) % len(NAMES)])
            for t in range(turns)
        ]
        for i in range(requests)
    ]
    open_loop = rate is not None
    gate = asyncio.Semaphore(requests if open_loop else concurrency)
    draw = random.Random(seed)
    intervals = [draw.expovariate(rate) if rate is not None else 0.0 for _ in conversations]
    arrivals = list(itertools.accumulate(intervals))
    limits = httpx.Limits(max_connections=requests if open_loop else concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:

        async def run(questions: list[str], at: float) -> list[tuple]:
            if open_loop:
                await asyncio.sleep(started + at - time.perf_counter())
            async with gate:
                prompt, results = prefix, []
                for question in questions:
                    prompt += question
                    results.append(await one_stream(http, model, prompt, max_tokens))
                    prompt += results[-1][6] + "\n"
                return results

        started = time.perf_counter()
        done = await asyncio.gather(
            *(run(c, at) for c, at in zip(conversations, arrivals, strict=True))
        )
        wall = time.perf_counter() - started
    results = [r for conversation in done for r in conversation]
    tokens = sum(r[2] for r in results)
    expected = requests * turns * max_tokens
    assert tokens == expected, f"lost tokens: {tokens} != {expected}"
    return {
        "wall_s": wall,
        "tokens": tokens,
        "latencies": [r[0] for r in results],
        "ttfts": [r[1] for r in results if r[1] is not None],
        "prompt_tokens": sum(r[3] for r in results),
        "cached_tokens": sum(r[4] for r in results),
        "gaps": [gap for r in results for gap in r[5]],
    }


def summarize(runs: list[dict], streams: int) -> dict:
    """Rounds of one phase pooled: tokens over wall time, latency percentiles."""
    latencies = [x for run in runs for x in run["latencies"]]
    ttfts = [x for run in runs for x in run["ttfts"]]
    gaps = [x for run in runs for x in run["gaps"]] or [0.0]
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall_s"] for r in runs)
    return {
        "streams": streams,
        "requests": len(latencies),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_s_by_round": [r["tokens"] / r["wall_s"] for r in runs],
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": statistics.median(gaps),
        "itl_p99_s": percentile(gaps, 99),
        "itl_max_s": max(gaps),
        "prompt_tokens": sum(r["prompt_tokens"] for r in runs),
        "cached_tokens": sum(r["cached_tokens"] for r in runs),
    }


def start_server(
    bundle: Path,
    port: int,
    max_batch: int,
    threads: int | None,
    prompt_cache: bool = True,
    prefill_chunk: int | None = None,
    extra: list[str] | None = None,
) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("UNBOTTLE_API_KEY", None)
    command = [sys.executable, "-m", "unbottle", "serve", str(bundle), "--port", str(port)]
    command += ["--max-batch", str(max_batch)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if not prompt_cache:
        command.append("--no-prompt-cache")
    if prefill_chunk is not None:
        command += ["--prefill-chunk", str(prefill_chunk)]
    command += extra or []
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"unbottle serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("unbottle serve did not start in 180 s")


def measure(
    args: argparse.Namespace,
    bundle: Path,
    threads: int | None,
    prompt_cache: bool,
    prefill_chunk: int | None,
    round_index: int = 0,
) -> tuple[dict, dict]:
    """One server of ``bundle`` with ``threads``, ``prompt_cache`` and ``prefill_chunk``: a
    warm-up, then one single-stream and one concurrent phase; the server is stopped before
    this returns."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(bundle, port, args.concurrency, threads, prompt_cache, prefill_chunk)
    prefix = prefix_of(args.prefix_words)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        common = {"max_tokens": args.max_tokens, "prefix": prefix, "turns": args.turns}
        asyncio.run(phase(url, model, 8, args.concurrency, **common))  # warm-up
        single = asyncio.run(phase(url, model, args.single_requests, 1, **common))
        many = asyncio.run(
            phase(
                url,
                model,
                args.concurrent_requests,
                args.concurrency,
                rate=args.request_rate,
                seed=round_index,
                **common,
            )
        )
        return single, many
    finally:
        proc.terminate()
        proc.wait(60)


def print_table(label: str, single: dict, many: dict) -> None:
    print(label)
    print(
        f"{'streams':>8} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'cached':>7}"
    )
    for row in (single, many):
        cached = row["cached_tokens"] / max(row["prompt_tokens"], 1)
        print(
            f"{row['streams']:>8} {row['tokens_per_s']:>9.1f} {row['latency_p50_s']:>8.3f} "
            f"{row['latency_p99_s']:>8.3f} {row['ttft_p50_s']:>9.4f} {row['ttft_p99_s']:>9.4f} "
            f"{row['itl_p50_s']:>8.4f} {row['itl_p99_s']:>8.4f} {cached:>7.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", default=Path("artifacts/deploy"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=16)
    parser.add_argument("--concurrent-requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="Alternations of the two phases.")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="The server's threads settings to compare (default: the bundle's own).",
    )
    parser.add_argument(
        "--also", type=Path, nargs="+", default=[], help="Other bundles, in the same rounds."
    )
    parser.add_argument(
        "--prefix-words", type=int, default=0, help="A shared start of every prompt (words)."
    )
    parser.add_argument(
        "--prompt-cache",
        choices=["on", "off", "both"],
        default="on",
        help="The server's prompt cache (llama.cpp bundles); both: each setting twice.",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=1,
        help="Requests per conversation: each turn's prompt is the last one, its answer and "
        "a new question (the requests counts are conversations).",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        nargs="+",
        help="The server's prefill_chunk settings to compare (default: the bundle's own).",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        help="Requests a second, Poisson arrivals, in the concurrent phase (open loop) "
        "instead of --concurrency streams each waiting for its answer.",
    )
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    for bundle in (args.bundle, *args.also):
        if not bundle.is_dir():
            raise SystemExit(f"{bundle}: no bundle (run `make demo` or pass a bundle path)")
    if args.prefill_chunk and min(args.prefill_chunk) < 0:
        raise SystemExit("--prefill-chunk must be at least 0")
    if args.turns < 1:
        raise SystemExit("--turns must be at least 1")
    if args.request_rate is not None and args.request_rate <= 0:
        raise SystemExit("--request-rate must be above 0")
    if args.rounds < 1 or (args.threads and min(args.threads) < 1) or args.prefix_words < 0:
        raise SystemExit("--rounds and --threads must be at least 1, --prefix-words at least 0")

    caches = {"on": [True], "off": [False], "both": [True, False]}[args.prompt_cache]
    settings = [
        (b, t, c, k)
        for b in (args.bundle, *args.also)
        for t in args.threads or [None]
        for c in caches
        for k in args.prefill_chunk or [None]
    ]
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    runs: dict[tuple[Path, int | None, bool, int | None], tuple[list[dict], list[dict]]] = {
        setting: ([], []) for setting in settings
    }
    for round_index in range(args.rounds):
        # Each setting goes first in turn, so that a drift in the machine's load hits all.
        shift = round_index % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            single, many = measure(args, *setting, round_index=round_index)
            runs[setting][0].append(single)
            runs[setting][1].append(many)

    results = []
    for bundle, threads, prompt_cache, prefill_chunk in settings:
        singles, concurrents = runs[bundle, threads, prompt_cache, prefill_chunk]
        single, many = summarize(singles, 1), summarize(concurrents, args.concurrency)
        results.append(
            {
                "bundle": str(bundle),
                "threads": threads,
                "prompt_cache": prompt_cache,
                "prefill_chunk": prefill_chunk,
                "single": single,
                "concurrent": many,
                "speedup": many["tokens_per_s"] / single["tokens_per_s"],
                "speedup_by_round": [
                    m / s
                    for m, s in zip(
                        many["tokens_per_s_by_round"], single["tokens_per_s_by_round"], strict=True
                    )
                ],
            }
        )
    first = results[0]
    for row in results:
        for phase_name in ("single", "concurrent"):
            row[f"{phase_name}_over_first_by_round"] = [
                mine / theirs
                for mine, theirs in zip(
                    row[phase_name]["tokens_per_s_by_round"],
                    first[phase_name]["tokens_per_s_by_round"],
                    strict=True,
                )
            ]
    result = {
        "bundle": str(args.bundle),
        "max_tokens": args.max_tokens,
        "prefix_words": args.prefix_words,
        "turns": args.turns,
        "request_rate": args.request_rate,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "rounds": args.rounds,
        "settings": results,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    for row in results:
        label = (
            "threads: the bundle's default"
            if row["threads"] is None
            else f"threads: {row['threads']}"
        )
        if args.also:
            label = f"{row['bundle']}, {label}"
        if len(caches) > 1:
            label += f", prompt cache {'on' if row['prompt_cache'] else 'off'}"
        if args.prefill_chunk:
            label += f", prefill_chunk {row['prefill_chunk']}"
        if args.request_rate is not None:
            label += f"; the second row open-loop at {args.request_rate:g} requests/s"
        print_table(label, row["single"], row["concurrent"])
        rounds = ", ".join(f"{x:.2f}x" for x in row["speedup_by_round"])
        print(f"aggregate speedup at {args.concurrency} streams: {row['speedup']:.2f}x ({rounds})")
        if row is not first:
            for phase_name in ("single", "concurrent"):
                ratios = row[f"{phase_name}_over_first_by_round"]
                print(
                    f"{phase_name} tokens/s over the first ({first['bundle']}, threads "
                    f"{first['threads']}, prompt cache {first['prompt_cache']}, prefill_chunk "
                    f"{first['prefill_chunk']}): median "
                    f"{statistics.median(ratios):.3f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                )
    print(
        "1-minute load average before/after: {:.2f} / {:.2f}".format(
            *result["load_average_before_after"]
        )
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
