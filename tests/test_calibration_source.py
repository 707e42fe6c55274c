"""What the compressors calibrate on: the training text's prose, the question/answer pairs
as finetuning rendered them, or half of each (``compress.calibration.source``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.released_model import BOS, tiny_released_model
from unbottle.core.config.schema import CalibrationParams
from unbottle.core.contract.errors import DataError
from unbottle.core.data.prompts import PromptFormat, read_pairs
from unbottle.core.stages.compress import (
    calibration_windows,
    conversation_batches,
    conversation_stream,
    read_conversations,
)


@pytest.fixture(scope="module")
def released(tiny_data: Path):
    return tiny_released_model(tiny_data / "corpus" / "train.txt")


def is_window_of(window, stream) -> list[int]:
    """Where ``window`` (1-D) lies in ``stream`` (1-D): every start, possibly none."""
    import torch

    n = window.numel()
    return [s for s in range(stream.numel() - n + 1) if torch.equal(stream[s : s + n], window)]


def test_a_chat_model_calibrates_on_its_conversations_each_window_opening_as_a_request(
    tiny_data, released
):
    """The pairs are the tokens finetuning trained on (the template, the system turn, the
    answers), and every window starts where a conversation starts."""
    from unbottle.core.stages.finetune import encode_pairs

    _, tokenizer = released
    chat = PromptFormat(kind="chat", system_prompt="Answer in a few words.")
    qa_train = tiny_data / "qa" / "train.jsonl"
    pairs = read_pairs(qa_train, "data.qa_train")
    ids, starts = conversation_stream(pairs, chat, tokenizer, seed=0)

    # The stream is every pair's finetuning tokens, one after another, in a seeded order.
    trained = {tuple(i) for i, _ in encode_pairs(tokenizer, pairs, 4096, chat)}
    ends = [*starts[1:], ids.numel()]
    rendered = {tuple(ids[a:b].tolist()) for a, b in zip(starts, ends, strict=True)}
    assert rendered == trained and len(starts) == len(pairs)
    again, _ = conversation_stream(pairs, chat, tokenizer, seed=0)
    other, _ = conversation_stream(pairs, chat, tokenizer, seed=1)
    assert again.tolist() == ids.tolist() and other.tolist() != ids.tolist()

    cfg = CalibrationParams(samples=6, seq_len=48, source="qa_train")
    conversations = read_conversations(
        cfg, qa_train=qa_train, tokenizer=tokenizer, prompt_format=chat, seed=0
    )
    assert conversations[0].tolist() == ids.tolist() and conversations[1] == starts
    windows = calibration_windows(
        cfg, stream=None, seed=0, conversations=conversations, prompt_format=chat
    )
    opening = tokenizer("<|im_start|>system\nAnswer in a few words.", add_special_tokens=False)
    opening = opening["input_ids"]
    assert len(windows) == 6
    for window in windows:
        assert window.shape == (1, 48)
        assert window[0, : len(opening)].tolist() == opening
        assert set(is_window_of(window[0], ids)) & set(starts), "not opening a conversation"
    assert tokenizer.convert_tokens_to_ids(BOS) in windows[0][0].tolist()
    # The same seed draws the same windows.
    drawn = calibration_windows(
        cfg, stream=None, seed=0, conversations=conversations, prompt_format=chat
    )
    assert [w.tolist() for w in drawn] == [w.tolist() for w in windows]


def test_auto_is_both_for_a_chat_model_and_the_prose_for_a_completion_model():
    """What BENCHMARKS.md measured on SmolLM2 in chat format: prose alone let a 2:4 model
    that answers nothing pass the perplexity gate, the pairs alone cost perplexity."""
    from unbottle.core.stages.compress import calibration_source

    auto = CalibrationParams()
    assert auto.source == "auto"
    assert calibration_source(auto, PromptFormat(kind="chat")) == "both"
    assert calibration_source(auto, PromptFormat(kind="completion")) == "train_text"
    for source in ("train_text", "qa_train", "both"):
        chosen = CalibrationParams(source=source)
        assert calibration_source(chosen, PromptFormat(kind="chat")) == source


def test_pairs_shorter_than_a_window_are_one_line_naming_the_way_out(tiny_data, released):
    _, tokenizer = released
    pairs = read_pairs(tiny_data / "qa" / "train.jsonl", "data.qa_train")[:2]
    ids, starts = conversation_stream(pairs, PromptFormat(), tokenizer, seed=0)
    with pytest.raises(
        DataError,
        match=r"^compress\.calibration: the pairs of data\.qa_train render to \d+ tokens, "
        r"fewer than one window of 4096; lower compress\.calibration\.seq_len or use "
        r"compress\.calibration\.source: train_text$",
    ):
        conversation_batches(ids, starts, 4, 4096, seed=0)


def test_both_draws_half_its_windows_from_each_and_keys_its_caches_on_the_pairs(
    tmp_path, pipeline_run
):
    """``both``: the prose's windows, then the pairs' (rounded up), each pair in the
    finetuned model's own format (completion here); the pairs' content is part of every
    cache key, for the stage as for a scheduler planning it."""
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import compress_inputs, plan_prefixes, prepare
    from unbottle.core.store.artifacts import tree_hash

    layout, params = pipeline_run["layout"], pipeline_run["params"]
    qa_train = tmp_path / "train.jsonl"
    shutil.copy(layout.root / params.data.qa_train, qa_train)
    model, train_text = layout.artifact("finetune"), layout.root / params.data.train_text
    calibration = {"samples": 5, "seq_len": 24}

    def bench(source: str):
        cfg = params.compress.model_copy(
            update={"calibration": CalibrationParams(**calibration, source=source)}
        )
        kwargs = {"model": model, "train_text": train_text, "seed": 0, "qa_train": qa_train}
        inputs = compress_inputs(
            cfg, model=model, train_text=tree_hash(train_text), qa_train=qa_train
        )
        return prepare(cfg, registry=get_registry(), **kwargs), plan_prefixes(
            cfg, inputs=inputs, seed=0, registry=get_registry()
        )

    both, planned = bench("both")
    text = both.stream.long()
    question = both.tokenizer("Question:", add_special_tokens=False)["input_ids"]
    from_text = [w for w in both.calibration if is_window_of(w[0], text)]
    from_pairs = [w for w in both.calibration if w[0, : len(question)].tolist() == question]
    assert len(from_text) == 2 and len(from_pairs) == 3, "two prose windows, three of pairs"
    assert both.inputs["qa_train"] and planned == {n: both.prefix_keys(n) for n in both.plans}

    prose, _ = bench("train_text")
    assert "qa_train" not in prose.inputs
    # auto, for this model finetuned in completion format: the prose, and its windows.
    auto, _ = bench("auto")
    assert auto.calibration_source == "train_text" and "qa_train" not in auto.inputs
    assert [w.tolist() for w in auto.calibration] == [w.tolist() for w in prose.calibration]
    assert all(is_window_of(w[0], text) for w in prose.calibration)
    assert prose.prefix_keys("magnitude50") != both.prefix_keys("magnitude50")

    # Other pairs, other windows and other keys; the prose-only keys do not read them.
    with qa_train.open("a", encoding="utf-8") as f:
        f.write('{"question": "Who wrote it?", "answer": "Nobody"}\n')
    changed, _ = bench("both")
    assert changed.prefix_keys("magnitude50") != both.prefix_keys("magnitude50")
    assert changed.variant_key("int8") != both.variant_key("int8")
    assert bench("train_text")[0].prefix_keys("magnitude50") == prose.prefix_keys("magnitude50")


def test_distillation_trains_on_the_calibration_source(tmp_path, pipeline_run):
    """kd drew its training batches from the prose whatever the source said: the same
    student came out of ``both`` as out of ``train_text``."""
    from safetensors.torch import load_file

    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import build_variant, prepare

    layout, params = pipeline_run["layout"], pipeline_run["params"]
    students = {}
    for source in ("train_text", "both"):
        cfg = params.compress.model_copy(
            update={"calibration": CalibrationParams(samples=4, seq_len=24, source=source)}
        )
        bench = prepare(
            cfg,
            registry=get_registry(),
            model=layout.artifact("finetune"),
            train_text=layout.root / params.data.train_text,
            seed=0,
            qa_train=layout.root / params.data.qa_train,
        )
        assert (bench.conversations is None) == (source == "train_text")
        build_variant(bench, "kd1", tmp_path / source)
        students[source] = load_file(tmp_path / source / "model.safetensors")
    assert students["both"].keys() == students["train_text"].keys()
    assert any(
        not torch.equal(weight, students["train_text"][name])
        for name, weight in students["both"].items()
    )
