"""The optional ``lm-eval`` metric: lm-evaluation-harness tasks from local files, scored
through an unbottle runner. Skipped where lm-eval is not installed (it is an extra)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import require_extra
from unbottle.core.config.loading import load_params
from unbottle.core.config.strategy_checks import check_strategies
from unbottle.core.contract.errors import ConfigError
from unbottle.core.contract.strategies import EvalContext
from unbottle.core.registry import get_registry

QA_TASK = """\
task: people_qa
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6}}
metric_list:
  - {{metric: exact_match, ignore_case: true, ignore_punctuation: true}}
"""

CHOICE_TASK = """\
task: people_choice
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc}}
"""


def test_an_uninstalled_harness_or_missing_tasks_fail_before_any_work(tmp_path):
    import importlib.util

    override = f"evaluate.metrics=[{{name: lm-eval, tasks: [x], include_path: {tmp_path}/no}}]"
    expected = (
        r"lm-evaluation-harness is not installed; pip install 'unbottle\[lm-eval\]'"
        if importlib.util.find_spec("lm_eval") is None
        else r"'[^']*/no' does not exist"
    )
    with pytest.raises(ConfigError, match=r"^evaluate\.metrics\[0\]\.include_path: " + expected):
        check_strategies(load_params(None, [override]), get_registry())


def test_a_path_the_system_refuses_is_a_config_error_not_a_plugin_failure(tmp_path):
    require_extra("lm_eval")
    refused = tmp_path / ("z" * 300) / "tasks"
    override = f"evaluate.metrics=[{{name: lm-eval, tasks: [x], include_path: {refused}}}]"
    with pytest.raises(ConfigError, match=r"include_path: .*: File name too long"):
        check_strategies(load_params(None, [override]), get_registry())


class KnownAnswers:
    """A runner with a fixed next-token table: after each prompt, its answer, greedily.

    Its logits give every token the same score except the answer's next token, so the
    harness's log-likelihoods and greedy generations are known exactly.
    """

    format = "hf"
    device = "cpu"
    context = 64

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.next: dict[tuple[int, ...], int] = {}
        for prompt, answer in answers.items():
            ids = tokenizer(prompt + answer + "\n", add_special_tokens=False)["input_ids"]
            cut = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            for end in range(cut, len(ids)):
                self.next[tuple(ids[:end])] = ids[end]

    def logits(self, input_ids):
        import torch

        b, t = input_ids.shape
        out = torch.zeros(b, t, len(self.tokenizer))  # (B, T, V)
        for i in range(b):
            row = input_ids[i].tolist()
            for j in range(t):
                nxt = self.next.get(tuple(row[: j + 1]))
                if nxt is not None:
                    out[i, j, nxt] = 30.0
        return out

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        import torch

        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            seq = ids[mask.bool()].tolist()
            for _ in range(max_new_tokens):
                seq.append(self.next.get(tuple(seq), self.tokenizer.eos_token_id))
            rows.append(torch.tensor(seq))
        return torch.stack(rows)


def test_local_tasks_score_a_runner_offline(tmp_path, tiny_data, monkeypatch):
    require_extra("lm_eval")
    from unbottle.core.models.loading import documents, read_text, train_tokenizer
    from unbottle.plugins.metrics.lm_eval import LmEvalTasks

    tokenizer = train_tokenizer(documents(read_text(tiny_data / "corpus/train.txt", "t")), 320)
    qa = [
        {"question": "Where does Ann live?", "answer": "Dundale"},
        {"question": "What is Bo's colour?", "answer": "red"},
        {"question": "When was Cy born?", "answer": "1943"},
        {"question": "Who keeps a parrot?", "answer": "Dee"},
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa))
    choices = tmp_path / "choice.jsonl"
    choices.write_text(
        "".join(
            json.dumps({"question": r["question"], "choices": [r["answer"], "Nowhere"], "label": 0})
            + "\n"
            for r in qa
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qa.yaml").write_text(QA_TASK.format(data=data))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=choices))

    # The model knows three answers of four.
    known = {f"Question: {r['question']}\nAnswer:": f" {r['answer']}" for r in qa[:3]}
    runner = KnownAnswers(tokenizer, known)
    monkeypatch.chdir(tmp_path)
    metric = LmEvalTasks(
        LmEvalTasks.Config(tasks=["people_qa", "people_choice"], include_path=tasks)
    )
    ctx = EvalContext(tokenizer=tokenizer, valid_text="", questions=[], model_dir=Path("."))
    result = metric.measure(runner, ctx)
    assert result["lm_eval_people_qa_exact_match"] == pytest.approx(0.75)
    # Choice 0 is the answer; the model prefers it exactly where it knows it, and for the
    # fourth question both choices score the same (uniform logits) and the first wins.
    assert result["lm_eval_people_choice_acc"] == pytest.approx(1.0)
    assert all(math.isfinite(v) for v in result.values())


def test_unknown_task_names_what_the_include_path_defines(tmp_path, tiny_data):
    require_extra("lm_eval")
    from unbottle.plugins.metrics.lm_eval import LmEvalTasks

    (tmp_path / "t.yaml").write_text(QA_TASK.format(data=tmp_path / "x.jsonl"))
    metric = LmEvalTasks(LmEvalTasks.Config(tasks=["nope"], include_path=tmp_path))
    ctx = EvalContext(tokenizer=None, valid_text="", questions=[], model_dir=Path("."))
    with pytest.raises(ConfigError, match=r"^lm-eval: no task 'nope' under .*; defined there: "):
        metric.measure(None, ctx)
