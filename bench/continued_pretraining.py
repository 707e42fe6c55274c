"""Continued pretraining of a released model on the user's prose (``pretrain.continued``),
measured on SmolLM2-135M-Instruct with the flow of ``examples/smollm2``.

The example runs twice, each in its own fresh project, by the CLI a user runs, sharing one
GGUF conversion cache:

- ``released``: the example as it is, the released model finetuned (LoRA, chat format)
  on the demo's question/answer pairs;
- ``continued``: the same with ``pretrain.continued`` (``--continued``, a YAML mapping)
  first, which trains the released model further on the demo's prose.

Each project runs ``unbottle stage`` pretrain, finetune, compress (the example's GPTQ int4
variant) and evaluate, the evaluation with three metrics: perplexity on the held-out prose,
perplexity of the held-out answers and zero-shot exact-match accuracy on the held-out
questions asked through the chat template, with its share of empty answers. The demo's
held-out questions ask about facts stated only in the prose: a released model finetuned
on the pairs alone can learn the answers' form but not those facts (BENCHMARKS.md,
"The released-model pipeline"); this measures what reading the prose first adds. Beside
it, the accuracy of answering each question with the commonest training answer to its
kind of question.

Everything goes to ``--out`` (JSON); the tables, the command, the machine and the date
replace the marked section of BENCHMARKS.md (``--markdown``).

    .venv/bin/python bench/continued_pretraining.py --cache-dir ~/.cache/unbottle  # ~30 min
    .venv/bin/python bench/continued_pretraining.py --continued '{steps: 2}' --steps 2 \\
        --calibration 4 --max-questions 10 --out /tmp/c.json --markdown /tmp/B.md  # a check
    .venv/bin/python bench/continued_pretraining.py --from-json \\
        bench/results/continued_pretraining.json
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
BEGIN = "<!-- continued_pretraining:begin -->"
END = "<!-- continued_pretraining:end -->"
SECTION = "## Continued pretraining of a released model (`bench/continued_pretraining.py`)"
ARMS = ("released", "continued")
STAGES = ("pretrain", "finetune", "compress", "evaluate")
METRICS = [
    {"name": "perplexity"},
    {"name": "answer_perplexity"},
    {"name": "accuracy", "samples": 8},
]
KEYS = ("perplexity", "answer_perplexity", "accuracy", "empty_answers")
DEFAULT_CONTINUED = "{steps: 150}"


def continued_arg(text: str) -> dict[str, Any]:
    parsed = yaml.safe_load(text)
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give pretrain.continued as a YAML mapping, e.g. '{{steps: 150}}'"
        )
    return parsed


def arm_params(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """The example's params with the reduced settings, three metrics, and for the
    ``continued`` arm, ``pretrain.continued``."""
    params = flow.project_params(args)
    params.setdefault("evaluate", {})["metrics"] = METRICS
    params.pop("deploy", None)  # not run here
    if arm == "continued":
        params["pretrain"]["continued"] = args.continued
    return params


def markdown(report: dict[str, Any]) -> str:
    host, setup = report["machine"], report["settings"]
    arms = report["arms"]
    continued = arms["continued"]["pretrain_metrics"]
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
        f"Flow: `{setup['params_file']}` twice, each in a fresh project: SmolLM2-135M-Instruct "
        f"LoRA r={setup['lora_r']} for {setup['steps']} steps × batch {setup['batch_size']} "
        f"in its chat format on {setup['qa_train_pairs']} demo pairs, then "
        f"{', '.join(setup['variants'])} (calibration {setup['calibration_samples']} windows "
        f"of {setup['calibration_seq_len']} tokens); {setup['max_questions']} held-out "
        "questions, greedy, through the chat template. The `continued` project first trains "
        f"the released model further on the demo's prose: `pretrain.continued: "
        f"{json.dumps(report['continued'])}`, {continued.get('train_tokens', 0):,} tokens, "
        f"{continued.get('epochs', 0):.2f} epochs of its {continued.get('corpus_tokens', 0):,} "
        f"tokens, {continued.get('precision', '?')}, final training loss "
        f"{real.fmt(continued.get('final_loss'), 3)}.",
        "",
        "| project | pretrain (s) | finetune (s) | compress (s) | evaluate (s) | pretrain peak "
        "RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        stages = {s["stage"]: s for s in arms[arm]["stages"]}
        cells = [real.fmt(stages[s]["wall_s"], 0) if s in stages else "–" for s in STAGES]
        peak = real.fmt(stages["pretrain"]["peak_rss_mb"], 0) if "pretrain" in stages else "–"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {peak} |")
    lines += [
        "",
        "| project | model | prose perplexity | answer perplexity | accuracy | empty answers |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        rows = arms[arm]["rows"]
        # The pipeline's order; a JSON written with sorted keys has lost it.
        first = [name for name in ("pretrained", "finetuned") if name in rows]
        for name in first + [name for name in rows if name not in first]:
            row = rows[name]
            label = {"pretrained": "pretrained (zero-shot)"}.get(name, name)
            cells = " | ".join(flow.quality_cell(key, row.get(key)) for key in KEYS)
            lines.append(f"| {arm} | {label} | {cells} |")
    baseline = report.get("majority_answer_accuracy")
    if baseline is not None:
        lines += [
            "",
            "Answering every question with the commonest training answer to its kind of "
            f"question scores {baseline:.0%}.",
        ]
    lines += ["", "The finetuned models' first answers to the held-out questions:", ""]
    lines += ["| project | answers |", "|---|---|"]
    for arm in ARMS:
        answers = arms[arm]["samples"].get("finetuned", [])
        shown = ", ".join(f"`{a}`" if a else "∅" for a in answers[:8])
        lines.append(f"| {arm} | {shown} |")
    lines += ["", END]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flow.add_project_arguments(parser)
    parser.add_argument(
        "--continued",
        type=continued_arg,
        default=continued_arg(DEFAULT_CONTINUED),
        help=f"pretrain.continued of the second project, a YAML mapping ({DEFAULT_CONTINUED})",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench/results/continued_pretraining.json"
    )
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument(
        "--from-json", type=Path, help="write the section from a recorded --out; run nothing"
    )
    parser.set_defaults(variant=[])  # the example's own variants only
    args = parser.parse_args(argv)
    if args.from_json is None:
        flow.check_project_arguments(args)
    return args


def run_arm(arm: str, params: dict[str, Any], project: Path, env: dict[str, str]) -> dict[str, Any]:
    """One project's stages; its stage records, rows and samples."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), "utf-8")
    unbottle = [sys.executable, "-m", "unbottle"]

    def run(*command: str, log: str) -> dict[str, Any]:
        real.progress(f"continued_pretraining [{arm}]: unbottle {' '.join(command)}")
        result = flow.run_process([*unbottle, *command], project, env, project / log)
        if not result["ok"]:
            real.fail(f"[{arm}] unbottle {' '.join(command)}: {result['error']} (log: {log})")
        return result

    run("data", "demo", "--out", flow.demo_out(params), log="data.log")
    stages = [{"stage": s, **run("stage", s, log=f"{s}.log")} for s in STAGES]
    rows, samples = flow.quality_rows(project, KEYS)
    pretrain = json.loads((project / "metrics/pretrain.json").read_text(encoding="utf-8"))
    return {"stages": stages, "rows": rows, "samples": samples, "pretrain_metrics": pretrain}


def main(argv: list[str]) -> int:
    from unbottle.core.store.artifacts import write_json_atomic

    args = parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
        rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    host = real.machine()
    commit, command = flow.provenance("continued_pretraining.py", argv)
    with tempfile.TemporaryDirectory(prefix="continued_pretraining.") as tmp:
        root = (args.project or Path(tmp) / "project").resolve()
        env = flow.stage_env((args.cache_dir or root / ".unbottle-cache").resolve())
        arms = {}
        for arm in ARMS:
            params = arm_params(args, arm)
            arms[arm] = run_arm(arm, params, root / arm, env)
        released = root / "released"
        data = params["data"]
        setup = flow.settings(args, arm_params(args, "released"), released)
        report: dict[str, Any] = {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "commit": commit,
            "machine": host,
            "settings": setup,
            "continued": args.continued,
            "arms": arms,
            "majority_answer_accuracy": flow.majority_baseline(
                released, data["qa_train"], data["qa_test"], setup["max_questions"]
            ),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        }
    write_json_atomic(args.out, report)
    rewrite_section(args.markdown, markdown(report), begin=BEGIN, end=END, heading=SECTION)
    real.progress(f"continued_pretraining: wrote {args.out} and the section of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
