"""The evaluation report a person reads first: one row per variant, the Pareto frontier,
and two plots (quality against size, quality against decode speed).

A variant is on a frontier when no other candidate is at least as good on both axes and
strictly better on one; those are the only variants worth deploying for some budget.
The pretrained model is drawn as a reference but is never a candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# (metric key, column title, format); columns appear only when some row has the metric.
COLUMNS: list[tuple[str, str, str]] = [
    ("format", "format", "{}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_ratio", "ppl / finetuned", "{:.3f}"),
    ("answer_perplexity", "answer ppl", "{:.3f}"),
    ("answer_perplexity_ratio", "answer ppl / finetuned", "{:.3f}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("accuracy_fewshot", "accuracy {shots}-shot", "{:.1%}"),  # next to zero-shot
    ("accuracy_ratio", "accuracy / finetuned", "{:.3f}"),
    ("empty_answers", "empty answers", "{:.1%}"),
    ("size_bytes", "size (MB)", "{:.2f}"),
    ("parameters", "weights", "{:,}"),
    ("layer_sparsity", "layer sparsity", "{:.1%}"),  # of the layers pruners prune
    ("peak_memory_bytes", "gen. memory (MB)", "{:.2f}"),
    ("ttft_s", "TTFT (ms)", "{:.1f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("decode_tokens_per_s_batched", "decode tok/s (batch)", "{:.1f}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3f}"),
    ("latency_p95_s", "latency p95 (s)", "{:.3f}"),
    ("roofline_pct", "% of roofline", "{:.1f}"),
]
FRONTIER_LABELS = {"quality_vs_size": "size", "quality_vs_speed": "speed"}
# Shown in these units; the JSON keeps bytes and seconds.
_SCALE = {"size_bytes": 1e-6, "peak_memory_bytes": 1e-6, "ttft_s": 1e3}

#: Quality axis of the plots, in order of preference, with which way is better.
QUALITY = (("perplexity", "lower"), ("accuracy", "higher"))
#: The two trade-offs the report draws: (name, x key, x label, which x is better).
TRADEOFFS = (
    ("quality_vs_size", "size_bytes", "size on disk (MB)", "lower"),
    ("quality_vs_speed", "decode_tokens_per_s", "decode tokens/s, batch 1", "higher"),
)
#: Measured figures that vary from request to request: the keys of their lowest and
#: highest measurement, when the metric reports them.
RANGES = {"decode_tokens_per_s": ("decode_tokens_per_s_low", "decode_tokens_per_s_high")}


def ranges_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two measured (lowest, highest) ranges share a value: the measurements
    cannot tell the two figures apart."""
    return max(a[0], b[0]) <= min(a[1], b[1])


def add_ratios(rows: Mapping[str, dict[str, Any]], baseline: Mapping[str, Any]) -> None:
    """Each row's derived ratios (``perplexity_ratio``, ...): its figure over the
    ``baseline`` row's (the finetuned model's)."""
    from unbottle.core.config.evaluation_plan import DERIVED_METRICS

    for ratio, (figure, _) in DERIVED_METRICS.items():
        base = baseline.get(figure)
        if not base:
            continue
        for row in rows.values():
            if figure in row:
                row[ratio] = row[figure] / base


def _cell(key: str, fmt: str, value: Any, row: Mapping[str, Any] | None = None) -> str:
    """A figure in the column's format; one with a measured range shows it after it."""
    if value is None or value == "":
        return "–"
    text = fmt.format(value * _SCALE.get(key, 1))
    low, high = RANGES.get(key, ("", ""))
    if row is not None and row.get(low) is not None and row.get(high) is not None:
        scale = _SCALE.get(key, 1)
        text += f" ({fmt.format(row[low] * scale)}–{fmt.format(row[high] * scale)})"
    return text


def pareto_cell(name: str, fronts: Mapping[str, list[str]]) -> str:
    """Which frontiers a variant is on: "size, speed", or "–"."""
    on = [FRONTIER_LABELS[f] for f, members in fronts.items() if name in members]
    return ", ".join(on) or "–"


def plugin_columns(metrics: Iterable[Any]) -> list[tuple[str, str, str]]:
    """The columns metric classes declare (``columns = {name: ReportColumn}``), as
    (key, title, format), after the built-in ones and without repeating a key."""
    known = {key for key, _, _ in COLUMNS}
    out = []
    for metric in metrics:
        for key, column in (getattr(metric, "columns", None) or {}).items():
            if key in known:
                continue
            known.add(key)
            arrow = {"lower": " ↓", "higher": " ↑"}.get(column.direction or "", "")
            out.append((key, f"{column.label}{arrow}", column.format))
    return out


def markdown_table(
    rows: dict[str, dict[str, Any]],
    fronts: Mapping[str, list[str]] | None = None,
    extra_columns: Iterable[tuple[str, str, str]] = (),
) -> str:
    """One row per variant; ``extra_columns`` (key, title, format) after the built-in
    ones; with ``fronts``, a last column naming its Pareto frontiers."""
    columns = [c for c in [*COLUMNS, *extra_columns] if any(c[0] in row for row in rows.values())]
    shots = sorted({str(row["shots"]) for row in rows.values() if "shots" in row}) or ["k"]
    titles = [title.replace("{shots}", "/".join(shots)) for _, title, _ in columns]
    titles += ["Pareto"] if fronts else []
    head = "| variant | " + " | ".join(titles) + " |"
    rule = "|---|" + "---:|" * len(titles)
    body = []
    for name, row in rows.items():
        cells = [_cell(key, fmt, row.get(key), row) for key, _, fmt in columns]
        if fronts:
            cells.append(pareto_cell(name, fronts))
        body.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def pareto_front(
    points: Mapping[str, tuple[float, float]],
    better: tuple[str, str],
    x_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> list[str]:
    """The names no other point dominates, in input order.

    ``better`` says for x and y whether "lower" or "higher" is better. A point dominates
    another when it is at least as good on both axes and strictly better on one; equal
    points do not dominate each other, so both stay.

    ``x_ranges`` gives, for the points whose x was measured several times, the (lowest,
    highest) measurement: two such points whose ranges overlap are equal on x, since the
    measurements cannot tell them apart, and one is better only when all its
    measurements are. A decode speed of 27.1 against 26.5 tokens/s, each varying by more
    than that between requests, puts neither ahead on speed.
    """
    sign = [1 if b == "lower" else -1 for b in better]  # minimise sign * value
    x_ranges = x_ranges or {}

    def span(name: str) -> tuple[float, float]:
        """The point's x as a (best, worst) interval in minimised units."""
        low, high = x_ranges.get(name, (points[name][0], points[name][0]))
        return tuple(sorted((sign[0] * low, sign[0] * high)))  # type: ignore[return-value]

    def compare(value_a: float, value_b: float) -> int:
        return (value_a > value_b) - (value_a < value_b)

    def x_order(a: str, b: str) -> int:
        """-1 when a is better on x than b, 1 when worse, 0 when they cannot be told apart."""
        if (a in x_ranges or b in x_ranges) and ranges_overlap(span(a), span(b)):
            return 0  # measurements that cannot tell them apart
        return compare(span(a)[0], span(b)[0])

    def dominates(b: str, a: str) -> bool:
        on_x = x_order(b, a)
        on_y = compare(sign[1] * points[b][1], sign[1] * points[a][1])
        return on_x <= 0 and on_y <= 0 and (on_x < 0 or on_y < 0)

    return [a for a in points if not any(dominates(b, a) for b in points if b != a)]


def quality_axis(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    for key, better in QUALITY:
        if any(key in row for row in rows.values()):
            return key, better
    return None


def frontiers(
    rows: Mapping[str, Mapping[str, Any]], candidates: Iterable[str]
) -> dict[str, list[str]]:
    """For each trade-off the report draws, the candidates on its Pareto frontier."""
    quality = quality_axis(rows)
    out: dict[str, list[str]] = {}
    if quality is None:
        return out
    for name, x_key, _, x_better in TRADEOFFS:
        points = {
            c: (float(rows[c][x_key]), float(rows[c][quality[0]]))
            for c in candidates
            if x_key in rows[c] and quality[0] in rows[c]
        }
        low, high = RANGES.get(x_key, ("", ""))
        ranges = {
            c: (float(rows[c][low]), float(rows[c][high]))
            for c in points
            if low in rows[c] and high in rows[c]
        }
        if points:
            out[name] = pareto_front(points, (x_better, quality[1]), ranges)
    return out


def plot_tradeoffs(
    rows: Mapping[str, Mapping[str, Any]],
    fronts: Mapping[str, list[str]],
    out_dir: Path,
    reference: str | None = None,
) -> list[Path]:
    """One PNG per trade-off: every variant, its frontier joined by a line, the reference
    model as a grey cross, a measured range as a grey bar. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    quality = quality_axis(rows)
    if quality is None:
        return []
    q_key, q_better = quality
    written = []
    for name, x_key, x_label, x_better in TRADEOFFS:
        if name not in fronts:
            continue
        scale = _SCALE.get(x_key, 1)
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        front = fronts[name]
        for variant, row in rows.items():
            if x_key not in row or q_key not in row:
                continue
            x, y = row[x_key] * scale, row[q_key]
            low, high = RANGES.get(x_key, ("", ""))
            if low in row and high in row:  # the slowest and fastest of its requests
                spread = [[x - row[low] * scale], [row[high] * scale - x]]
                ax.errorbar(x, y, xerr=spread, fmt="none", ecolor="0.6", capsize=2, zorder=1)
            if variant == reference:
                ax.scatter(x, y, marker="x", color="0.5", zorder=2)
            elif variant in front:
                ax.scatter(x, y, s=60, color="tab:red", edgecolor="black", zorder=3)
            else:
                ax.scatter(x, y, s=40, color="tab:blue", alpha=0.7, zorder=2)
            ax.annotate(variant, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        line = sorted((rows[v][x_key] * scale, rows[v][q_key]) for v in front)
        ax.step(
            [p[0] for p in line],
            [p[1] for p in line],
            where="post" if x_better == "lower" else "pre",
            color="tab:red",
            linewidth=1,
            label="Pareto frontier",
        )
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{q_key} ({q_better} is better)")
        ax.set_title(f"{q_key} vs {x_label.split(' (')[0].split(',')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def table_rows(rows: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows as flat records that all have the same columns (a CSV for DVC plots):
    every metric any row has ("" where a row lacks it), plus size in MB for an axis."""
    keys: list[str] = []
    for row in rows.values():
        keys.extend(k for k in row if k not in keys)
    if "size_bytes" in keys:
        keys.append("size_mb")
    out = []
    for name, row in rows.items():
        record = {"variant": name, **{k: row.get(k, "") for k in keys}}
        if "size_bytes" in row:
            record["size_mb"] = row["size_bytes"] / 1e6
        out.append(record)
    return out


def samples_markdown(samples: Mapping[str, Mapping[str, Any]]) -> str:
    """Generated text under the table, so a person can read what the numbers mean."""
    parts = []
    for variant, kinds in samples.items():
        lines = []
        for item in kinds.get("generations", []):
            lines.append(f"- *{item['prompt']}* → {item['continuation'].strip()!r}")
        for item in kinds.get("accuracy", []):
            mark = "✓" if item["correct"] else "✗"
            lines.append(
                f"- {mark} {item['question']} → {item['prediction']!r} (expected "
                f"{item['answer']!r})"
            )
        if lines:
            parts.append(f"### {variant}\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def report_markdown(
    table: str,
    fronts: Mapping[str, list[str]],
    plots: Iterable[Path],
    samples: Mapping[str, Mapping[str, Any]],
) -> str:
    """The whole report.md: table, frontiers, plots, samples."""
    sections = ["# Evaluation", table]
    labels = {"quality_vs_size": "quality and size", "quality_vs_speed": "quality and speed"}
    lines = [
        f"- Best trade-offs of {labels[name]} (Pareto frontier): {', '.join(members)}"
        for name, members in fronts.items()
    ]
    if lines:
        sections.append("\n".join(lines))
    images = [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots]
    if images:
        sections.append("\n\n".join(images))
    text = samples_markdown(samples)
    if text:
        sections.append("## Samples\n\n" + text)
    return "\n\n".join(sections) + "\n"
