"""Finetuning in the model's chat format: the records users give, the tokens the loss
covers, and prompts that are exactly what the server's chat endpoint renders."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS
from tests.released_model import EOS, save_released_model, tiny_released_model
from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.data.prompts import PromptFormat, read_pairs
from unbottle.core.stages.finetune import IGNORE, encode_pairs

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Where does Alice live?"},
        {"role": "assistant", "content": "Dundale"},
        {"role": "user", "content": "And her pet?"},
        {"role": "assistant", "content": "a cat"},
    ]
}


@pytest.fixture(scope="module")
def released(tiny_data: Path):
    return tiny_released_model(tiny_data / "corpus" / "train.txt")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_three_common_record_shapes_are_read_as_pairs(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "Q1?", "answer": "A1"},
            {"prompt": "Say hi:", "completion": " hi"},
            CONVERSATION,
        ],
    )
    qa, prompt_completion, chat = read_pairs(path, "data.qa_train")
    assert qa == {"question": "Q1?", "answer": "A1"}
    assert (prompt_completion["question"], prompt_completion["answer"]) == ("Say hi:", " hi")
    assert (chat["question"], chat["answer"]) == ("And her pet?", "a cat")
    assert chat["messages"] == CONVERSATION["messages"]


def test_a_line_separator_inside_a_json_string_does_not_split_the_record(tmp_path):
    # JSON lets U+2028 and U+0085 stand unescaped in a string; str.splitlines() cuts there.
    pair = {"question": "Line one\u2028line two?", "answer": "yes\u0085no"}
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(pair, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert read_pairs(path, "data.qa_train") == [pair]


def test_gzipped_records_are_read_through(tmp_path):
    pair = {"question": "Q?", "answer": "A"}
    path = tmp_path / "qa.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(pair).encode() + b"\n"))
    assert read_pairs(path, "data.qa_test") == [pair]


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"q": 1}, r'qa\.jsonl:1 needs string fields "question" and "answer", "prompt" and '),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"qa\.jsonl:1: messages need a user turn and must end with a non-empty assistant",
        ),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            r"qa\.jsonl:1: every message needs a role \(system, user, assistant\)",
        ),
    ],
)
def test_a_bad_record_is_one_line_naming_the_file_and_line(tmp_path, record, pattern):
    path = write_jsonl(tmp_path / "qa.jsonl", [record])
    with pytest.raises(DataError, match=pattern):
        read_pairs(path, "data.qa_train")


def test_auto_is_chat_when_the_tokenizer_has_a_template_and_completion_otherwise(released):
    _, tokenizer = released
    assert PromptFormat.resolve("auto", None, tokenizer).kind == "chat"
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    assert PromptFormat.resolve("auto", None, plain).kind == "completion"
    with pytest.raises(ConfigError, match=r"^finetune\.format: chat needs a tokenizer with a"):
        PromptFormat.resolve("chat", None, plain)
    with pytest.raises(ConfigError, match=r"^finetune\.system_prompt: a system prompt needs"):
        PromptFormat.resolve("completion", "Be brief.", tokenizer)


def test_chat_training_learns_every_assistant_turn_and_nothing_else(released):
    _, tokenizer = released
    chat = PromptFormat(kind="chat", system_prompt="Be brief.")
    ((ids, labels),) = encode_pairs(tokenizer, [read_one(CONVERSATION)], 256, chat)
    # The tokens are the whole conversation as the template renders it.
    whole = tokenizer.apply_chat_template(chat.conversation(read_one(CONVERSATION)))
    assert ids == list(whole)
    learned = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
    assert learned == f"Dundale{EOS}\na cat{EOS}\n"
    assert all(label in (t, IGNORE) for t, label in zip(ids, labels, strict=True))


def test_completion_training_keeps_the_question_answer_form(released):
    _, tokenizer = released
    pair = {"question": "Where does Alice live?", "answer": "Dundale"}
    ((ids, labels),) = encode_pairs(tokenizer, [pair], 256, PromptFormat())
    assert tokenizer.decode(ids) == f"Question: Where does Alice live?\nAnswer: Dundale{EOS}"
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(learned) == f" Dundale{EOS}"
    with pytest.raises(DataError, match=r"^data\.qa_train: the conversation 'And her pet\?' "):
        encode_pairs(tokenizer, [read_one(CONVERSATION)], 256, PromptFormat())


def read_one(record: dict) -> dict:
    from unbottle.core.data.prompts import _pair

    return _pair(record, "test")


def test_a_released_model_finetunes_in_chat_format_and_is_evaluated_as_the_server_asks(
    workspace, released, tmp_path
):
    """From a released model (chat template) with the user's messages-format data: the
    finetune stage trains in chat format and records it; evaluation's prompt is token for
    token what the deployed bundle's chat endpoint renders for the same question."""
    from unbottle.core.config.schema import Params
    from unbottle.core.data.prompts import prompt_format_of
    from unbottle.core.serving.engine import load_bundle
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage
    from unbottle.core.store.artifacts import read_manifest

    model, tokenizer = released
    source = save_released_model(model, tokenizer, tmp_path / "released")
    pairs = read_pairs(workspace / "data" / "qa" / "train.jsonl", "qa")
    write_jsonl(
        workspace / "data" / "qa" / "train.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": p["answer"]},
                ]
            }
            for p in pairs
        ],
    )
    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["source"] = {"path": str(source)}
    params["finetune"]["system_prompt"] = "Answer in a few words."
    params["finetune"]["train"]["seq_len"] = 128  # the chat template's tokens, too
    params["deploy"] = {"target": "server", "variant": "finetuned"}
    layout = Layout(workspace)
    validated = Params.model_validate(params)
    for stage in ("pretrain", "finetune"):
        run_stage(stage, validated, layout)
    finetuned = layout.artifact("finetune")
    assert read_manifest(finetuned)["prompt_format"] == {
        "kind": "chat",
        "system_prompt": "Answer in a few words.",
    }
    asked = prompt_format_of(finetuned)
    question = {"question": "Where does Alice live?", "answer": "Dundale"}
    served = load_bundle(finetuned).tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Answer in a few words."},
            {"role": "user", "content": question["question"]},
        ],
        add_generation_prompt=True,
        tokenize=True,
    )
    prompt_ids = tokenizer(asked.prompt_text(tokenizer, question), add_special_tokens=False)
    assert prompt_ids["input_ids"] == list(served)

    # Compressing it calibrates, by default, on its conversations as well as the prose:
    # half the windows open with the system turn finetuning rendered.
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import prepare

    bench = prepare(
        validated.compress,
        model=finetuned,
        train_text=workspace / "data" / "corpus" / "train.txt",
        seed=0,
        registry=get_registry(),
        qa_train=workspace / "data" / "qa" / "train.jsonl",
    )
    assert bench.calibration_source == "both" and "qa_train" in bench.inputs
    opening = tokenizer("<|im_start|>system\nAnswer in a few words.", add_special_tokens=False)
    opened = [
        w[0, : len(opening["input_ids"])].tolist() == opening["input_ids"]
        for w in bench.calibration
    ]
    assert sum(opened) == len(bench.calibration) // 2 + len(bench.calibration) % 2


def test_a_chat_models_usage_example_prompts_as_the_server_does(released):
    from unbottle import DeployContext
    from unbottle.plugins.deploy import prompt_code

    _, tokenizer = released
    ctx = DeployContext(
        variant="finetuned",
        model_format="hf",
        metrics={},
        report_markdown="",
        manifest={},
        example_question="In what year was Gilen Galdul born?",
        prompt_format=PromptFormat(kind="chat", system_prompt="Be brief."),
    )
    scope = {"tokenizer": tokenizer}
    exec(prompt_code(ctx), scope)
    served = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "In what year was Gilen Galdul born?"},
        ],
        add_generation_prompt=True,
    )
    assert scope["ids"]["input_ids"][0].tolist() == list(served)
