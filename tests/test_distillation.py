"""Distillation: the teacher is the variant's starting model, the student the current one."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unbottle.core.contract.errors import ConfigError, DataError
from unbottle.core.contract.strategies import CompressContext
from unbottle.plugins.distillation import KnowledgeDistillation

VOCAB = 48


def teacher_and_context() -> tuple[LlamaForCausalLM, CompressContext]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    teacher = LlamaForCausalLM(config).eval()
    # A learnable stream: a repeating pattern with a little noise.
    pattern = torch.arange(VOCAB).repeat(40)
    stream = torch.where(
        torch.rand(pattern.shape) < 0.1, torch.randint(0, VOCAB, pattern.shape), pattern
    )
    calibration = [stream[i : i + 32].unsqueeze(0) for i in range(0, 256, 32)]
    ctx = CompressContext(
        tokenizer=None, calibration=calibration, train_ids=stream, teacher=teacher
    )
    return teacher, ctx


def kd(**options) -> KnowledgeDistillation:
    defaults = {"steps": 30, "batch_size": 4, "seq_len": 32, "lr": 3e-3}
    return KnowledgeDistillation(KnowledgeDistillation.Config(**{**defaults, **options}))


def test_a_pruned_student_keeps_its_zeros_and_moves_toward_the_teacher() -> None:
    teacher, ctx = teacher_and_context()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in student.model.layers:
            w = layer.mlp.up_proj.weight
            w[:, ::2] = 0.0  # half the columns pruned
    zeros_before = {n: (p == 0) for n, p in student.named_parameters() if p.dim() == 2}

    trained, metrics = kd().distill(student, ctx)

    for name, p in trained.named_parameters():
        if name in zeros_before:
            assert torch.all(p[zeros_before[name]] == 0), name
    assert metrics["zeros_kept"] == sum(int(z.sum()) for z in zeros_before.values())
    assert metrics["student_parameters"] == metrics["teacher_parameters"]
    assert metrics["student_perplexity_after"] < metrics["student_perplexity_before"]
    # The teacher is read, never trained.
    fresh, _ = teacher_and_context()
    assert all(
        torch.equal(a, b) for a, b in zip(teacher.parameters(), fresh.parameters(), strict=True)
    )


def test_layers_makes_a_shallower_copy_of_the_current_model() -> None:
    teacher, ctx = teacher_and_context()
    student, metrics = kd(layers=1, steps=2).distill(copy.deepcopy(teacher), ctx)
    assert student.config.num_hidden_layers == 1 and metrics["student_layers"] == 1
    assert metrics["student_parameters"] < metrics["teacher_parameters"]


def test_the_teacher_itself_is_no_student() -> None:
    teacher, ctx = teacher_and_context()
    with pytest.raises(ConfigError, match=r"^distill kd: the student would be the teacher itself"):
        kd().distill(copy.deepcopy(teacher), ctx)


def test_the_student_is_the_same_from_the_stages_narrow_mapped_stream() -> None:
    """The compress stage hands ``train_ids`` in the token file's narrow type (uint16 up
    to 65,536 tokens); kd widens only the windows it draws, and trains the same student."""
    teacher, ctx = teacher_and_context()
    narrow = dataclasses.replace(ctx, train_ids=ctx.train_ids.to(torch.uint16))

    students = []
    for context in (ctx, narrow):
        torch.manual_seed(0)
        student, _ = kd(layers=1, steps=4).distill(copy.deepcopy(teacher), context)
        students.append(student.state_dict())
    for name, weight in students[0].items():
        assert torch.equal(weight, students[1][name]), name


def test_training_windows_come_from_the_source_the_context_names() -> None:
    """Prose windows start anywhere; a pair's window starts where the pair starts (as a
    request does); ``both`` gives the pairs half of the rows, rounded up."""
    _, ctx = teacher_and_context()
    # 60 tokens counting down, pairs starting at 0, 20 and 40: no window of the prose,
    # which counts up.
    pairs = torch.arange(59, -1, -1) % VOCAB
    chat = dataclasses.replace(ctx, conversations=pairs, conversation_starts=[0, 20, 40])
    g = torch.Generator().manual_seed(0)

    def is_prose(row: torch.Tensor) -> bool:
        stream = ctx.train_ids
        return any(
            torch.equal(stream[s : s + len(row)], row) for s in range(len(stream) - len(row))
        )

    prose = chat.training_windows(5, 16, g)  # conversation_share 0: the prose
    assert prose.shape == (5, 16) and prose.dtype == torch.long
    assert all(is_prose(row) for row in prose)
    both = dataclasses.replace(chat, conversation_share=0.5).training_windows(5, 16, g)
    openings = {tuple(pairs[s : s + 16].tolist()) for s in (0, 20, 40)}
    assert all(is_prose(row) for row in both[:2])
    assert all(tuple(row.tolist()) in openings and not is_prose(row) for row in both[2:])
    only = dataclasses.replace(chat, conversation_share=1.0).training_windows(7, 30, g)
    # A window of 30 fits after the pairs starting at 0 and 20, not after the one at 40.
    assert {tuple(row.tolist()) for row in only} <= {
        tuple(pairs[s : s + 30].tolist()) for s in (0, 20)
    }


def test_kd_on_pairs_reads_no_prose_and_says_when_the_pairs_are_too_short() -> None:
    teacher, ctx = teacher_and_context()
    pairs = dataclasses.replace(
        ctx,
        train_ids=torch.arange(8),  # shorter than a window: read, it would fail
        conversations=ctx.train_ids,
        conversation_starts=list(range(0, 800, 40)),
        conversation_share=1.0,
    )
    _, metrics = kd(layers=1, steps=3).distill(copy.deepcopy(teacher), pairs)
    assert metrics["student_layers"] == 1
    with pytest.raises(DataError, match=r"^compress\.variants\.kd\[0\]: the training text has 8"):
        kd(layers=1, steps=3).distill(
            copy.deepcopy(teacher),
            dataclasses.replace(pairs, conversation_share=0.0, where="compress.variants.kd[0]"),
        )
    with pytest.raises(
        DataError,
        match=r"^compress: the pairs of data\.qa_train render to 1920 tokens, fewer than one "
        r"window of 2000; lower the step's seq_len or use compress\.calibration\.source: "
        r"train_text$",
    ):
        pairs.training_windows(2, 2000, torch.Generator())
