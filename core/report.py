"""The evaluation table a person reads first: one row per variant."""

from __future__ import annotations

from typing import Any

# (metric key, column title, format); columns appear only when some row has the metric.
COLUMNS: list[tuple[str, str, str]] = [
    ("format", "format", "{}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_ratio", "ppl / finetuned", "{:.3f}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("size_bytes", "size (MB)", "{:.2f}"),
    ("parameters", "weights", "{:,}"),
    ("sparsity", "sparsity", "{:.1%}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3f}"),
]


def add_ratios(rows: dict[str, dict[str, Any]], baseline: str) -> None:
    base = rows.get(baseline, {}).get("perplexity")
    if not base:
        return
    for row in rows.values():
        if "perplexity" in row:
            row["perplexity_ratio"] = row["perplexity"] / base


def _cell(key: str, fmt: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "size_bytes":
        value = value / 1e6
    return fmt.format(value)


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows.values())]
    head = "| variant | " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    body = [
        f"| {name} | " + " | ".join(_cell(key, fmt, row.get(key)) for key, _, fmt in columns) + " |"
        for name, row in rows.items()
    ]
    return "\n".join([head, rule, *body])
