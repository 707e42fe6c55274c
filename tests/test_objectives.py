"""Pretraining objectives (clm, mlm, nsp) and few-shot accuracy (issue 18, items 2 and 3)."""

from __future__ import annotations

import ast
import collections
import copy
import re
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, make_workspace, run_cli
from unbottle.core.config.loading import load_params
from unbottle.core.config.schema import Params
from unbottle.core.config.strategy_checks import check_strategies
from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.registry import get_registry

# Small enough to train in seconds, large enough to beat chance on held-out text.
ENCODER = {
    "tokenizer": {"vocab_size": 400},
    "model": {"hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128, "context": 32},
    "train": {
        "steps": 300,
        "batch_size": 32,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 10,
        "log_every": 100,
        "checkpoint_every": 0,
    },
}


def encoder_params(objective: str) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"] = {**copy.deepcopy(ENCODER), "objective": {"name": objective, "dropout": 0}}
    if objective == "nsp":  # two heads to train
        params["pretrain"]["train"]["steps"] = 500
    return params


def topical_text(rng, topics: list[list[str]], docs: int) -> str:
    """Documents of six sentences, each document on one topic (its words only)."""
    out = []
    for _ in range(docs):
        words = rng.choice(topics)
        sentences = [
            " ".join(rng.choice(words) for _ in range(4)).capitalize() + "." for _ in "123456"
        ]
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """Documents on eight topics of ten words each, held-out documents drawn alike.

    The demo world's documents all follow one template, so whether B follows A shows
    only in a shared name, which a tiny encoder needs thousands of steps to match; here
    a real next sentence shares A's topic and a random one (7 times in 8) does not, as
    in the Wikipedia and books text next-sentence prediction was made for.
    """
    import random
    import shutil

    rng = random.Random(0)
    letters = "bdfgklmnprstvz"
    topics = [
        ["".join(rng.choice(letters) + rng.choice("aeiou") for _ in range(2)) for _ in range(10)]
        for _ in range(8)
    ]
    out = tmp_path_factory.mktemp("objectives") / "data"
    shutil.copytree(tiny_data, out)
    (out / "corpus" / "train.txt").write_text(topical_text(rng, topics, 120))
    (out / "corpus" / "valid.txt").write_text(topical_text(rng, topics, 40))
    return out


def pretrain(root: Path, data: Path, params: dict) -> dict:
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    make_workspace(root, data, params)
    return run_stage("pretrain", Params.model_validate(params), Layout(root)).metrics


def most_frequent_token_share(tokenizer, text: str) -> float:
    """The masked-token accuracy of always guessing the commonest token: what an
    encoder that learned nothing about context can reach."""
    from unbottle.core.models.loading import encode_stream

    ids = encode_stream(tokenizer, text).tolist()
    return collections.Counter(ids).most_common(1)[0][1] / len(ids)


@pytest.mark.parametrize("objective", ["mlm", "nsp"])
def test_an_encoder_objective_beats_chance_on_held_out_text(objective, corpus, tmp_path):
    from transformers import AutoTokenizer

    from unbottle.core.store.artifacts import read_manifest

    metrics = pretrain(tmp_path, corpus, encoder_params(objective))
    artifact = tmp_path / "artifacts" / "pretrain"
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    valid = (corpus / "corpus" / "valid.txt").read_text()
    assert metrics["masked_tokens"] >= 100
    if objective == "mlm":
        # Better than always guessing the commonest token (0.121 here; 0.18 was measured),
        # and a pseudo-perplexity far below uniform guessing's, the vocabulary size.
        share = most_frequent_token_share(tokenizer, valid)
        assert metrics["masked_token_accuracy"] > share + 0.02
        assert metrics["pseudo_perplexity"] < len(tokenizer) / 2
    else:
        # Masked tokens beat uniform guessing (its masked figures come from plain windows,
        # which it never saw without [CLS] and [SEP]); half the held-out pairs are real, so
        # 50% is chance and 0.6 is 3 standard errors above it on 200 pairs (0.725 measured).
        assert metrics["masked_token_accuracy"] > 1 / len(tokenizer)  # 0.033 was measured
        assert metrics["nsp_pairs"] == 200
        assert metrics["nsp_accuracy"] > 0.6
    manifest = read_manifest(artifact)
    assert manifest["strategies"]["objective"]["name"] == objective
    assert "valid_text" in manifest["inputs"]  # the held-out figures depend on it
    architecture = "BertForPreTraining" if objective == "nsp" else "BertForMaskedLM"
    assert (artifact / "config.json").read_text().count(architecture) == 1


def test_clm_is_the_default_and_reports_no_encoder_figures(pipeline_run):
    metrics = pipeline_run["results"]["pretrain"].metrics
    assert pipeline_run["params"].pretrain.objective.name == "clm"
    assert "masked_token_accuracy" not in metrics and "nsp_accuracy" not in metrics


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["pretrain.objective=mlm", "pretrain.model.architecture=llama"],
            r"^pretrain\.model\.architecture: 'llama' does not fit pretrain\.objective mlm "
            r"\(it trains encoder models\); use bert or modernbert, or leave architecture unset$",
        ),
        (
            ["pretrain.model.architecture=bert"],
            r"^pretrain\.model\.architecture: 'bert' does not fit pretrain\.objective clm "
            r"\(it trains causal models\); use llama, or leave architecture unset$",
        ),
        (
            ["pretrain.objective=nsp", "pretrain.model.architecture=modernbert"],
            r"^pretrain\.model\.architecture: 'modernbert' does not fit pretrain\.objective nsp",
        ),
        (
            ["pretrain.objective=nope"],
            r"^pretrain\.objective: Unknown pretraining objective 'nope'\. Installed: clm, mlm, "
            r"nsp",
        ),
        (
            ["pretrain.objective={name: mlm, mask_probability: 1.5}"],
            r"^pretrain\.objective\.mask_probability: 1\.5 is invalid",
        ),
    ],
)
def test_an_objective_that_does_not_fit_the_model_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_strategies(load_params(None, overrides), get_registry())


REFUSAL = (
    "{stage}: works on causal LMs, and pretrain.objective mlm trains an encoder; run "
    "`unbottle stage pretrain` alone (it reports the encoder's held-out figures) or use "
    "pretrain.objective clm"
)


@pytest.mark.parametrize("stage", ["finetune", "compress", "evaluate", "deploy"])
def test_stages_after_pretrain_refuse_an_encoder_before_any_work(stage, workspace):
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = load_params(workspace / "params.yaml", ["pretrain.objective=mlm"])
    with pytest.raises(ConfigError, match="^" + re.escape(REFUSAL.format(stage=stage)) + "$"):
        run_stage(stage, params, Layout(workspace))
    assert not (workspace / "artifacts").exists()


def test_the_cli_refuses_finetuning_an_encoder_in_one_line(workspace):
    result = run_cli("stage", "finetune", "-S", "pretrain.objective=nsp", cwd=workspace)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: " + REFUSAL.format(stage="finetune").replace("mlm", "nsp")
    ]
    assert not (workspace / "artifacts").exists()


def test_an_encoder_artifact_is_refused_where_a_causal_lm_is_loaded(tmp_path):
    from unbottle.core.models.loading import load_model

    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(DataError, match=r"the model is an encoder \(BertForMaskedLM\), not a"):
        load_model(tmp_path)


def encoder_tokenizer(texts: list[str]):
    from unbottle.core.models.loading import train_tokenizer
    from unbottle.plugins.objectives import ENCODER_TOKENS

    tokenizer = train_tokenizer(texts, 300)
    tokenizer.add_special_tokens(ENCODER_TOKENS)
    return tokenizer


def numbered_documents(rng, count: int) -> list[str]:
    """Documents of one to five sentences, each saying where it stands: "Doc 3 part 1."."""
    return [" ".join(f"Doc {d} part {k}." for k in range(rng.randint(1, 5))) for d in range(count)]


def test_a_sentence_pair_is_the_next_sentence_or_one_of_another_document():
    import random

    from unbottle import PretrainContext
    from unbottle.plugins.objectives import SentencePairs

    rng = random.Random(1)
    docs = numbered_documents(rng, 60)
    tokenizer = encoder_tokenizer(docs)
    pairs = SentencePairs(PretrainContext("\n\n".join(docs), tokenizer, seq_len=64))
    # Every sentence but its document's last opens a real pair.
    assert len(pairs.firsts) == sum(doc.count(".") - 1 for doc in docs)

    picks = [(i, coin, rng.randrange(1 << 30)) for i in range(len(pairs.firsts)) for coin in (0, 1)]
    batch = pairs.encode([(i, bool(coin), draw) for i, coin, draw in picks])
    row = re.compile(r"<\|cls\|>Doc (\d+) part (\d+)\.<\|sep\|>Doc (\d+) part (\d+)\.<\|sep\|>")
    seen_a = set()
    for ids, types, mask, label, (_, random_next, _) in zip(
        batch["input_ids"],
        batch["token_type_ids"],
        batch["attention_mask"],
        batch["next_sentence_label"],
        picks,
        strict=True,
    ):
        text = tokenizer.decode(ids[mask.bool()])
        doc_a, part_a, doc_b, part_b = map(int, row.fullmatch(text).groups())
        seen_a.add((doc_a, part_a))
        if random_next:
            assert label == 1 and doc_b != doc_a
        else:
            assert label == 0 and (doc_b, part_b) == (doc_a, part_a + 1)
        second = len(tokenizer(f"Doc {doc_b} part {part_b}.")["input_ids"]) + 1  # and [SEP]
        assert types.tolist() == [0] * (int(mask.sum()) - second) + [1] * second + [0] * (
            64 - int(mask.sum())
        )
    assert len(seen_a) == len(pairs.firsts)  # each first is its own sentence


def test_sentence_pairs_hold_a_corpus_in_a_few_bytes_a_token(tmp_path):
    """A corpus of files is read a batch of documents at a time and its sentences kept as
    arrays. Held as Python lists of ints, with every document read first (the class of
    8975591), this corpus peaked at 44 bytes a token; as arrays, at 13 (3.5 kept: the ids,
    each sentence's start and document; the rest one batch's tokenizer output and the
    joining copy)."""
    import random
    import tracemalloc

    import numpy as np

    from unbottle import Corpus, PretrainContext
    from unbottle.plugins.objectives import SentencePairs

    docs = numbered_documents(random.Random(2), 20_000)
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(docs) + "\n")
    tokenizer = encoder_tokenizer(docs[:200])
    # A first, tiny call imports what the bar and the tokenizer call need.
    SentencePairs(PretrainContext("A b. C d.\n\nE f. G h.", tokenizer, seq_len=64))
    ctx = PretrainContext(Corpus(path, "data.train_text"), tokenizer, seq_len=64)
    tracemalloc.start()
    try:
        pairs = SentencePairs(ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tokens = len(pairs.ids)
    assert pairs.ids.dtype == np.uint16
    assert tokens > 400_000
    assert peak < 20 * tokens, f"{peak / tokens:.1f} bytes a token"


def test_nsp_names_the_corpus_without_two_documents_of_sentences():
    from unbottle import PretrainContext
    from unbottle.plugins.objectives import SentencePairs

    docs = ["One sentence. And its next.", "Alone here"]
    ctx = PretrainContext("\n\n".join(docs[:1]), encoder_tokenizer(docs), seq_len=16)
    with pytest.raises(DataError, match=r"^text: next-sentence prediction needs documents"):
        SentencePairs(ctx)


# ------------------------------------------------------------------------ few-shot

PAIRS = [{"question": f"Where does P{i} live?", "answer": f"Town{i}"} for i in range(6)]


def test_shots_are_seeded_solved_pairs_that_never_include_the_question():
    from unbottle.core.data import prompts as task

    asked = PAIRS[2]["question"]
    for index in range(20):
        shots = task.choose_shots(PAIRS, asked, 5, seed=0, index=index)
        assert len(shots) == 5 and asked not in [s["question"] for s in shots]
    assert task.choose_shots(PAIRS, asked, 3, 0, 1) == task.choose_shots(PAIRS, asked, 3, 0, 1)
    draws = [task.choose_shots(PAIRS, asked, 3, seed=0, index=i) for i in range(9)]
    assert any(d != draws[0] for d in draws)  # another question, other examples
    with pytest.raises(Exception, match=r"^6 shots: only 5 training pairs differ from the"):
        task.choose_shots(PAIRS, asked, 6, 0, 0)
    prompt = task.few_shot_prompt(asked, PAIRS[:2])
    assert prompt == (
        "Question: Where does P0 live?\nAnswer: Town0\n\n"
        "Question: Where does P1 live?\nAnswer: Town1\n\n"
        "Question: Where does P2 live?\nAnswer:"
    )
    assert task.few_shot_prompt(asked, []) == task.prompt(asked)


class InContext:
    """Answers a question right only when a solved example in its prompt shows the
    answer's form (``Town<i>``), like a model that needs the examples to get the format."""

    format = "hf"
    device = "cpu"
    context = 512

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        import torch

        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            asked = prompt.rsplit("Question: ", 1)[1]
            number = asked.removeprefix("Where does P").split(" ")[0]
            answer = f" Town{number}" if "Answer: Town" in prompt else " somewhere"
            new = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            new = (new + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_accuracy_with_shots_reports_zero_and_k_shot_side_by_side(tmp_path):
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.core.models.loading import train_tokenizer
    from unbottle.core.stages.report import markdown_table
    from unbottle.plugins.metrics import Accuracy

    tokenizer = train_tokenizer([p["question"] + " " + p["answer"] for p in PAIRS] * 4, 300)
    model = InContext(tokenizer)
    ctx = EvalContext(
        tokenizer=tokenizer,
        valid_text="",
        questions=PAIRS[4:],
        model_dir=tmp_path,
        seed=0,
        train_pairs=PAIRS[:4],
    )
    result = Accuracy(Accuracy.Config(shots=2, max_new_tokens=4)).measure(model, ctx)
    assert result == {
        "accuracy": 0.0,
        "accuracy_fewshot": 1.0,
        "empty_answers": 0.0,  # zero-shot, it answers, wrongly
        "shots": 2,
        "questions": 2,
    }
    zero, few = model.prompts[:2], model.prompts[2:]
    assert zero == [f"Question: {q['question']}\nAnswer:" for q in PAIRS[4:]]
    assert all(p.count("Question: ") == 3 and p.count("Answer: Town") == 2 for p in few)
    table = markdown_table({"pretrained": result})
    assert "| accuracy | accuracy 2-shot |" in table and "| 0.0% | 100.0% |" in table


def test_more_shots_than_training_pairs_is_one_line_before_any_work(workspace):
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    train = (workspace / "data" / "qa" / "train.jsonl").read_text().count("\n")
    metrics = f"evaluate.metrics=[perplexity, {{name: accuracy, shots: {train + 1}}}]"
    params = load_params(workspace / "params.yaml", [metrics])
    message = (
        f"evaluate.metrics[1].shots: {train + 1} is more than the {train} training pairs in "
        f"data.qa_train; use at most {train}"
    )
    # Refused before any model is read: there is none in this workspace yet.
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        run_stage("evaluate", params, Layout(workspace))
    assert not (workspace / "artifacts").exists()


# ------------------------------------------------------------ a third-party objective


def test_the_documented_third_party_objective_installs_and_trains(tmp_path, tiny_data, monkeypatch):
    """docs/plugins.md's fill-in-the-middle objective, as a package of its own."""
    from importlib.metadata import entry_points

    from tests.test_plugins import eps_under, fake_distribution
    from unbottle.core.registry import ENTRY_POINT_GROUP, load_registry
    from unbottle.core.stages.pretrain import pretrain as run_pretrain

    docs = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    section = docs.split("### Objectives (`register_objectives`)", 1)[1].split("\n### ", 1)[0]
    code = section.split("is one module and one hook:\n\n```python\n", 1)[1].split("```", 1)[0]
    # `unbottle plugins` imports every plugin module: the example keeps its top level light.
    top_level = [n for n in ast.parse(code).body if isinstance(n, ast.Import | ast.ImportFrom)]
    imported = {a.name.split(".")[0] for n in top_level for a in n.names} | {
        (n.module or "").split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom)
    }
    assert not imported & {"torch", "transformers"}, imported
    root = fake_distribution(
        tmp_path / "site", "unbottle-fim", {"unbottle_fim": code}, {"fim": "unbottle_fim"}
    )
    builtins = [ep for ep in entry_points(group=ENTRY_POINT_GROUP)]
    registry = load_registry([*builtins, *eps_under(root, monkeypatch)], disabled=())
    info = registry.get("objective", "fim")
    assert (info.distribution, info.plugin) == ("unbottle-fim", "fim")

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["objective"] = {"name": "fim", "rate": 1.0}
    params["pretrain"]["train"].update(steps=2, checkpoint_every=0)
    cfg = Params.model_validate(params)
    check_strategies(cfg, registry)
    result = run_pretrain(
        cfg.pretrain,
        train_text=tiny_data / "corpus" / "train.txt",
        out_dir=tmp_path / "pretrain",
        seed=0,
        registry=registry,
    )
    assert result.metrics["final_loss"] > 0
    tokens = (tmp_path / "pretrain" / "tokenizer.json").read_text()
    assert all(s in tokens for s in ("<|pre|>", "<|suf|>", "<|mid|>"))


FEWSHOT_TASK = """\
task: people_fewshot
dataset_path: json
dataset_kwargs:
  data_files: {{train: {train}, test: {test}}}
training_split: train
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"  # after the harness's own " " delimiter
generation_kwargs: {{until: ["\\n"], max_gen_toks: 4}}
metric_list:
  - {{metric: exact_match, ignore_case: true, ignore_punctuation: true}}
"""


@pytest.mark.parametrize("shots", [None, 2])
def test_lm_eval_passes_num_fewshot_to_the_harness(shots, tmp_path, monkeypatch):
    import json

    from tests.conftest import require_extra

    require_extra("lm_eval")
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.core.models.loading import train_tokenizer
    from unbottle.plugins.metrics.lm_eval import LmEvalTasks

    for split, pairs in (("train", PAIRS[:4]), ("test", PAIRS[4:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(
        FEWSHOT_TASK.format(train=tmp_path / "train.jsonl", test=tmp_path / "test.jsonl")
    )
    tokenizer = train_tokenizer([p["question"] + " " + p["answer"] for p in PAIRS] * 4, 300)
    model = InContext(tokenizer)
    monkeypatch.chdir(tmp_path)
    metric = LmEvalTasks(
        LmEvalTasks.Config(tasks=["people_fewshot"], include_path=tasks, num_fewshot=shots)
    )
    ctx = EvalContext(tokenizer=tokenizer, valid_text="", questions=[], model_dir=tmp_path)
    result = metric.measure(model, ctx)
    assert len(model.prompts) == 2
    # The harness puts `shots` solved training pairs before each question.
    for prompt in model.prompts:
        assert prompt.count("Question: ") == 1 + (shots or 0)
        assert prompt.count("Answer: Town") == (shots or 0)
    assert "lm_eval_people_fewshot_exact_match" in result


def test_mlm_trains_a_modernbert_encoder_too(tmp_path, tiny_data):
    params = encoder_params("mlm")
    params["pretrain"]["model"]["architecture"] = "modernbert"
    params["pretrain"]["train"]["steps"] = 3
    metrics = pretrain(tmp_path, tiny_data, params)
    config = (tmp_path / "artifacts" / "pretrain" / "config.json").read_text()
    assert '"ModernBertForMaskedLM"' in config
    assert metrics["masked_tokens"] > 0 and metrics["pseudo_perplexity"] > 1


def test_the_pipeline_with_an_encoder_objective_stops_before_prefect_starts(workspace):
    result = run_cli("run", "-S", "pretrain.objective=mlm", cwd=workspace)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: " + REFUSAL.format(stage="finetune")]
    assert not (workspace / "artifacts").exists()
