"""Evaluation that decides: metrics with known answers, the Pareto frontier, the report,
quality gates and the deploy policy, and a two-variant sweep whose variants share a prefix.

The sweep runs the real compress, evaluate and deploy stages on a tiny random-weight
model made here (a "pretrained" and a "finetuned" artifact), so no training is needed.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_PARAMS, make_workspace, run_cli
from unbottle.core.config.loading import load_params
from unbottle.core.config.schema import DeployParams, EvaluateParams, Params
from unbottle.core.config.strategy_checks import check_strategies
from unbottle.core.contract.errors import ConfigError, DataError, GateError
from unbottle.core.contract.strategies import EvalContext
from unbottle.core.registry import get_registry
from unbottle.core.store.artifacts import read_manifest, write_json_atomic, write_manifest

# ----------------------------------------------------------------- tiny models and runners


@pytest.fixture(scope="module")
def tokenizer(tiny_data: Path):
    from unbottle.core.models.loading import documents, read_text, train_tokenizer

    text = read_text(tiny_data / "corpus" / "train.txt", "train")
    return train_tokenizer(documents(text), 320)


@pytest.fixture(scope="module")
def valid_text(tiny_data: Path) -> str:
    return (tiny_data / "corpus" / "valid.txt").read_text(encoding="utf-8")


class KnownLogits:
    """A model whose logits are known: all zeros (uniform), or the true next token."""

    format = "hf"
    device = "cpu"

    def __init__(self, vocab: int, context: int = 64, perfect: bool = False) -> None:
        self.vocab, self.context, self.perfect = vocab, context, perfect

    def logits(self, input_ids):
        import torch

        b, t = input_ids.shape
        out = torch.zeros(b, t, self.vocab)  # (B, T, V)
        if self.perfect:  # position t predicts input t+1 with near certainty
            out[:, :-1].scatter_(2, input_ids[:, 1:, None], 50.0)
        return out


def context_for(tokenizer, text: str, questions=()) -> EvalContext:
    return EvalContext(
        tokenizer=tokenizer, valid_text=text, questions=list(questions), model_dir=Path(".")
    )


@pytest.mark.parametrize(("window", "stride"), [(16, 8), (32, 32), (64, 40)])
def test_perplexity_of_uniform_logits_is_the_vocabulary_size(tokenizer, valid_text, window, stride):
    from unbottle.core.models.loading import encode_stream
    from unbottle.plugins.metrics import Perplexity

    vocab = len(tokenizer)
    metric = Perplexity(Perplexity.Config(window=window, stride=stride))
    result = metric.measure(KnownLogits(vocab), context_for(tokenizer, valid_text))
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-9)
    # Every token but the first is scored exactly once, whatever the window and stride.
    assert result["perplexity_tokens"] == encode_stream(tokenizer, valid_text).numel() - 1


def test_perplexity_scores_each_token_against_the_one_that_follows(tokenizer, valid_text):
    from unbottle.plugins.metrics import Perplexity

    metric = Perplexity(Perplexity.Config(window=32, stride=24))
    result = metric.measure(
        KnownLogits(len(tokenizer), perfect=True), context_for(tokenizer, valid_text)
    )
    assert result["perplexity"] == pytest.approx(1.0, abs=1e-6)


def test_perplexity_refuses_a_held_out_text_shorter_than_the_window(tokenizer):
    from unbottle.plugins.metrics import Perplexity

    metric = Perplexity(Perplexity.Config(window=32))
    with pytest.raises(DataError, match=r"^perplexity: the held-out text has \d+ tokens, fewer"):
        metric.measure(KnownLogits(len(tokenizer)), context_for(tokenizer, "Short text."))


def test_size_counts_what_a_third_party_runner_counts(tmp_path, tokenizer):
    """A deploy target's own runner may have only the required ``parameter_counts``:
    ``size`` reports the sparsity over all weights and no layer sparsity it cannot know."""
    from unbottle.plugins.metrics import Size

    class CountingRunner(KnownLogits):
        def parameter_counts(self) -> tuple[int, int]:
            return 1000, 750

    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    ctx = EvalContext(tokenizer=tokenizer, valid_text="", questions=[], model_dir=tmp_path)
    figures = Size(Size.Config()).measure(CountingRunner(len(tokenizer)), ctx)
    assert figures == {
        "size_bytes": 10,
        "parameters": 1000,
        "nonzero_parameters": 750,
        "sparsity": 0.25,
    }


def long_held_out(valid_text: str, copies: int = 200) -> str:
    """The tiny held-out text many times over, each document ended by a page break."""
    from unbottle.core.models.loading import DOCUMENT_BREAK, documents

    return "".join(doc + DOCUMENT_BREAK for doc in documents(valid_text) * copies)


@pytest.mark.parametrize("limit", [1, 7, 100, 1000, None])
def test_the_held_out_token_ids_are_the_stream_cut_at_the_limit(tokenizer, valid_text, limit):
    import torch

    from unbottle.core.models.loading import documents, encode_stream

    ctx = context_for(tokenizer, valid_text)
    expected = encode_stream(tokenizer, valid_text)
    ids = ctx.held_out_ids(limit)
    assert ids.dtype == torch.long and torch.equal(ids, expected[:limit])
    assert torch.equal(ctx.held_out_ids(), expected)  # asked again, for more: the whole text
    assert list(ctx.corpus.documents()) == documents(valid_text)


class CountingTokenizer:
    """The tokenizer, counting the documents it is asked to encode."""

    def __init__(self, tokenizer) -> None:
        self.inner, self.documents = tokenizer, 0

    def __call__(self, texts, **kw):
        self.documents += len(texts) if isinstance(texts, list) else 1
        return self.inner(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


def test_perplexity_and_speed_tokenize_only_the_held_out_text_they_use(tokenizer, valid_text):
    """A held-out file of any size costs a metric with a token budget the documents that
    fill the budget, not a pass of the tokenizer over the whole file per model."""
    from unbottle.core.models.loading import documents
    from unbottle.plugins.metrics import Perplexity, prompt_batch

    text = long_held_out(valid_text)
    total = len(documents(text))
    counting = CountingTokenizer(tokenizer)
    ctx = context_for(counting, text)
    result = Perplexity(Perplexity.Config(window=32, max_tokens=64)).measure(
        KnownLogits(len(tokenizer)), ctx
    )
    assert result["perplexity_tokens"] == 64
    assert counting.documents < total / 20, (counting.documents, total)

    counting.documents = 0
    prompts = prompt_batch(context_for(counting, text), 4, 16, "speed")
    assert prompts.shape == (4, 16)
    assert counting.documents < total / 20, (counting.documents, total)


class Answering:
    """A model that answers each known question with a fixed text (greedy, batched)."""

    format = "hf"
    device = "cpu"
    context = 64

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        import torch

        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            question = prompt.removeprefix("Question: ").split("\n")[0]
            new = self.tokenizer(self.answers[question], add_special_tokens=False)["input_ids"]
            new = (new + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_accuracy_is_exact_match_after_normalisation(tokenizer):
    from unbottle.core.data import prompts as task
    from unbottle.plugins.metrics import Accuracy

    assert task.exact_match(" Dundale.\nQuestion: more", "dundale")
    assert task.exact_match("  RED ", "red")
    assert not task.exact_match("Dundale Hill", "Dundale")
    assert not task.exact_match("", "1943")

    questions = [
        {"question": "Where does Ann live?", "answer": "Dundale"},
        {"question": "What is Bo's colour?", "answer": "red"},
        {"question": "When was Cy born?", "answer": "1943"},
        # A model that ends its turn at once, or says only a full stop, answers nothing.
        {"question": "Who is Di?", "answer": "a baker"},
        {"question": "Where is Ed?", "answer": "Kell"},
    ]
    model = Answering(
        tokenizer,
        {
            "Where does Ann live?": " Dundale.\n",
            "What is Bo's colour?": " Red",
            "When was Cy born?": " 1944",
            "Who is Di?": "",
            "Where is Ed?": " .",
        },
    )
    metric = Accuracy(Accuracy.Config(batch_size=2, max_new_tokens=6, samples=3))
    ctx = context_for(tokenizer, "", questions)
    result = metric.measure(model, ctx)
    assert result == {
        "accuracy": pytest.approx(2 / 5),
        "empty_answers": pytest.approx(2 / 5),
        "questions": 5,
    }
    assert [s["correct"] for s in ctx.samples["accuracy"]] == [True, True, False]
    assert ctx.samples["accuracy"][2]["prediction"] == "1944"


QUESTIONS = [
    {"question": "Where does Ann live?", "answer": "Dundale"},
    {"question": "What is Bo's colour?", "answer": "red"},
    {"question": "When was Cy born?", "answer": "1943"},
]


class KnowsThePrompts(KnownLogits):
    """Certain of every prompt token and uniform over the answer: scoring the prompts
    too would bring its perplexity below the vocabulary's size."""

    def __init__(self, vocab: int, prompt_lengths: dict[tuple[int, ...], int]) -> None:
        super().__init__(vocab)
        self.prompt_lengths = prompt_lengths

    def logits(self, input_ids):
        out = KnownLogits(self.vocab, perfect=True).logits(input_ids)
        prompt = self.prompt_lengths[tuple(input_ids[0].tolist())]
        out[:, prompt - 1 :] = 0.0  # the predictions of the answer's tokens: uniform
        return out


def test_answer_perplexity_scores_the_answers_alone(tokenizer):
    """Only the answer's tokens (its EOS included) are scored, given the prompt before
    them, rendered as finetuning rendered the pair."""
    from unbottle.evaluation import PromptFormat
    from unbottle.plugins.metrics import AnswerPerplexity

    metric = AnswerPerplexity(AnswerPerplexity.Config())
    runs = [PromptFormat().segments(tokenizer, pair) for pair in QUESTIONS]
    lengths = {tuple(i for run, _ in r for i in run): len(r[0][0]) for r in runs}
    answer_tokens = sum(len(r[1][0]) for r in runs)
    assert all(len(r) == 2 and not r[0][1] and r[1][1] for r in runs)
    ctx = context_for(tokenizer, "", QUESTIONS)

    vocab = len(tokenizer)
    result = metric.measure(KnowsThePrompts(vocab, lengths), ctx)
    assert result == {"answer_perplexity": pytest.approx(vocab), "answer_tokens": answer_tokens}
    perfect = metric.measure(KnownLogits(vocab, perfect=True), ctx)
    assert perfect["answer_perplexity"] == pytest.approx(1.0, abs=1e-6)


def test_answer_perplexity_keeps_the_end_of_a_pair_longer_than_the_context(tokenizer):
    from unbottle.evaluation import PromptFormat
    from unbottle.plugins.metrics import AnswerPerplexity

    class Short(KnownLogits):
        def logits(self, input_ids):
            assert input_ids.shape[1] <= self.context, "longer than the model's context"
            return super().logits(input_ids)

    long = [{"question": "Where does Ann live? " * 40, "answer": "Dundale"}]
    _, (answer, _) = PromptFormat().segments(tokenizer, long[0])
    metric = AnswerPerplexity(AnswerPerplexity.Config())
    result = metric.measure(Short(len(tokenizer), context=16), context_for(tokenizer, "", long))
    assert result == {
        "answer_perplexity": pytest.approx(len(tokenizer)),
        "answer_tokens": len(answer),  # "Dundale" and EOS, after the prompt's last tokens
    }


def test_accuracy_prompts_are_encoded_as_finetune_trained_on_them(tokenizer):
    """A tokenizer that adds BOS (Llama's do) must not prepend it at evaluation only:
    finetune encodes prompts without special tokens, so accuracy must too."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from unbottle.core.data import prompts as task
    from unbottle.plugins.metrics import Accuracy

    with_bos = copy.deepcopy(tokenizer)
    bos = with_bos.bos_token
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, with_bos.bos_token_id)]
    )
    assert with_bos("x")["input_ids"][0] == with_bos.bos_token_id  # the trap is armed
    question = {"question": "Where does Ann live?", "answer": "Dundale"}
    seen = []

    class Recording(Answering):
        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            pairs = zip(input_ids, attention_mask, strict=True)
            seen.extend(ids[mask.bool()].tolist() for ids, mask in pairs)
            return super().generate(input_ids, attention_mask, max_new_tokens, **kw)

    model = Recording(tokenizer, {question["question"]: " Dundale"})
    metric = Accuracy(Accuracy.Config(batch_size=1, max_new_tokens=4, samples=1))
    metric.measure(model, context_for(with_bos, "", [question]))
    trained = with_bos(task.prompt(question["question"]), add_special_tokens=False)["input_ids"]
    assert seen == [trained]


# ------------------------------------------------------------------- cost and roofline


def test_peak_rss_delta_sees_memory_allocated_while_running():
    import numpy as np

    from unbottle.plugins.metrics import peak_rss_delta

    def allocate() -> None:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        assert block.sum() == 64 * 2**20
        del block  # freed before return: only the peak can see it

    assert peak_rss_delta(allocate) >= 60 * 2**20
    assert peak_rss_delta(lambda: None) < 8 * 2**20


def test_memory_bandwidth_is_measured_once_per_process():
    from unbottle.plugins.metrics import memory_bandwidth

    first = memory_bandwidth("cpu", 64)
    assert 1e8 < first < 1e13  # between 0.1 GB/s and 10 TB/s
    assert memory_bandwidth("cpu", 64) == first  # cached, not measured again


def test_bytes_per_token_count_an_embedding_lookup_as_one_row(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from unbottle.plugins.metrics import onnx_bytes_per_token

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((4, 4), np.int8), "weight")
    scale = numpy_helper.from_array(np.ones((), np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["h"]),
            helper.make_node("DequantizeLinear", ["weight", "scale"], ["w"]),
            helper.make_node("MatMul", ["h", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[table, weight, scale],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    # One row of the table (4 float32), the int8 matrix, the float32 scale.
    assert onnx_bytes_per_token(path) == 4 * 4 + 16 * 1 + 4


def test_bytes_per_token_count_the_rotary_tables_of_fused_attention_as_one_row(tmp_path):
    """onnxruntime-genai's GroupQueryAttention takes the whole cos and sin tables
    (positions x head_size / 2) and reads the row of each token's position."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from unbottle.plugins.metrics import onnx_bytes_per_token

    cos = numpy_helper.from_array(np.zeros((256, 8), np.float32), "cos_cache")
    sin = numpy_helper.from_array(np.zeros((256, 8), np.float32), "sin_cache")
    attention = helper.make_node(
        "GroupQueryAttention",
        [
            "qkv",
            "",
            "",
            "past_key",
            "past_value",
            "seqlens_k",
            "total_len",
            "cos_cache",
            "sin_cache",
        ],
        ["y", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=2,
        kv_num_heads=1,
        do_rotary=1,
    )
    graph = helper.make_graph(
        [attention],
        "g",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 32])],
        initializer=[cos, sin],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert onnx_bytes_per_token(path) == 2 * 8 * 4  # a row of each, not 2 x 256 rows


# ---------------------------------------------------------------------- Pareto frontier


def test_pareto_front_on_a_fixed_table():
    from unbottle.core.stages.report import pareto_front

    # (size, perplexity): smaller and lower are better.
    points = {
        "dense": (100.0, 10.0),
        "int8": (25.0, 10.5),
        "pruned": (100.0, 12.0),  # dominated by dense: same size, worse perplexity
        "int4": (13.0, 14.0),
        "bad": (50.0, 15.0),  # dominated by int8
        "twin": (25.0, 10.5),  # equal to int8: neither dominates the other
    }
    assert pareto_front(points, ("lower", "lower")) == ["dense", "int8", "int4", "twin"]
    # (decode tok/s, accuracy): both higher is better.
    speed = {"a": (10.0, 0.9), "b": (30.0, 0.8), "c": (20.0, 0.7), "d": (30.0, 0.5)}
    assert pareto_front(speed, ("higher", "higher")) == ["a", "b"]


def test_speeds_the_measurements_cannot_tell_apart_put_neither_ahead():
    """(decode tok/s, perplexity): a pruned model measured at 27.1 tok/s against the dense
    model's 26.5 is faster only if its requests' ranges do not overlap."""
    from unbottle.core.stages.report import frontiers, markdown_table, pareto_front

    points = {"dense": (26.5, 2.0), "sgpt24": (27.1, 3.0), "int4": (60.0, 3.5)}
    better = ("higher", "lower")
    assert pareto_front(points, better) == ["dense", "sgpt24", "int4"]  # the point values
    overlapping = {"dense": (24.8, 28.3), "sgpt24": (25.0, 29.0), "int4": (55.0, 64.0)}
    assert pareto_front(points, better, overlapping) == ["dense", "int4"]
    apart = {"dense": (26.2, 26.8), "sgpt24": (27.0, 27.3), "int4": (55.0, 64.0)}
    assert pareto_front(points, better, apart) == ["dense", "sgpt24", "int4"]
    # A point measured once sits inside a range: no better and no worse on speed.
    once = {"sgpt24": (25.0, 29.0)}
    assert pareto_front(points, better, once) == ["dense", "int4"]

    rows = {
        name: {
            "perplexity": ppl,
            "size_bytes": 1e6,
            "decode_tokens_per_s": tps,
            "decode_tokens_per_s_low": overlapping[name][0],
            "decode_tokens_per_s_high": overlapping[name][1],
        }
        for name, (tps, ppl) in points.items()
    }
    assert frontiers(rows, list(rows))["quality_vs_speed"] == ["dense", "int4"]
    assert "| sgpt24 | 3.000 | 1.00 | 27.1 (25.0–29.0) |" in markdown_table(rows)


# ---------------------------------------------------------------------- gates and policy


ROWS: dict[str, dict[str, Any]] = {
    "pretrained": {"format": "hf", "perplexity": 9.0, "perplexity_ratio": 0.9, "accuracy": 0.0},
    "finetuned": {
        "format": "hf",
        "perplexity": 10.0,
        "perplexity_ratio": 1.0,
        "accuracy": 0.50,
        "size_bytes": 4_000_000,
        "decode_tokens_per_s": 100.0,
    },
    "magnitude50": {
        "format": "hf",
        "perplexity": 14.0,
        "perplexity_ratio": 1.4,
        "accuracy": 0.40,
        "size_bytes": 4_000_000,
        "decode_tokens_per_s": 101.0,
    },
    "kd2": {
        "format": "hf",
        "perplexity": 12.0,
        "perplexity_ratio": 1.2,
        "accuracy": 0.30,
        "size_bytes": 2_000_000,
        "decode_tokens_per_s": 180.0,
    },
    "int8": {
        "format": "onnx",
        "perplexity": 10.2,
        "perplexity_ratio": 1.02,
        "accuracy": 0.48,
        "size_bytes": 1_000_000,
        "decode_tokens_per_s": 250.0,
    },
}


def directions() -> dict[str, str | None]:
    from unbottle.core.stages.deploy import metric_directions

    return metric_directions(get_registry())


def choose(accepts=None, **deploy):
    from unbottle.core.stages.deploy import choose_variant

    return choose_variant(DeployParams.model_validate(deploy), ROWS, directions(), accepts)


@pytest.mark.parametrize(
    ("deploy", "chosen"),
    [
        ({}, "finetuned"),  # explicit, the default variant
        ({"variant": "kd2"}, "kd2"),
        ({"policy": "smallest"}, "int8"),
        ({"policy": "fastest"}, "int8"),
        ({"policy": "best"}, "finetuned"),  # lowest perplexity; pretrained is no candidate
        ({"policy": "best", "quality": "accuracy"}, "finetuned"),
        ({"policy": "smallest", "gates": {"accuracy": {"min": 0.49}}}, "finetuned"),
        ({"policy": "fastest", "gates": {"perplexity_ratio": {"max": 1.1}}}, "int8"),
        (
            {"policy": "smallest", "gates": {"accuracy": {"min": 0.3}, "size_bytes": {"max": 3e6}}},
            "int8",
        ),
        # Equal size: the tie goes to the variant listed first.
        ({"policy": "smallest", "gates": {"size_bytes": {"min": 3e6}}}, "finetuned"),
    ],
)
def test_policy_chooses_among_the_variants_that_pass(deploy, chosen):
    assert choose(**deploy).chosen == chosen


def test_fastest_among_speeds_the_measurements_cannot_tell_apart_deploys_the_better_one():
    """magnitude50's median (101 tok/s) beats finetuned's (100), but their requests'
    ranges overlap: the better perplexity deploys, and the decision says why. Ranges
    that do not overlap leave the faster one."""
    import copy

    from unbottle.core.stages.deploy import choose_variant

    rows = copy.deepcopy(ROWS)
    del rows["kd2"], rows["int8"]
    ranges = {"finetuned": (92.0, 104.0), "magnitude50": (95.0, 106.0)}
    for name, (low, high) in ranges.items():
        rows[name].update(decode_tokens_per_s_low=low, decode_tokens_per_s_high=high)
    cfg = DeployParams.model_validate({"policy": "fastest"})
    decision = choose_variant(cfg, rows, directions())
    assert decision.chosen == "finetuned"
    assert decision.as_dict()["tied"] == ["finetuned", "magnitude50"]
    assert (
        "finetuned, magnitude50 decode equally fast within the ranges their requests "
        "measured, so perplexity chose" in decision.markdown()
    )

    rows["finetuned"].update(decode_tokens_per_s_low=90.0, decode_tokens_per_s_high=94.0)
    decision = choose_variant(cfg, rows, directions())
    assert (decision.chosen, decision.tied) == ("magnitude50", [])


def test_a_target_that_cannot_ship_a_format_rules_its_variants_out():
    decision = choose(accepts=("hf",), policy="smallest")
    assert decision.chosen == "kd2"
    assert decision.verdicts["int8"] == ["format onnx (target hf ships hf)"]


def test_no_variant_passing_names_each_variant_and_the_limit_it_broke():
    with pytest.raises(GateError) as error:
        choose(
            policy="best",
            gates={"accuracy": {"min": 0.6}, "perplexity_ratio": {"max": 1.3}},
        )
    assert str(error.value) == (
        "deploy.gates: no variant passes; finetuned: accuracy 0.5 < min 0.6; "
        "magnitude50: accuracy 0.4 < min 0.6, perplexity_ratio 1.4 > max 1.3; "
        "kd2: accuracy 0.3 < min 0.6; int8: accuracy 0.48 < min 0.6"
    )


def test_accuracy_ratio_is_the_share_of_the_finetuned_accuracy_a_variant_keeps():
    """The accuracy a compressed model keeps, relative to the finetuned model's ("recovery"),
    is a gate independent of how hard the questions are; with a finetuned model that
    answers nothing there is no ratio, and a gate on it says so."""
    from unbottle.core.config.schema import GateLimit
    from unbottle.core.stages.deploy import broken_limits, choose_variant
    from unbottle.core.stages.report import add_ratios

    rows = copy.deepcopy(ROWS)
    add_ratios(rows, rows["finetuned"])
    shares = {name: row["accuracy_ratio"] for name, row in rows.items()}
    assert shares == pytest.approx(
        {"pretrained": 0.0, "finetuned": 1.0, "magnitude50": 0.8, "kd2": 0.6, "int8": 0.96}
    )
    cfg = DeployParams.model_validate(
        {"policy": "fastest", "gates": {"accuracy_ratio": {"min": 0.97}}}
    )
    decision = choose_variant(cfg, rows, directions())
    assert decision.chosen == "finetuned"  # int8, the fastest, keeps 96%
    assert decision.verdicts["int8"] == ["accuracy_ratio 0.96 < min 0.97"]

    silent = {"finetuned": {"accuracy": 0.0}, "int8": {"accuracy": 0.1}}
    add_ratios(silent, silent["finetuned"])
    assert "accuracy_ratio" not in silent["int8"]
    assert broken_limits(silent["int8"], {"accuracy_ratio": GateLimit(min=0.9)}) == [
        "accuracy_ratio has no value: the finetuned model's accuracy is 0 or missing"
    ]


def test_an_explicit_variant_that_fails_a_gate_is_refused():
    with pytest.raises(GateError, match=r"^deploy\.variant: 'magnitude50' fails deploy\.gates "):
        choose(variant="magnitude50", gates={"perplexity_ratio": {"max": 1.3}})


def test_a_gate_on_a_metric_no_variant_has_is_named():
    with pytest.raises(ConfigError, match=r"^deploy\.gates\.bleu: no evaluated variant has 'bleu'"):
        choose(gates={"bleu": {"min": 0.1}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["evaluate.metrics=[perplexity, size]", "deploy.gates.accuracy={min: 0.2}"],
            r"^deploy\.gates\.accuracy: no metric in evaluate\.metrics produces 'accuracy'; "
            r"gates can use: layer_sparsity, nonzero_parameters, parameters, perplexity, "
            r"perplexity_ratio",
        ),
        (
            ["evaluate.metrics=[perplexity]", "deploy.policy=fastest"],
            r"^deploy\.policy: 'fastest' ranks by decode_tokens_per_s, which no metric",
        ),
        (
            ["deploy.policy=best", "deploy.quality=questions"],
            r"^deploy\.quality: 'questions' is neither better low nor high",
        ),
        (
            ["evaluate.metrics=[roofline, speed]"],
            r"^evaluate\.metrics\[0\]: roofline needs 'decode_tokens_per_s' from a metric",
        ),
        (["evaluate.metrics=[bleu]"], r"^evaluate\.metrics\[0\]: Unknown metric 'bleu'"),
        (["deploy.gates.accuracy={}"], r"^deploy\.gates\.accuracy: a gate needs min, max or both"),
        (
            ["compress.sweep.mag=[{prune: magnitude, sparsity: {grid: []}}]"],
            r"^compress\.sweep\.mag\[0\]\.sparsity: write \{grid: \[value, \.\.\.\]\}",
        ),
        (
            ["compress.sweep.mag=[{prune: magnitude, sparsity: {grid: [0.5, 1.5]}}]"],
            r"^compress\.variants\.mag-1p5\[0\]\.sparsity: 1\.5 is invalid",
        ),
    ],
)
def test_evaluation_plan_errors_are_one_line_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_strategies(load_params(None, overrides), get_registry())


def test_a_sweep_expands_into_named_variants():
    params = load_params(
        None,
        [
            "compress.variants.int8=[{quantize: onnx-dynamic-int8}]",
            "compress.sweep.mag=[{prune: {grid: [magnitude]}, sparsity: {grid: [0.25, 0.5]}}, "
            "{quantize: onnx-dynamic-int8}]",
        ],
    )
    assert list(params.compress.variants) == [
        "int8",
        "mag-magnitude-0p25",
        "mag-magnitude-0p5",
    ]
    assert params.compress.variants["mag-magnitude-0p5"][0].options == {"sparsity": 0.5}
    # A dump validates again to the same variants (the flow reloads params per task).
    again = Params.model_validate(params.model_dump(mode="json"))
    assert again.compress.variants == params.compress.variants


# ----------------------------------------------------------------------------- report


def fixed_results() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    rows = {
        name: {k: v for k, v in row.items() if k != "perplexity_ratio"}
        for name, row in ROWS.items()
    }
    rows["pretrained"].update(size_bytes=4_000_000, decode_tokens_per_s=99.0)
    samples = {"generations": [{"prompt": "Ann lives", "continuation": " in Dundale."}]}
    return {name: (row, samples) for name, row in rows.items()}


def parse_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], {cells[0]: cells for cells in split[2:]}


def test_report_renders_table_plots_and_csv_that_match_the_json(tmp_path):
    from unbottle.core.stages.evaluate import EVALUATION, REPORT, write_evaluation
    from unbottle.core.stages.report import COLUMNS

    cfg = EvaluateParams.model_validate({"metrics": ["perplexity", "accuracy", "size", "speed"]})
    result = write_evaluation(
        cfg,
        fixed_results(),
        out_dir=tmp_path / "evaluate",
        registry=get_registry(),
        inputs={},
        images_dir=tmp_path / "metrics",
    )
    out = tmp_path / "evaluate"
    for name in ("quality_vs_size.png", "quality_vs_speed.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        assert (tmp_path / "metrics" / f"evaluate_{name}").read_bytes() == png

    data = json.loads((out / EVALUATION).read_text())
    rows = data["variants"]
    assert data["order"] == list(ROWS)
    assert rows["int8"]["perplexity_ratio"] == pytest.approx(1.02)
    # Frontiers among candidates only: pretrained is a reference.
    assert data["frontiers"]["quality_vs_size"] == ["finetuned", "int8"]
    assert data["frontiers"]["quality_vs_speed"] == ["finetuned", "int8"]

    report = (out / REPORT).read_text()
    assert report.startswith(f"# Evaluation\n\n{data['table']}\n")
    assert "![quality vs size](quality_vs_size.png)" in report
    assert "*Ann lives* → 'in Dundale.'" in report
    header, table = parse_table(data["table"])
    assert list(table) == list(ROWS)
    assert header[-1] == "Pareto"
    assert table["int8"][-1] == "size, speed" and table["kd2"][-1] == "–"
    formats = {title: (key, fmt) for key, title, fmt in COLUMNS}
    scale = {"size_bytes": 1e-6, "ttft_s": 1e3, "peak_memory_bytes": 1e-6}
    for name, cells in table.items():
        for title, cell in zip(header[1:-1], cells[1:-1], strict=True):
            key, fmt = formats[title]
            value = rows[name].get(key)
            expected = "–" if value in (None, "") else fmt.format(value * scale.get(key, 1))
            assert cell == expected, (name, title)

    # The CSV for DVC has one row per variant with the JSON's numbers.
    (records,) = result.plots.values()
    assert [r["variant"] for r in records] == list(ROWS)
    for record in records:
        for key, value in rows[record["variant"]].items():
            assert record[key] == value
    assert records[3]["size_mb"] == pytest.approx(2.0)


# ------------------------------------------------------------- a sweep through the stages


def save_random_model(out: Path, tokenizer, stage: str, seed: int) -> None:
    from unbottle.core.config.schema import ModelParams
    from unbottle.core.models.loading import build_model, save_model

    model = build_model(
        ModelParams(hidden_size=32, layers=2, heads=2, intermediate_size=64, context=64),
        tokenizer,
        seed,
    )
    out.mkdir(parents=True)
    save_model(model, tokenizer, out)
    write_manifest(out, stage=stage, config={}, strategies={}, inputs={}, metrics={})


KD = {"distill": "kd", "layers": 1, "steps": 2, "batch_size": 2, "seq_len": 32}
SWEEP_PARAMS = copy.deepcopy(TINY_PARAMS)
SWEEP_PARAMS["compress"]["variants"] = {}
SWEEP_PARAMS["compress"]["sweep"] = {
    "kd": [KD, {"prune": "magnitude", "sparsity": {"grid": [0.3, 0.6]}}]
}
SWEEP_PARAMS["evaluate"]["metrics"] = [
    {"name": "memory", "batch_size": 2, "prompt_tokens": 8, "new_tokens": 8},
    {"name": "perplexity", "window": 64, "stride": 56},
    {"name": "accuracy", "max_new_tokens": 4},
    {"name": "samples", "count": 1, "max_new_tokens": 4},
    "size",
    {"name": "speed", "prompt_tokens": 8, "new_tokens": 4, "repeats": 3, "batch_size": 2},
    {"name": "roofline", "bandwidth_megabytes": 64},
]
SWEEP_PARAMS["deploy"] = {
    "target": "hf",
    "policy": "smallest",
    "gates": {"perplexity_ratio": {"max": 10.0}},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_data, tokenizer) -> dict[str, Any]:
    """compress (two grid points sharing a distilled prefix), evaluate and deploy."""
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    root = make_workspace(tmp_path_factory.mktemp("sweep"), tiny_data, SWEEP_PARAMS)
    layout = Layout(root)
    save_random_model(layout.artifact("pretrain"), tokenizer, "pretrain", seed=1)
    save_random_model(layout.artifact("finetune"), tokenizer, "finetune", seed=2)
    params = Params.model_validate(SWEEP_PARAMS)
    results = {name: run_stage(name, params, layout) for name in ("compress", "evaluate")}
    results["deploy"] = run_stage("deploy", params, layout)
    return {"root": root, "layout": layout, "params": params, "results": results}


def test_a_two_variant_sweep_reuses_the_shared_prefix(swept, tmp_path):
    from safetensors.torch import load_file

    from unbottle.core.stages.compress import compress

    layout, params = swept["layout"], swept["params"]
    compressed = swept["results"]["compress"].metrics
    assert list(compressed) == ["kd-0p3", "kd-0p6"]
    assert compressed["kd-0p3"]["reused_steps"] == 0
    assert compressed["kd-0p6"]["reused_steps"] == 1  # the distillation ran once
    out = layout.artifact("compress")
    steps = read_manifest(out / "kd-0p6")["steps"]
    assert [s["action"] for s in steps] == ["distill", "prune"]
    assert steps[1]["metrics"]["sparsity"] == pytest.approx(0.6, abs=1e-3)

    # The reused prefix gives the same weights, bit for bit, as computing it afresh.
    alone = params.compress.model_copy(
        update={"variants": {"kd-0p6": params.compress.variants["kd-0p6"]}}
    )
    fresh = compress(
        alone,
        model=layout.artifact("finetune"),
        train_text=layout.root / "data/corpus/train.txt",
        out_dir=tmp_path / "alone",
        seed=params.seed,
        registry=get_registry(),
    )
    assert fresh.metrics["kd-0p6"]["reused_steps"] == 0
    reused = load_file(out / "kd-0p6" / "model.safetensors")
    recomputed = load_file(tmp_path / "alone" / "kd-0p6" / "model.safetensors")
    assert reused.keys() == recomputed.keys()
    assert all(bool((reused[k] == recomputed[k]).all()) for k in reused)
    assert not list(out.parent.glob(".compress.prefixes.*"))  # the run's cache is gone


def test_a_float_variant_of_an_earlier_run_is_the_prefix_of_a_later_recipe(
    swept, tmp_path, monkeypatch, caplog
):
    """A float variant in the variant cache (here ``mag``, magnitude 50%) serves a later
    run's recipe that starts with the same steps (``mag-int8``): the pruner does not run
    again, and the result is byte for byte what building it afresh gives."""
    import logging

    from safetensors.torch import load_file

    from unbottle.core.stages.compress import compress
    from unbottle.plugins.pruning import Magnitude

    layout, params = swept["layout"], swept["params"]
    prune = [{"prune": "magnitude", "sparsity": 0.5}]
    then_int8 = [*prune, {"quantize": "rtn", "bits": 8, "group_size": 32}]

    def run(variants: dict, out: str, cache: Path | None):
        cfg = Params.model_validate({**SWEEP_PARAMS, "compress": {"variants": variants}}).compress
        return compress(
            cfg,
            model=layout.artifact("finetune"),
            train_text=layout.root / "data/corpus/train.txt",
            out_dir=tmp_path / out,
            seed=params.seed,
            registry=get_registry(),
            variant_cache=cache,
        )

    cache = tmp_path / "variants"
    assert run({"mag": prune}, "first", cache).metrics["mag"]["reused_steps"] == 0
    fresh = run({"mag-int8": then_int8}, "fresh", None)  # no cache: both steps run
    assert fresh.metrics["mag-int8"]["reused_steps"] == 0

    def prune_again(self, model, ctx):
        raise AssertionError("the pruner ran again")

    monkeypatch.setattr(Magnitude, "prune", prune_again)
    with caplog.at_level(logging.INFO, logger="unbottle.compress"):
        later = run({"mag-int8": then_int8}, "later", cache)
    assert later.metrics["mag-int8"]["reused_steps"] == 1
    assert (
        "steps 1-1 reused from the variant cache, where an earlier run stored them as "
        "the variant mag" in caplog.text
    )
    steps = read_manifest(tmp_path / "later" / "mag-int8")["steps"]
    assert [s["action"] for s in steps] == ["prune", "quantize"]
    assert steps[0]["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    reused = load_file(tmp_path / "later" / "mag-int8" / "model.safetensors")
    recomputed = load_file(tmp_path / "fresh" / "mag-int8" / "model.safetensors")
    assert reused.keys() == recomputed.keys()
    assert all(bool((reused[k] == recomputed[k]).all()) for k in reused)


def test_a_prefix_key_changes_with_the_code_of_the_compress_stage(swept, monkeypatch):
    """Prefixes outlive a run (the sweep's cache, float variants in the variant cache): a
    change to the calibration pass or another helper the stage runs must not reuse them."""
    from unbottle.core.stages.compress import prepare
    from unbottle.core.store import cache

    layout, params = swept["layout"], swept["params"]
    bench = prepare(
        params.compress,
        model=layout.artifact("finetune"),
        train_text=layout.root / "data/corpus/train.txt",
        seed=params.seed,
        registry=get_registry(),
    )
    before = bench.prefix_keys("kd-0p3")
    assert bench.prefix_keys("kd-0p3") == before
    hashes = cache.code_hashes

    def edited(modules):
        return {**hashes(modules), "core.compression": "edited"}

    monkeypatch.setattr(cache, "code_hashes", edited)
    assert all(a != b for a, b in zip(bench.prefix_keys("kd-0p3"), before, strict=True))


def test_each_variant_of_the_sweep_is_a_row_of_one_report(swept):
    layout = swept["layout"]
    rows = swept["results"]["evaluate"].metrics["variants"]
    assert list(rows) == ["pretrained", "finetuned", "kd-0p3", "kd-0p6"]
    for name, row in rows.items():
        for key in (
            "perplexity",
            "accuracy",
            "size_bytes",
            "peak_memory_bytes",
            "ttft_s",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "decode_tokens_per_s_batched",
            "latency_p50_s",
            "latency_p95_s",
            "roofline_pct",
        ):
            assert math.isfinite(row[key]), (name, key)
        assert row["latency_p95_s"] >= row["latency_p50_s"] > 0
        assert row["batched_size"] == 2
        assert 0 < row["roofline_pct"] < 100
    # A 1-layer student is smaller than the 2-layer model it was distilled from.
    assert rows["kd-0p3"]["weight_bytes_per_token"] < rows["finetuned"]["weight_bytes_per_token"]
    assert rows["kd-0p6"]["nonzero_parameters"] < rows["kd-0p3"]["nonzero_parameters"]

    report = (layout.artifact("evaluate") / "report.md").read_text()
    for name in rows:
        assert f"| {name} |" in report
    assert "## Samples" in report
    for plot in ("quality_vs_size", "quality_vs_speed"):
        assert (layout.artifact("evaluate") / f"{plot}.png").stat().st_size > 5000
        assert (layout.metrics_dir / f"evaluate_{plot}.png").is_file()
    with open(layout.plot_file("evaluate_table"), newline="") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == list(rows)


def test_deploy_ships_what_the_policy_picks_and_the_card_shows_why(swept):
    layout = swept["layout"]
    rows = swept["results"]["evaluate"].metrics["variants"]
    expected = min(
        ("finetuned", "kd-0p3", "kd-0p6"), key=lambda n: (rows[n]["size_bytes"], n != "finetuned")
    )
    manifest = read_manifest(layout.artifact("deploy"))
    assert manifest["variant"] == expected
    assert manifest["decision"]["policy"] == "smallest"
    card = (layout.artifact("deploy") / "README.md").read_text()
    assert "### Deployment decision" in card and f"| {expected} | pass | **deployed** |" in card
    assert "| kd-0p6 |" in card  # the evaluation table


def test_when_no_variant_passes_deploy_stops_in_one_line_and_writes_nothing(swept):
    root, layout = swept["root"], swept["layout"]
    before = read_manifest(layout.artifact("deploy"))
    result = run_cli("stage", "deploy", "-S", "deploy.gates.perplexity_ratio={max: 0.5}", cwd=root)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(
        r"error: deploy\.gates: no variant passes; finetuned: perplexity_ratio 1 > max 0\.5; "
        r"kd-0p3: perplexity_ratio [\d.]+ > max 0\.5; kd-0p6: perplexity_ratio [\d.]+ > max 0\.5",
        line,
    )
    assert read_manifest(layout.artifact("deploy")) == before


def test_a_variant_whose_files_changed_is_refused_before_measuring(swept, tmp_path):
    import shutil

    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    copy_root = tmp_path / "copy"
    shutil.copytree(swept["root"], copy_root)
    layout = Layout(copy_root)
    weights = layout.artifact("compress") / "kd-0p3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    report = layout.artifact("evaluate") / "report.md"
    before = report.read_text()
    with pytest.raises(DataError, match=r"files do not match its manifest \(kd-0p3/model\.safe"):
        run_stage("evaluate", swept["params"], layout, force=True)
    assert report.read_text() == before


def test_read_evaluation_keeps_params_order(tmp_path):
    from unbottle.core.stages.evaluate import EVALUATION, read_evaluation

    out = tmp_path / "ev"
    out.mkdir()
    write_json_atomic(
        out / EVALUATION,
        {"variants": {"b": {}, "a": {}}, "order": ["b", "a"], "table": "| t |"},
    )
    write_manifest(out, stage="evaluate", config={}, strategies={}, inputs={}, metrics={})
    rows, table = read_evaluation(out)
    assert list(rows) == ["b", "a"] and table == "| t |"


def test_the_documented_dvc_experiment_sweeps_queue_the_intended_variants(tmp_path):
    """`dvc exp run --queue -S` with Hydra's grid syntax and `+compress.sweep`: each queued
    experiment's params.yaml validates into the variants docs/evaluation.md promises."""
    import shutil
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO
    from tests.test_dvc import dvc, env, sh

    root = tmp_path / "exp"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    sh("git", "init", "-q", "-b", "main", cwd=root)
    dvc("init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "params", cwd=root)
    dvc(
        "exp",
        "run",
        "--queue",
        "-S",
        "compress.variants.magnitude50.0.sparsity=0.3,0.7",
        "-S",
        "+compress.sweep.mag=[{prune: magnitude, sparsity: {grid: [0.25, 0.5]}}]",
        cwd=root,
    )
    listing = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=root,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    shown = json.loads(listing.stdout)
    queued = [
        rev["data"]["params"]["params.yaml"]["data"]
        for commit in shown
        for exp in commit.get("experiments") or []
        for rev in exp["revs"]
    ]
    assert len(queued) == 2  # the grid of the first -S; the second adds one key to both
    sparsities = []
    for tree in queued:
        params = Params.model_validate(yaml.safe_load(yaml.safe_dump(tree)))
        variants = params.compress.variants
        assert [n for n in variants if n.startswith("mag-")] == ["mag-0p25", "mag-0p5"]
        sparsities.append(variants["magnitude50"][0].options["sparsity"])
    assert sorted(sparsities) == [0.3, 0.7]
