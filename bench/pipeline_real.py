"""The released-model flow of ``examples/smollm2`` on SmolLM2-135M-Instruct, stage by stage
(issue #15, items 3 and 8).

What a user runs, in a fresh project directory (a temporary one unless ``--project``):

1. ``params.yaml``: ``examples/smollm2/params.yaml`` (``--params``), with the reduced
   settings below written into it when given, so every stage reads the same file;
2. ``unbottle data demo --params params.yaml --out my_data``: the demo's prose and
   question/answer pairs standing in for the user's own files, at the ``data.*`` paths the
   params name;
3. ``unbottle stage NAME`` for pretrain (the GGUF converted to float32 safetensors),
   finetune (LoRA in the chat format), compress (GPTQ int4 g64), evaluate (the default
   metrics on the pretrained, finetuned and compressed models) and deploy (the ``server``
   target), each in its own process: the same stage functions ``unbottle run`` and
   ``dvc repro`` call, one process each so that each stage's memory is its own.

Per stage: the wall time of its process (Python start-up and imports included), the
stage's own time from ``metrics/<stage>_timing.json``, and its peak resident memory, the
``ru_maxrss`` that ``os.wait4`` returns for the process (on Linux the largest of the
process and the children it waited for). The GGUF conversion cache
(``UNBOTTLE_CACHE_DIR``) is a fresh folder in the project unless ``--cache-dir`` names one,
so by default pretrain includes the conversion a first run pays.

From ``artifacts/evaluate/evaluation.json``: accuracy (exact match on the first
``evaluate.max_questions`` held-out questions, asked through the chat template the server
uses), perplexity on the held-out prose and on the held-out answers (``answer_perplexity``)
and decode tokens/s per model. The ``pretrained``
row is the released model's zero-shot accuracy on the same questions. Two verdicts: did
evaluate finish in under 5 minutes (its process's wall time), and does the finetuned
model's accuracy beat the released model's zero-shot accuracy. Next to them, what
answering each held-out question with the commonest training answer to its kind of
question scores (the demo's records name their ``attribute``): with a released model the
demo's held-out facts are stated only in the prose, which nothing trains on, so that is
the level finetuning can reach by learning the answers' form. Evaluate's seconds per
model and metric come from the stage's log.

Everything goes to ``--out`` (JSON); the table, the command, the machine, the load average
and the date replace the marked section of BENCHMARKS.md (``--markdown``).

    .venv/bin/python bench/pipeline_real.py                  # the full flow (~25 min idle)
    .venv/bin/python bench/pipeline_real.py --steps 5 --calibration 4 --max-questions 10 \\
        --out /tmp/p.json --markdown /tmp/B.md               # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_real as real
from sections import rewrite_section

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- pipeline_real:begin -->"
END = "<!-- pipeline_real:end -->"
SECTION = "## The released-model pipeline on SmolLM2-135M (`bench/pipeline_real.py`)"
STAGES = ("pretrain", "finetune", "compress", "evaluate", "deploy")
EVALUATE_LIMIT_S = 300  # issue #15, item 3: evaluate under 5 minutes on 2 cores
#: Where ``unbottle data demo --out`` puts each file, by data key.
DEMO_FILES = {
    "train_text": "corpus/train.txt",
    "valid_text": "corpus/valid.txt",
    "qa_train": "qa/train.jsonl",
    "qa_test": "qa/test.jsonl",
}
#: The columns of the evaluation table: (row key, heading, digits).
COLUMNS = (
    ("accuracy", "accuracy", 3),
    ("perplexity", "perplexity", 3),
    ("perplexity_ratio", "× finetuned", 3),
    ("answer_perplexity", "answer perplexity", 3),
    ("answer_perplexity_ratio", "× finetuned (answers)", 3),
    ("decode_tokens_per_s", "decode tokens/s b1", 1),
    ("size_bytes", "size (MB)", 1),
)


# ------------------------------------------------------------------------- the project


def project_params(args: argparse.Namespace) -> dict[str, Any]:
    """The example's params with the reduced settings of the command line written in."""
    params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    if args.steps is not None:
        params["finetune"]["train"]["steps"] = args.steps
        warmup = params["finetune"]["train"].get("warmup_steps", 0)
        params["finetune"]["train"]["warmup_steps"] = min(warmup, max(args.steps - 1, 0))
    if args.calibration is not None:
        params["compress"]["calibration"]["samples"] = args.calibration
    if args.max_questions is not None:
        params.setdefault("evaluate", {})["max_questions"] = args.max_questions
    for name, steps in args.variant:
        params["compress"]["variants"][name] = steps
    return params


def variant_arg(text: str) -> tuple[str, list[Any]]:
    """``NAME=STEPS``, the steps in YAML, e.g. ``rtn4=[{quantize: rtn, bits: 4}]``."""
    name, sep, steps = text.partition("=")
    parsed = yaml.safe_load(steps) if sep else None
    if not name or not isinstance(parsed, list):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=STEPS, the steps a YAML list, e.g. "
            "'rtn4=[{quantize: rtn, bits: 4, group_size: 64}]'"
        )
    return name, parsed


def demo_out(params: dict[str, Any]) -> str:
    """The ``--out`` of ``unbottle data demo`` that writes the files at the params' paths."""
    data = params["data"]
    out = Path(data["train_text"]).parent.parent
    for key, rel in DEMO_FILES.items():
        if Path(data[key]) != out / rel:
            real.fail(
                f"--params: data.{key} is {data[key]!r}; this benchmark writes the "
                f"demo's files under one folder, so it must be {str(out / rel)!r}"
            )
    return str(out)


def stage_env(cache_dir: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the venv's `unbottle`
    return dict(
        os.environ,
        UNBOTTLE_CACHE_DIR=str(cache_dir),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
    )


def run_process(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``command``; its exit code, wall time, peak RSS (wait4's ru_maxrss) and, on
    failure, the last line it printed. Its output goes to ``log``."""
    began = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.perf_counter() - began
    result: dict[str, Any] = {
        "ok": proc.returncode == 0,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kB
    }
    if proc.returncode != 0:
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        result["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
    return result


def stage_seconds(project: Path, stage: str) -> float | None:
    """The stage's own time, as it recorded it (metrics/<stage>_timing.json)."""
    timing = project / "metrics" / f"{stage}_timing.json"
    if not timing.is_file():
        return None
    seconds = json.loads(timing.read_text(encoding="utf-8")).get("wall_s")
    return round(seconds, 1) if isinstance(seconds, (int, float)) else None


def evaluation(project: Path) -> dict[str, Any]:
    """The evaluate stage's table: each model's accuracy, perplexity, speed and size."""
    report = json.loads((project / "artifacts/evaluate/evaluation.json").read_text("utf-8"))
    rows = report["variants"]
    keep = ("peak_memory_bytes", *(key for key, _, _ in COLUMNS))
    return {
        "order": report["order"],
        "rows": {name: {k: rows[name].get(k) for k in keep} for name in report["order"]},
        "table": report["table"],
    }


def quality_rows(
    project: Path, keys: tuple[str, ...]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Each evaluated model's ``keys``, in the evaluation's order, and each model's first
    accuracy predictions (the benchmarks that compare projects by quality read these)."""
    report = json.loads((project / "artifacts/evaluate/evaluation.json").read_text("utf-8"))
    rows = {name: {k: report["variants"][name].get(k) for k in keys} for name in report["order"]}
    samples = {
        name: [s["prediction"] for s in (per_metric or {}).get("accuracy") or []]
        for name, per_metric in (report.get("samples") or {}).items()
    }
    return rows, samples


def quality_cell(key: str, value: Any) -> str:
    """A table cell: shares as percentages, other figures to 3 decimals, "–" for none."""
    if value is None:
        return "–"
    if key in ("accuracy", "empty_answers"):
        return f"{value:.0%}"
    return real.fmt(float(value), 3)


def verdicts(
    stages: list[dict[str, Any]], table: dict[str, Any] | None, baseline: float | None
) -> dict[str, Any]:
    by_name = {s["stage"]: s for s in stages}
    out: dict[str, Any] = {"majority_answer_accuracy": baseline}
    if by_name.get("evaluate", {}).get("ok"):
        seconds = by_name["evaluate"]["wall_s"]
        out.update(evaluate_s=seconds, evaluate_under_5_min=seconds < EVALUATE_LIMIT_S)
    if table is not None:
        rows = table["rows"]
        tuned, zero_shot = rows["finetuned"].get("accuracy"), rows["pretrained"].get("accuracy")
        if tuned is not None and zero_shot is not None:
            out.update(
                finetuned_accuracy=tuned,
                zero_shot_accuracy=zero_shot,
                finetuned_beats_zero_shot=tuned > zero_shot,
            )
    return out


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO +(.*)$")


def evaluate_breakdown(log: Path) -> dict[str, dict[str, float]]:
    """Seconds per model and metric of the evaluate stage, from its log: the stage logs
    ``evaluate MODEL: METRIC`` as each metric starts and ``evaluation:`` when all are done,
    so each metric lasts until the next line (a model's last metric includes loading the
    next model)."""
    marks: list[tuple[datetime.datetime, str | None, str | None]] = []
    for line in log.read_text(encoding="utf-8").splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        when = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
        started = re.fullmatch(r"evaluate (\S+): (\S+)", match[2])
        if started:
            marks.append((when, started[1], started[2]))
        elif match[2].startswith("evaluation:"):
            marks.append((when, None, None))
    seconds: dict[str, dict[str, float]] = {}
    for (when, model, metric), (after, _, _) in itertools.pairwise(marks):
        if model is not None and metric is not None:
            spent = round((after - when).total_seconds(), 1)
            seconds.setdefault(model, {})[metric] = spent
    return seconds


def majority_baseline(project: Path, qa_train: str, qa_test: str, questions: int) -> float | None:
    """Exact-match accuracy of answering every held-out question with the commonest
    training answer to questions of its kind: what learning the answers' form and
    frequencies alone reaches. Needs an ``attribute`` field on each record (the demo's
    data have one); None without it."""
    from collections import Counter

    from unbottle.core.data.prompts import exact_match

    def records(path: str) -> list[dict[str, Any]]:
        lines = (project / path).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    train, test = records(qa_train), records(qa_test)[:questions]
    if not test or not all("attribute" in r and "answer" in r for r in [*train, *test]):
        return None
    counts: dict[str, Counter[str]] = {}
    for r in train:
        counts.setdefault(r["attribute"], Counter())[r["answer"]] += 1
    hits = 0
    for r in test:
        common = counts.get(r["attribute"])
        hits += bool(common) and exact_match(common.most_common(1)[0][0], r["answer"])
    return hits / len(test)


# ----------------------------------------------------------------------------- report


def fmt_cell(key: str, value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if key == "size_bytes":
        value = value / 1e6
    return real.fmt(float(value), digits)


def markdown(report: dict[str, Any]) -> str:
    m, s, v = report["machine"], report["settings"], report["verdicts"]
    stage_rows = [
        "| stage | wall (s) | in the stage (s) | peak RSS (MB) | |",
        "|---|---:|---:|---:|---|",
    ]
    for st in report["stages"]:
        note = "" if st["ok"] else f"failed: {st.get('error', '').replace('|', chr(92) + '|')}"
        stage_rows.append(
            f"| {st['stage']} | {real.fmt(st['wall_s'], 1)} | {real.fmt(st.get('stage_s'), 1)} "
            f"| {real.fmt(st['peak_rss_mb'], 0)} | {note} |"
        )
    lines = [
        BEGIN,
        "",
        f"Measured {report['date']} by `{report['command']}` (at commit {report['commit']}; "
        "it writes `bench/results/pipeline_real.json` and this section).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average at "
        f"start {', '.join(map(str, m['load_average_at_start']))}, at the end "
        f"{', '.join(map(str, report['load_average_at_end']))}; torch {m['torch']}, "
        f"transformers {m['transformers']}, onnxruntime {m['onnxruntime']}.",
        "",
        f"Flow: `{s['params_file']}` in a fresh project: {s['model']} as `pretrain.source` "
        f"({'converted from GGUF in this run' if s['fresh_conversion'] else 'conversion cached'}); "
        f"LoRA r {s['lora_r']}, {s['steps']} steps × batch {s['batch_size']} on "
        f"{s['qa_train_pairs']} question/answer pairs in the `{s['format']}` format; "
        f"{', '.join(s['variants'])} calibrated on {s['calibration_samples']} windows of "
        f"{s['calibration_seq_len']} tokens; evaluate's metrics "
        f"{', '.join(s['metrics'])} on {s['max_questions']} held-out questions; deploy "
        f"target `{s['deploy_target']}`. Each stage is `unbottle stage NAME` in its own "
        "process: wall = the process (start-up and imports included), in the stage = "
        "`metrics/<stage>_timing.json`, peak RSS = the process's `ru_maxrss`.",
        "",
        *stage_rows,
        "",
    ]
    table = report.get("evaluation")
    if table:
        head = "| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
        lines += [head, "|---|" + "---:|" * len(COLUMNS)]
        for name in table["order"]:
            row = table["rows"][name]
            label = "pretrained (released, zero-shot)" if name == "pretrained" else name
            cells = [fmt_cell(k, row.get(k), d) for k, _, d in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    spent = report.get("evaluate_seconds") or {}
    if spent:
        metrics = list(dict.fromkeys(m for per in spent.values() for m in per))
        lines += [
            "Evaluate, seconds per model and metric (from the stage's log):",
            "",
            "| model | " + " | ".join(metrics) + " | total |",
            "|---|" + "---:|" * (len(metrics) + 1),
        ]
        for name, per in spent.items():
            cells = [real.fmt(per.get(m), 1) for m in metrics]
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {real.fmt(sum(per.values()), 1)} |"
            )
        lines.append("")
    if "evaluate_under_5_min" in v:
        lines.append(
            f"- Evaluate took {v['evaluate_s']:.0f} s: "
            + ("under" if v["evaluate_under_5_min"] else "**not** under")
            + f" the 5 minutes of issue #15 ({EVALUATE_LIMIT_S} s)."
        )
    if "finetuned_beats_zero_shot" in v:
        lines.append(
            f"- Finetuned accuracy {v['finetuned_accuracy']:.3f} against the released "
            f"model's zero-shot {v['zero_shot_accuracy']:.3f} on the same questions: "
            + ("beats it." if v["finetuned_beats_zero_shot"] else "does **not** beat it.")
        )
    if v.get("majority_answer_accuracy") is not None:
        lines.append(
            "- Answering every question with the commonest training answer to its kind of "
            f"question scores {v['majority_answer_accuracy']:.3f}: the held-out questions "
            "ask about facts stated only in the prose, which a released model never trains "
            "on, so finetuning can teach the answers' form and frequencies, not the facts."
        )
    if s.get("added_variants"):
        lines.append(
            "- Variants added to the example's on the command line (`--variant`): "
            + ", ".join(s["added_variants"])
            + "; the Flow line above names their steps."
        )
    if s["reduced"]:
        lines.append(
            "- Reduced settings (a check that the script runs, not a result): "
            + ", ".join(s["reduced"])
            + "."
        )
    lines += ["", END]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


def provenance(script: str, argv: list[str]) -> tuple[str, str]:
    """(the checkout's short commit, the command line as a person would type it)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return commit, f"python bench/{script}" + "".join(f" {shlex.quote(a)}" for a in argv)


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that runs the example in a fresh project (this one's and
    calibration_source.py's); :func:`check_project_arguments` checks them."""
    parser.add_argument("--params", type=Path, default=REPO / "examples/smollm2/params.yaml")
    parser.add_argument("--steps", type=int, help="finetune.train.steps (default: the params')")
    parser.add_argument("--calibration", type=int, help="compress.calibration.samples")
    parser.add_argument("--max-questions", type=int, help="evaluate.max_questions")
    parser.add_argument(
        "--project", type=Path, help="the project folder (default: a temporary one)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="UNBOTTLE_CACHE_DIR, the GGUF conversion cache (default: fresh, in the project)",
    )


def check_project_arguments(args: argparse.Namespace) -> None:
    real.require_at_least_one(args, "steps", "calibration", "max_questions")
    if not args.params.is_file():
        real.fail(f"--params: {args.params} is not a file")
    if args.project is not None and args.project.exists() and any(args.project.iterdir()):
        real.fail(f"--project: {args.project} is not empty; the flow starts from a fresh project")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_project_arguments(parser)
    parser.add_argument(
        "--variant",
        type=variant_arg,
        action="append",
        default=[],
        help="NAME=STEPS: a compress variant added to the example's (repeatable), e.g. "
        "'rtn4=[{quantize: rtn, bits: 4, group_size: 64}]' for issue #15's two variants",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/pipeline_real.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    check_project_arguments(args)
    return args


def settings(args: argparse.Namespace, params: dict[str, Any], project: Path) -> dict[str, Any]:
    from unbottle.core.config.loading import load_params

    loaded = load_params(project / "params.yaml", [])  # validated as the stages read it
    train, method = loaded.finetune.train, loaded.finetune.method
    qa_train = project / loaded.data.qa_train
    reduced = [
        f"{flag} {value}"
        for flag, value in (
            ("--steps", args.steps),
            ("--calibration", args.calibration),
            ("--max-questions", args.max_questions),
        )
        if value is not None
    ]
    source = loaded.pretrain.source
    model = source.package if source and source.package else str(source and source.path)
    return {
        "params_file": os.path.relpath(args.params.resolve(), REPO),
        "model": model,
        "fresh_conversion": args.cache_dir is None,
        "lora_r": method.options.get("r"),
        "steps": train.steps,
        "batch_size": train.batch_size,
        "format": loaded.finetune.format,
        "qa_train_pairs": sum(1 for line in qa_train.open(encoding="utf-8") if line.strip()),
        "variants": [
            f"{name} ({', '.join(step.describe() for step in steps)})"
            for name, steps in loaded.compress.variants.items()
        ],
        "calibration_samples": loaded.compress.calibration.samples,
        "calibration_seq_len": loaded.compress.calibration.seq_len,
        "metrics": [ref.name for ref in loaded.evaluate.metrics],
        "max_questions": loaded.evaluate.max_questions,
        "deploy_target": loaded.deploy.target.name,
        "reduced": reduced,
        "added_variants": [name for name, _ in args.variant],
        "params": params,
    }


def main(argv: list[str]) -> int:
    from unbottle.core.store.artifacts import write_json_atomic

    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    host = real.machine()
    params = project_params(args)
    commit, command = provenance("pipeline_real.py", argv)
    with tempfile.TemporaryDirectory(prefix="pipeline_real.") as tmp:
        project = args.project or Path(tmp) / "project"
        project.mkdir(parents=True, exist_ok=True)
        project = project.resolve()
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), "utf-8")
        env = stage_env((args.cache_dir or project / ".unbottle-cache").resolve())
        unbottle = [sys.executable, "-m", "unbottle"]
        real.progress(f"pipeline_real: project {project}")
        written = run_process(
            [*unbottle, "data", "demo", "--out", demo_out(params)],
            project,
            env,
            project / "data.log",
        )
        if not written["ok"]:
            real.fail(f"unbottle data demo: {written['error']}")
        setup = settings(args, params, project)
        report: dict[str, Any] = {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "commit": commit,
            "machine": host,
            "settings": setup,
            "stages": [],
        }
        for i, stage in enumerate(STAGES):
            real.progress(f"[{i + 1}/{len(STAGES)}] unbottle stage {stage}")
            record = {
                "stage": stage,
                **run_process([*unbottle, "stage", stage], project, env, project / f"{stage}.log"),
            }
            record["stage_s"] = stage_seconds(project, stage)
            report["stages"].append(record)
            real.progress(
                f"[{i + 1}/{len(STAGES)}] {stage}: "
                + (
                    f"{record['wall_s']:.0f} s, peak RSS {record['peak_rss_mb']:,.0f} MB"
                    if record["ok"]
                    else f"failed: {record['error']} (log: {project / f'{stage}.log'})"
                )
            )
            if not record["ok"]:
                break
        evaluated = any(s["stage"] == "evaluate" and s["ok"] for s in report["stages"])
        table = evaluation(project) if evaluated else None
        report["evaluation"] = table
        data = params["data"]
        report["verdicts"] = verdicts(
            report["stages"],
            table,
            majority_baseline(project, data["qa_train"], data["qa_test"], setup["max_questions"]),
        )
        if evaluated:
            report["evaluate_seconds"] = evaluate_breakdown(project / "evaluate.log")
        deploy_metrics = project / "metrics" / "deploy.json"
        if deploy_metrics.is_file():
            report["deploy"] = json.loads(deploy_metrics.read_text(encoding="utf-8"))
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json_atomic(args.out, report)
        rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
        real.progress(f"pipeline_real: wrote {args.out} and the section of {args.markdown}")
    failed = [s["stage"] for s in report["stages"] if not s["ok"]]
    if failed:
        print(f"error: stage {failed[0]} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
