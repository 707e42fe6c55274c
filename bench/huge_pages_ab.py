"""Decode speed with and without huge pages, in pairs of processes.

Whether malloc hands out transparent huge pages is fixed when a process starts
(``glibc.malloc.hugetlb``, core/huge_pages.py), so the two cannot be interleaved
in one process as ``bench/decode_ab.py`` interleaves bundles. Here each pair runs
decode_ab twice on the same bundles, once on huge pages and once on 4 KiB pages (which
first alternates from pair to pair), and compares each bundle's median tokens/s between
the two processes of a pair. The table gives, per bundle, the median tokens/s of each
mode, the median (min–max) of the per-pair ratio, in how many pairs huge pages were
faster with a one-sided sign test, and the memory each mode held on huge pages.

    .venv/bin/python bench/huge_pages_ab.py NAME=DIR [NAME=DIR ...] \\
        [--pairs 8] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import compress_real as real
from decode_ab import parse_bundles, sign_test

HERE = Path(__file__).resolve().parent
MODES = ("huge", "small")  # huge pages, 4 KiB pages


def run_decode_ab(bundles: list[str], rounds: int, huge: bool, out: Path) -> dict:
    command = [sys.executable, str(HERE / "decode_ab.py"), *bundles, "--rounds", str(rounds)]
    command += ["--json", str(out)] + ([] if huge else ["--no-huge-pages"])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="NAME=DIR")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="decode_ab rounds per process")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    real.require_at_least_one(args, "pairs", "rounds")
    names = list(parse_bundles(args.bundles))  # checks NAME=DIR before any work

    def speed(report: dict, name: str) -> float:
        return next(r["tokens_per_s"] for r in report["rows"] if r["name"] == name)

    runs: list[dict[str, dict]] = []  # per pair: mode -> decode_ab's report
    with tempfile.TemporaryDirectory(prefix="huge_pages_ab.") as tmp:
        for k in range(args.pairs):
            pair: dict[str, dict] = {}
            for mode in MODES if k % 2 == 0 else MODES[::-1]:
                out = Path(tmp) / f"{k}-{mode}.json"
                pair[mode] = run_decode_ab(args.bundles, args.rounds, mode == "huge", out)
            runs.append(pair)
            speeds = ", ".join(
                f"{n} {speed(pair['huge'], n):.1f}/{speed(pair['small'], n):.1f}" for n in names
            )
            real.progress(f"[pair {k + 1}/{args.pairs}] tokens/s, huge/4 KiB pages: {speeds}")

    rows = []
    for name in names:
        huge = [speed(p["huge"], name) for p in runs]
        small = [speed(p["small"], name) for p in runs]
        ratios = [h / s for h, s in zip(huge, small, strict=True)]
        faster = sum(r > 1 for r in ratios)
        rows.append(
            {
                "name": name,
                "tokens_per_s": {"huge": huge, "small": small},
                "ratio": {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                    "faster_pairs": faster,
                    "p_if_equal": sign_test(faster, len(ratios)),
                },
            }
        )
    held = {m: statistics.median(p[m]["huge_page_mb"] for p in runs) for m in MODES}
    copy = {m: statistics.median(p[m]["bandwidth_gb_per_s"] for p in runs) for m in MODES}
    lines = [
        "| bundle | tokens/s, huge pages | tokens/s, 4 KiB pages | huge ÷ 4 KiB (min–max) "
        "| pairs faster | p if equal |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r, tps = row["ratio"], row["tokens_per_s"]
        lines.append(
            f"| {row['name']} | {statistics.median(tps['huge']):.1f} | "
            f"{statistics.median(tps['small']):.1f} | {r['median']:.3f} "
            f"({r['min']:.3f}–{r['max']:.3f}) | {r['faster_pairs']}/{args.pairs} | "
            f"{r['p_if_equal']:.2g} |"
        )
    print("\n".join(lines))
    print(
        f"\nmedian memory on huge pages: {held['huge']:,.0f} MB (huge), {held['small']:,.0f} MB "
        f"(4 KiB); two-thread copy: {copy['huge']:.1f} and {copy['small']:.1f} GB/s"
    )
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench/huge_pages_ab.py " + " ".join(argv),
            "machine": real.machine(),
            "settings": {"pairs": args.pairs, "rounds": args.rounds},
            "huge_page_mb": held,
            "bandwidth_gb_per_s": copy,
            "rows": rows,
            "runs": runs,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
