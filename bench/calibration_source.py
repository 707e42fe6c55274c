"""What the compressors calibrate on, for a chat model: ``compress.calibration.source``
on SmolLM2-135M-Instruct LoRA-finetuned in its chat format (``examples/smollm2``).

The example's finetuned model is compressed once per source, each by the CLI a user runs:

- ``train_text``: windows of the demo's prose (the default);
- ``qa_train``: the training pairs rendered as finetuning rendered them (ChatML with
  SmolLM2's system turn), each window starting where a conversation starts;
- ``both``: half of each.

For every source the same variants (Wanda and SparseGPT at 2:4, Wanda at 50%, GPTQ int4
g64 with static groups, unless ``--variant`` names others) are built by ``unbottle stage
compress -S compress.calibration.source=SOURCE`` and measured by ``unbottle stage
evaluate`` with three metrics: perplexity on the held-out prose, perplexity of the
held-out answers (the finetuning loss on them), and zero-shot accuracy on the held-out
questions asked through the chat template, with its share of empty answers (an answer
whose first line is empty, shown ∅: the model ended its turn at once). The finetuned
model's row is the reference; the evaluation's row cache measures it once.

Everything goes to ``--out`` (JSON); the table, the command, the machine and the date
replace the marked section of BENCHMARKS.md (``--markdown``).

    .venv/bin/python bench/calibration_source.py --cache-dir ~/.cache/unbottle   # ~20 min
    .venv/bin/python bench/calibration_source.py --steps 5 --calibration 4 \\
        --max-questions 10 --variant 'w24=[{prune: wanda, pattern: "2:4"}]' \\
        --out /tmp/c.json --markdown /tmp/B.md                      # a quick check
    .venv/bin/python bench/calibration_source.py --from-json bench/results/calibration_source.json
    .venv/bin/python bench/calibration_source.py --variant \
        'kd20=[{distill: kd, layers: 20, steps: 100}]' --markdown /tmp/kd.md   # ~40 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_real as real
import pipeline_real as flow
from sections import rewrite_section

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- calibration_source:begin -->"
END = "<!-- calibration_source:end -->"
SECTION = "## Calibration data for a chat model (`bench/calibration_source.py`)"
SOURCES = ("train_text", "qa_train", "both")
VARIANTS = {
    "wanda-2of4": [{"prune": "wanda", "pattern": "2:4"}],
    "sparsegpt-2of4": [{"prune": "sparsegpt", "pattern": "2:4"}],
    "wanda50": [{"prune": "wanda", "sparsity": 0.5}],
    "gptq4": [{"quantize": "gptq", "bits": 4, "group_size": 64, "static_groups": True}],
}
METRICS = [
    {"name": "perplexity"},
    {"name": "answer_perplexity"},
    {"name": "accuracy", "samples": 8},
]
KEYS = ("perplexity", "perplexity_ratio", "answer_perplexity_ratio", "accuracy", "empty_answers")


def project_params(args: argparse.Namespace) -> dict[str, Any]:
    """The example's params, its variants replaced by this benchmark's, two metrics."""
    args.variant = list(args.variant or VARIANTS.items())
    base = flow.project_params(argparse.Namespace(**{**vars(args), "variant": []}))
    base["compress"]["variants"] = dict(args.variant)
    base.setdefault("evaluate", {})["metrics"] = METRICS
    base.pop("deploy", None)  # not run here
    return base


def markdown(report: dict[str, Any]) -> str:
    host, setup = report["machine"], report["settings"]
    sources = [s for s in SOURCES if s in report["sources"]]
    lines = [
        BEGIN,
        "",
        f"Measured {report['date']} at commit {report['commit']} by `{report['command']}`.",
        "",
        f"Machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB; load "
        f"average at start {', '.join(map(str, host['load_average_at_start']))}, at the end "
        f"{', '.join(map(str, report['load_average_at_end']))}; torch {host['torch']}, "
        f"transformers {host['transformers']}.",
        "",
        f"Model: SmolLM2-135M-Instruct, LoRA r={setup['lora_r']} for {setup['steps']} steps "
        f"in its chat format on {setup['qa_train_pairs']} demo pairs; calibration "
        f"{setup['calibration_samples']} windows of {setup['calibration_seq_len']} tokens; "
        f"{setup['max_questions']} held-out questions, greedy, through the chat template.",
        "",
    ]
    lines += [
        "| variant | calibration source | ppl / finetuned | answer ppl / finetuned | accuracy "
        "| empty answers |",
        "|---|---|---:|---:|---:|---:|",
    ]
    tuned = report["sources"][sources[0]]["rows"]["finetuned"]
    lines.append(
        "| finetuned (the reference) | – | "
        + " | ".join(flow.quality_cell(key, tuned.get(key)) for key in KEYS[1:])
        + " |"
    )
    for name in setup["variants"]:
        for source in sources:
            row = report["sources"][source]["rows"].get(name, {})
            cells = " | ".join(flow.quality_cell(key, row.get(key)) for key in KEYS[1:])
            lines.append(f"| {name} | {source} | {cells} |")
    lines += ["", "The first answers to the held-out questions, zero-shot:", ""]
    lines += ["| variant | source | answers |", "|---|---|---|"]
    for source in sources:
        for name, answers in report["sources"][source]["samples"].items():
            if name == "pretrained" or (name == "finetuned" and source != sources[0]):
                continue
            shown = ", ".join(f"`{a}`" if a else "∅" for a in answers[:6])
            lines.append(f"| {name} | {'–' if name == 'finetuned' else source} | {shown} |")
    lines += ["", END]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flow.add_project_arguments(parser)
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument(
        "--variant",
        type=flow.variant_arg,
        action="append",
        help="NAME=STEPS: a variant instead of the default four (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/calibration_source.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument(
        "--from-json", type=Path, help="write the section from a recorded --out; run nothing"
    )
    args = parser.parse_args(argv)
    if args.from_json is None:
        flow.check_project_arguments(args)
    return args


def main(argv: list[str]) -> int:
    from unbottle.core.store.artifacts import write_json_atomic

    args = parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
        rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    host = real.machine()
    params = project_params(args)
    commit, command = flow.provenance("calibration_source.py", argv)
    with tempfile.TemporaryDirectory(prefix="calibration_source.") as tmp:
        project = (args.project or Path(tmp) / "project").resolve()
        project.mkdir(parents=True, exist_ok=True)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), "utf-8")
        env = flow.stage_env((args.cache_dir or project / ".unbottle-cache").resolve())
        unbottle = [sys.executable, "-m", "unbottle"]

        def run(*command: str, log: str) -> dict[str, Any]:
            real.progress(f"calibration_source: unbottle {' '.join(command)}")
            result = flow.run_process([*unbottle, *command], project, env, project / log)
            if not result["ok"]:
                real.fail(f"unbottle {' '.join(command)}: {result['error']} (log: {log})")
            return result

        run("data", "demo", "--out", flow.demo_out(params), log="data.log")
        setup = flow.settings(args, params, project)
        for stage in ("pretrain", "finetune"):
            run("stage", stage, log=f"{stage}.log")
        report: dict[str, Any] = {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "commit": commit,
            "machine": host,
            "settings": {**setup, "variants": [name for name, _ in args.variant]},
            "sources": {},
        }
        for source in args.sources:
            choose = ["-S", f"compress.calibration.source={source}"]
            compressed = run("stage", "compress", *choose, log=f"compress-{source}.log")
            evaluated = run("stage", "evaluate", *choose, log=f"evaluate-{source}.log")
            rows, samples = flow.quality_rows(project, KEYS)
            report["sources"][source] = {
                "rows": rows,
                "samples": samples,
                "compress_wall_s": compressed["wall_s"],
                "evaluate_wall_s": evaluated["wall_s"],
            }
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json_atomic(args.out, report)
        rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
        real.progress(f"calibration_source: wrote {args.out} and the section of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
