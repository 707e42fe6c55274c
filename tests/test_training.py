"""Training that scales, checked on a CPU with tiny models.

DDP over two processes against one process; a run killed with SIGKILL and rerun against
one never interrupted, bit for bit; corrupt checkpoints; every optimizer, precision,
schedule and finetuning method; gradient accumulation and checkpointing; the memory
estimate against what autograd really saves; and each bad input's one-line refusal.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.conftest import TINY_PARAMS, cli_env, make_workspace, run_cli
from unbottle.core.config.schema import Params, TrainParams
from unbottle.core.contract.errors import ConfigError
from unbottle.core.registry import get_registry
from unbottle.core.training.loop import (
    Batches,
    build_schedule,
    checkpoint_store,
    micro_batch_size,
    resolve_precision,
    run_key,
    train,
)

# Tiny models train faster on one thread than on two that other processes contend for;
# subprocesses get the same setting, so in- and out-of-process runs compare bit for bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "tie_word_embeddings": True,
}


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


class Crash(RuntimeError):
    """Raised by the data pipeline to stop a run in the middle."""


def learnable_stream(length: int = 2000) -> torch.Tensor:
    """Tokens where each follows from the one before (t -> 5t + 3 mod 64), reset now and then."""
    g = torch.Generator().manual_seed(1)
    tokens = [0]
    for _ in range(length - 1):
        reset = torch.rand((), generator=g) < 0.05
        tokens.append(
            int(torch.randint(0, 64, (), generator=g)) if reset else (5 * tokens[-1] + 3) % 64
        )
    return torch.tensor(tokens)


def token_windows(*, seq_len: int = 16, crash_at: int | None = None, seed: int = 3) -> Batches:
    """Windows of a random token stream; ``crash_at``: the collate call that fails."""
    stream = learnable_stream()
    calls = {"n": 0}

    def windows(starts: list[int]) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash(f"collate call {crash_at}")
        ids = torch.stack([stream[s : s + seq_len] for s in starts])  # (B, T)
        return {"input_ids": ids, "labels": ids}

    return Batches(size=stream.numel() - seq_len, collate=windows, seed=seed)


def padded_pairs(seed: int = 5) -> Batches:
    """Prompt/answer rows of different lengths, right-padded, loss on the answers only."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(32):
        prompt = torch.randint(2, 64, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g)
        answer = torch.randint(2, 64, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
        rows.append((prompt.tolist(), answer.tolist()))

    def collate(ids: list[int]) -> dict[str, torch.Tensor]:
        from unbottle.core.stages.finetune import IGNORE
        from unbottle.core.stages.finetune import collate as qa_collate

        # (input ids, labels): the labels IGNORE over the prompt, as encode_pairs makes them.
        examples = [(p + a, [IGNORE] * len(p) + a) for p, a in (rows[i] for i in ids)]
        return qa_collate(examples, pad=1)

    return Batches(size=len(rows), collate=collate, seed=seed)


def cfg(**overrides) -> TrainParams:
    base = {
        "steps": 12,
        "batch_size": 4,
        "seq_len": 16,
        "lr": 1e-2,
        "warmup_steps": 2,
        "log_every": 100,
        "checkpoint_every": 0,
        "precision": "fp32",
    }
    return TrainParams(**{**base, **overrides})


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def losses_csv(path: Path) -> list[float]:
    with open(path) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


# ------------------------------------------------------------------- DDP


def test_ddp_over_two_processes_matches_one_process(tmp_path, tiny_data):
    """Per-process batch B/2 on 2 gloo processes gives the losses of batch B on one."""
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["train"].update(steps=20, batch_size=4)
    ddp_root = make_workspace(tmp_path / "ddp", tiny_data, params)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*launch, "-m", "unbottle", "stage", "pretrain", "-S", "pretrain.train.parallelism=ddp"],
        cwd=ddp_root,
        env=cli_env(ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((ddp_root / "metrics/pretrain.json").read_text())
    assert metrics["world_size"] == 2

    single_root = make_workspace(tmp_path / "single", tiny_data, params)
    run_stage("pretrain", Params.model_validate(params), Layout(single_root))

    ddp = losses_csv(ddp_root / "metrics/pretrain_loss.csv")
    single = losses_csv(single_root / "metrics/pretrain_loss.csv")
    assert len(ddp) == len(single) == 20
    for step, (a, b) in enumerate(zip(ddp, single, strict=True), 1):
        assert abs(a - b) / abs(b) < 1e-4, (step, a, b)
    assert single[-1] < single[0]


def test_ddp_refuses_a_launch_that_does_not_match(monkeypatch):
    from unbottle.plugins.parallelism import DDP, Single

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"'ddp' needs at least 2 processes but 1 was launched"):
        DDP(DDP.Config()).accelerator(mixed_precision="no")

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("WORLD_SIZE", str(cores + 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores + 1))
    with pytest.raises(
        ConfigError, match=rf"launched with {cores + 1} processes on this machine but it has "
    ):
        DDP(DDP.Config(cpu=True)).accelerator(mixed_precision="no")
    with pytest.raises(ConfigError, match=r"processes: 4 expected but \d+ were launched"):
        DDP(DDP.Config(processes=4)).accelerator(mixed_precision="no")
    with pytest.raises(ConfigError, match=r"'single' runs one process, but \d+ were launched"):
        Single(Single.Config()).accelerator(mixed_precision="no")


def test_a_global_batch_the_processes_cannot_split_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"^pretrain\.train\.batch_size: 6 does not split over 4 processes x 1 "
        r"accumulation steps; use a multiple of 4$",
    ):
        micro_batch_size(cfg(batch_size=6), 4, "pretrain.train")
    assert micro_batch_size(cfg(batch_size=8, grad_accum_steps=2), 2, "k") == 2


# ------------------------------------------------------------------- resume


def test_a_run_killed_mid_way_resumes_to_the_same_weights_bit_for_bit(tmp_path, tiny_data):
    from safetensors.torch import load_file

    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["train"].update(steps=40, checkpoint_every=5, keep_checkpoints=2)
    killed = make_workspace(tmp_path / "killed", tiny_data, params)
    checkpoints = killed / "artifacts/.checkpoints/pretrain"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unbottle", "stage", "pretrain"],
            cwd=killed,
            env=cli_env(ONE_THREAD),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("*/step-000010/manifest.json")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "artifacts/pretrain").exists()
    kept = sorted(p.name for p in checkpoints.glob("*/step-*"))
    assert 1 <= len(kept) <= 2, kept  # the newest two are kept

    rerun = run_cli("stage", "pretrain", cwd=killed, env=ONE_THREAD)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed_from = json.loads((killed / "metrics/pretrain_timing.json").read_text())[
        "resumed_from_step"
    ]
    assert resumed_from >= 10 and resumed_from % 5 == 0
    assert not any(checkpoints.glob("*/step-*"))  # cleared once the artifact is whole

    clean = make_workspace(tmp_path / "clean", tiny_data, params)
    run_stage("pretrain", Params.model_validate(params), Layout(clean))
    a = load_file(killed / "artifacts/pretrain/model.safetensors")
    b = load_file(clean / "artifacts/pretrain/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses_csv(killed / "metrics/pretrain_loss.csv") == losses_csv(
        clean / "metrics/pretrain_loss.csv"
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "adafactor"])
def test_each_optimizer_trains_and_resumes_after_a_crash_bit_for_bit(tmp_path, optimizer):
    registry = get_registry()
    settings = cfg(optimizer=optimizer, checkpoint_every=4, lr=3e-2 if optimizer == "sgd" else 1e-2)
    reference, report = train(tiny_model(), token_windows(), settings, registry=registry, desc="t")
    assert report.losses[-1] < report.losses[0] - 0.1  # it learns

    store = checkpoint_store(settings, stage="t", out_dir=tmp_path / "out", identity={})
    with pytest.raises(Crash):  # step 11 of 12: checkpoints at 4 and 8 are on disk
        train(
            tiny_model(),
            token_windows(crash_at=11),
            settings,
            registry=registry,
            desc="t",
            checkpoints=store,
        )
    assert store.steps() == [4, 8]
    resumed, again = train(
        tiny_model(), token_windows(), settings, registry=registry, desc="t", checkpoints=store
    )
    assert again.resumed_from == 8
    assert again.losses == report.losses
    assert same_weights(resumed, reference)


@pytest.mark.parametrize(
    "method",
    [
        {"name": "lora", "r": 2, "target_modules": ["q_proj", "up_proj"]},
        {"name": "partial", "top_layers": 1},
    ],
)
def test_adapter_and_partial_runs_resume_bit_for_bit(tmp_path, method):
    """Only the trainable weights are checkpointed; the frozen ones come from the inputs."""
    registry = get_registry()
    options = {k: v for k, v in method.items() if k != "name"}

    def prepared():
        torch.manual_seed(7)  # what the finetune stage does before prepare
        return registry.create("finetune_method", method["name"], options).prepare(tiny_model())

    settings = cfg(checkpoint_every=4)
    reference, report = train(prepared(), token_windows(), settings, registry=registry, desc="t")
    store = checkpoint_store(settings, stage="t", out_dir=tmp_path / "out", identity=method)
    with pytest.raises(Crash):
        train(
            prepared(),
            token_windows(crash_at=11),
            settings,
            registry=registry,
            desc="t",
            checkpoints=store,
        )
    from safetensors.torch import load_file

    saved = load_file(store.final_dir(8) / "model.safetensors")
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert set(saved) == trainable  # the frozen weights are not in the checkpoint
    resumed, again = train(
        prepared(), token_windows(), settings, registry=registry, desc="t", checkpoints=store
    )
    assert again.resumed_from == 8
    assert again.losses == report.losses
    assert same_weights(resumed, reference)


def test_checkpoints_kept_after_the_artifact_is_written_still_resume_the_run(tmp_path, tiny_data):
    from safetensors.torch import load_file

    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["train"].update(
        steps=6, checkpoint_every=2, keep_checkpoints=5, clear_checkpoints=False
    )
    root = make_workspace(tmp_path, tiny_data, params)
    run_stage("pretrain", Params.model_validate(params), Layout(root))
    first = load_file(root / "artifacts/pretrain/model.safetensors")
    checkpoints = root / "artifacts/.checkpoints/pretrain"
    # Every checkpoint but the last step's, which the artifact is.
    assert sorted(p.name for p in checkpoints.glob("*/step-*")) == ["step-000002", "step-000004"]

    shutil.rmtree(root / "artifacts/pretrain")  # the newest one resumes the run, bit for bit
    again = run_stage("pretrain", Params.model_validate(params), Layout(root))
    assert again.metrics["resumed_from_step"] == 4
    second = load_file(root / "artifacts/pretrain/model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_corrupt_checkpoint_is_skipped_and_the_one_before_it_is_used(tmp_path, caplog):
    registry = get_registry()
    settings = cfg(checkpoint_every=4, keep_checkpoints=3)
    reference, _ = train(tiny_model(), token_windows(), settings, registry=registry, desc="t")
    store = checkpoint_store(settings, stage="t", out_dir=tmp_path / "out", identity={})
    with pytest.raises(Crash):
        train(
            tiny_model(),
            token_windows(crash_at=11),
            settings,
            registry=registry,
            desc="t",
            checkpoints=store,
        )
    newest = store.final_dir(8) / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated

    with caplog.at_level(logging.WARNING, logger="unbottle.checkpoint"):
        resumed, report = train(
            tiny_model(), token_windows(), settings, registry=registry, desc="t", checkpoints=store
        )
    assert report.resumed_from == 4
    assert any(
        "step-000008 is unusable (optimizer.safetensors does not match its sha256)" in r.message
        for r in caplog.records
    )
    assert same_weights(resumed, reference)


def test_checkpoints_resume_only_the_same_run(tmp_path):
    base = cfg(checkpoint_every=4)
    key = run_key(base, stage="t", identity={"data": "x"})
    # Logging and checkpoint cadence do not change the weights: same run.
    assert run_key(cfg(checkpoint_every=2, log_every=1), stage="t", identity={"data": "x"}) == key
    assert (
        run_key(cfg(checkpoint_every=4, clear_checkpoints=False), stage="t", identity={"data": "x"})
        == key
    )
    assert run_key(cfg(checkpoint_every=4, lr=2e-2), stage="t", identity={"data": "x"}) != key
    assert run_key(base, stage="t", identity={"data": "y"}) != key

    registry = get_registry()
    store = checkpoint_store(base, stage="t", out_dir=tmp_path / "out", identity={})
    with pytest.raises(Crash):
        train(
            tiny_model(),
            token_windows(crash_at=7),
            base,
            registry=registry,
            desc="t",
            checkpoints=store,
        )
    other = cfg(checkpoint_every=4, lr=2e-2)
    other_store = checkpoint_store(other, stage="t", out_dir=tmp_path / "out", identity={})
    _, report = train(
        tiny_model(), token_windows(), other, registry=registry, desc="t", checkpoints=other_store
    )
    assert report.resumed_from == 0
    assert store.steps() == [4]  # the other run's checkpoints are left alone


# ------------------------------------------------------------------- numerics


def test_gradient_accumulation_gives_the_losses_of_one_big_batch():
    """Padded rows with different answer lengths: the loss is one mean over all tokens."""
    registry = get_registry()
    runs = [
        train(
            tiny_model(),
            padded_pairs(),
            cfg(batch_size=8, grad_accum_steps=k),
            registry=registry,
            desc="t",
        )
        for k in (1, 2, 4)
    ]
    one, *others = (report.losses for _, report in runs)
    for losses in others:
        assert losses == pytest.approx(one, rel=1e-5)
    for model, _ in runs[1:]:
        for a, b in zip(model.parameters(), runs[0][0].parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_gradient_checkpointing_saves_activations_and_keeps_the_losses():
    registry = get_registry()
    saved: list[int] = []

    def measured_loss(model, batch):
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch, use_cache=False).loss
        saved.append(sum(sizes.values()))
        return loss

    _, a = train(
        tiny_model(),
        token_windows(),
        cfg(steps=4),
        registry=registry,
        desc="t",
        loss_fn=measured_loss,
    )
    plain_saved = saved.copy()
    saved.clear()
    checkpointed, b = train(
        tiny_model(),
        token_windows(),
        cfg(steps=4, grad_checkpointing=True),
        registry=registry,
        desc="t",
        loss_fn=measured_loss,
    )
    assert b.losses == pytest.approx(a.losses, rel=1e-6)
    assert max(saved) < 0.6 * min(plain_saved)
    assert not checkpointed.is_gradient_checkpointing  # off again for what comes after


@pytest.mark.parametrize(
    ("schedule", "after_warmup", "at_end"),
    [("cosine", 1.0, 0.1), ("linear", 1.0, 0.0), ("constant", 1.0, 1.0)],
)
def test_learning_rate_schedules(schedule, after_warmup, at_end):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_schedule(
        optimizer, cfg(schedule=schedule, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    )
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0] / 0.5)
        optimizer.step()
        scheduler.step()
    rates.append(scheduler.get_last_lr()[0] / 0.5)
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.5)  # warmup
    assert rates[2] == pytest.approx(after_warmup)
    assert rates[-1] == pytest.approx(at_end)


# ------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_precision_sets_the_dtype_of_the_matmuls(precision, dtype):
    seen = set()

    def loss_fn(model, batch):
        seen.add(_matmul_dtype(model, batch))
        return model(**batch, use_cache=False).loss

    _, report = train(
        tiny_model(),
        token_windows(),
        cfg(steps=2, precision=precision),
        registry=get_registry(),
        desc="t",
        loss_fn=loss_fn,
    )
    assert seen == {dtype}
    assert report.precision == precision
    assert all(p.dtype == torch.float32 for p in tiny_model().parameters())  # fp32 master weights


def test_the_trained_model_computes_in_fp32_after_a_bf16_run():
    """Autocast is for training: what a stage measures on the trained model in the same
    process (held-out metrics, continued pretraining's reference perplexity) must be what
    the saved float model gives when loaded, not a bf16 forward."""
    trained, _ = train(
        tiny_model(),
        token_windows(),
        cfg(steps=2, precision="bf16"),
        registry=get_registry(),
        desc="t",
    )
    batch = token_windows().collate([0, 1])
    assert _matmul_dtype(trained, batch) == torch.float32
    fresh = tiny_model()
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            trained(input_ids=batch["input_ids"]).logits,
            fresh(input_ids=batch["input_ids"]).logits,
            atol=1e-6,
            rtol=1e-6,
        )


def _matmul_dtype(model, batch) -> torch.dtype:
    """The dtype a projection's output has in this forward pass (autocast casts it)."""
    dtypes = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        model(**batch, use_cache=False)
    finally:
        handle.remove()
    return dtypes[0]


def test_auto_precision_picks_per_device_and_says_why():
    mode, reason = resolve_precision("auto")
    if torch.cuda.is_available():
        assert mode in ("bf16", "fp16")
        return
    # The kernel's own account of the CPU, not torch's: its flags name the bf16 extensions.
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to check torch's answer against")
    flags = set(re.findall(r"^flags\s*:(.*)$", cpuinfo.read_text(), flags=re.M)[0].split())
    if flags & {"amx_bf16", "avx512_bf16"}:
        assert mode == "bf16", reason
        assert reason.startswith("auto: the CPU has native bf16 (")
    else:
        assert mode == "no"
        assert "no native bf16" in reason and "20x slower" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto's CPU rule")
def test_auto_keeps_a_narrow_model_in_fp32_on_a_cpu(monkeypatch):
    from unbottle.core.training import loop

    monkeypatch.setattr(loop, "cpu_bf16_instructions", lambda: "AMX")
    narrow, wide = tiny_model(), SimpleNamespace(config=SimpleNamespace(hidden_size=576))
    assert narrow.config.hidden_size < loop.CPU_BF16_MIN_WIDTH
    mode, reason = resolve_precision("auto", model=narrow)
    assert mode == "no"
    assert reason.startswith(
        f"auto: fp32, because the model's hidden size ({narrow.config.hidden_size})"
    )
    assert resolve_precision("auto", model=wide) == ("bf16", "auto: the CPU has native bf16 (AMX)")
    assert resolve_precision("bf16", model=narrow)[0] == "bf16"  # asked for: not overruled
    # The loop resolves it with the model it trains: the narrow one trains in fp32.
    run = cfg(precision="auto", steps=1)
    report = train(tiny_model(), token_windows(), run, registry=get_registry(), desc="t")[1]
    assert (report.precision, report.precision_reason) == ("fp32", reason)
    monkeypatch.setattr(loop, "cpu_bf16_instructions", lambda: None)
    assert resolve_precision("auto", model=wide)[0] == "no"  # no native bf16: fp32 anyway


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_fp16_refuses_on_a_cpu():
    # The message names the loop's params section (`<desc>.train`), not a bare `train`.
    with pytest.raises(ConfigError, match=r"^t\.train\.precision: fp16 needs a CUDA GPU"):
        train(
            tiny_model(), token_windows(), cfg(precision="fp16"), registry=get_registry(), desc="t"
        )


# ------------------------------------------------------------------- memory


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_estimate_matches_what_autograd_saves(checkpointing):
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbottle.core.training.memory import activation_values_per_token

    config = LlamaConfig(
        **{
            **TINY_LLAMA,
            "hidden_size": 64,
            "intermediate_size": 172,
            "vocab_size": 256,
            "max_position_embeddings": 64,
        }
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 256, (4, 64))
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in storages.items() if ptr not in weights)
    measured += out.logits.untyped_storage().nbytes()  # alive in the output, not saved
    counts = activation_values_per_token(config, 64, checkpointing=checkpointing)
    estimated = 4 * 64 * (counts["stack"] + counts["head"]) * 4
    assert estimated == pytest.approx(measured, rel=0.1)


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_training(workspace):
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["train"]["batch_size"] = 2_000_000
    with pytest.raises(ConfigError) as refused:
        run_stage("pretrain", Params.model_validate(params), Layout(workspace))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("pretrain.train: training needs about ")
    assert "free; lower pretrain.train.batch_size or seq_len" in message
    assert message.endswith("or set pretrain.train.memory_check=false to try anyway")
    assert not (workspace / "artifacts/pretrain").exists()


def test_training_reports_the_estimate_and_the_measured_peak():
    _, report = train(
        tiny_model(), token_windows(), cfg(steps=2), registry=get_registry(), desc="t"
    )
    metrics = report.metrics()
    assert 0 < metrics["estimated_memory_bytes"] < 10 << 20
    # The peak resident set of this process: the interpreter and torch are in it too.
    assert metrics["peak_memory_bytes"] > metrics["estimated_memory_bytes"]


# ------------------------------------------------------------------- finetuning methods


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_data) -> dict:
    """A pretrained tiny model to finetune."""
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    root = make_workspace(tmp_path_factory.mktemp("base"), tiny_data)
    params = Params.model_validate(yaml.safe_load((root / "params.yaml").read_text()))
    run_stage("pretrain", params, Layout(root))
    return {"root": root, "params": params}


def finetune_with(base: dict, out: Path, method: dict, **train):
    from unbottle.core.stages.finetune import finetune

    params = base["params"].model_dump(mode="json")
    params["finetune"]["method"] = method
    params["finetune"]["train"].update(train)
    params = Params.model_validate(params)
    return finetune(
        params.finetune,
        base=base["root"] / "artifacts/pretrain",
        qa_train=base["root"] / "data/qa/train.jsonl",
        out_dir=out,
        seed=0,
        registry=get_registry(),
    )


def test_lora_saves_the_adapter_and_merges_it_into_the_base(base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from unbottle.core.models.loading import load_model
    from unbottle.core.store.artifacts import verify_artifact

    result = finetune_with(
        base,
        tmp_path / "lora",
        {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        lr=1e-2,
    )
    out = result.out_dir
    verify_artifact(out)
    adapter = load_file(out / "adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any("down_proj" in k for k in adapter) and not any("k_proj" in k for k in adapter)
    assert result.metrics["trainable_parameters"] == sum(v.numel() for v in adapter.values())
    assert not (out / "adapter_config.json").exists()  # the artifact's root is a plain model

    merged, tokenizer = load_model(out)
    pretrained, _ = load_model(base["root"] / "artifacts/pretrain")
    with_adapter = PeftModel.from_pretrained(pretrained, out / "adapter").eval()
    ids = tokenizer("Question: Where does Ada live?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a = merged(input_ids=ids).logits
        b = with_adapter(input_ids=ids).logits
        with with_adapter.disable_adapter():
            base_logits = with_adapter(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base_logits, atol=1e-3)  # the adapter learned something


@pytest.mark.parametrize("method", ["lora", "partial"])
def test_what_trains_is_said_once_not_again_for_the_weightless_check(method, caplog):
    """The checks before any loading prepare a weightless (meta) copy of the model: the
    "parameters train" line belongs to the real model's preparation only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    options = {"top_layers": 1} if method == "partial" else {}
    strategy = get_registry().create("finetune_method", method, options)
    with caplog.at_level(logging.INFO, logger="unbottle.finetune"):
        with torch.device("meta"):
            strategy.prepare(LlamaForCausalLM(config))
        assert not [r for r in caplog.records if "parameters train" in r.getMessage()]
        strategy.prepare(LlamaForCausalLM(config))
    assert len([r for r in caplog.records if "parameters train" in r.getMessage()]) == 1


def test_what_trains_is_said_by_the_main_process_only(caplog, monkeypatch):
    """Under torchrun every process prepares the method on its own copy: one says it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    strategy = get_registry().create("finetune_method", "lora", {})
    monkeypatch.setenv("RANK", "1")  # what torchrun sets in its second process
    with caplog.at_level(logging.INFO, logger="unbottle.finetune"):
        strategy.prepare(LlamaForCausalLM(config))
    assert not [r for r in caplog.records if "parameters train" in r.getMessage()]


def test_lora_target_that_names_no_module_fails_before_training(base, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^finetune\.method\.target_modules: 'attention' names no linear module of the "
        r"model; its linear modules are .*q_proj",
    ):
        finetune_with(
            base, tmp_path / "x", {"name": "lora", "target_modules": ["q_proj", "attention"]}
        )
    assert not (tmp_path / "x").exists()


def test_partial_trains_only_the_top_layers_and_the_named_modules(base, tmp_path):
    from safetensors.torch import load_file

    result = finetune_with(
        base,
        tmp_path / "partial",
        {"name": "partial", "top_layers": 1, "modules": [r"^model\.norm\."]},
        lr=1e-2,
    )
    before = load_file(base["root"] / "artifacts/pretrain/model.safetensors")
    after = load_file(result.out_dir / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith(("model.layers.1.", "model.norm."))}
    assert result.metrics["trainable_parameters"] == sum(before[k].numel() for k in changed)


def test_partial_pattern_that_matches_nothing_fails(base, tmp_path):
    with pytest.raises(
        ConfigError, match=r"^finetune\.method\.modules: 'nothing_here' matches no parameter"
    ):
        finetune_with(base, tmp_path / "x", {"name": "partial", "modules": ["nothing_here"]})
    with pytest.raises(
        ConfigError, match=r"^finetune\.method\.top_layers: 9 is more than the model's 2"
    ):
        finetune_with(base, tmp_path / "x", {"name": "partial", "top_layers": 9})


def test_finetune_seq_len_longer_than_the_context_is_refused(base, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^finetune\.train\.seq_len: 4096 is longer than the base model's context \(64\); "
        r"use at most 64$",
    ):
        finetune_with(base, tmp_path / "x", {"name": "full"}, seq_len=4096)


def test_mixed_batches_draw_the_replay_share_of_rows_from_all_of_the_replay_set():
    from unbottle.core.training.loop import Batches, mix_batches

    def examples(size: int, tag: int) -> Batches:
        def collate(ids: list[int]) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.tensor([[tag, i] for i in ids]).view(-1, 2)}

        return Batches(size=size, collate=collate, seed=0)

    # A corpus of 1,000 examples, a replay set of 50 (smaller) and of 5,000 (larger).
    for replay_size in (50, 5000):
        mixed = mix_batches(examples(1000, 0), examples(replay_size, 1), 0.25)
        draws = torch.randint(0, mixed.size, (20000,), generator=torch.Generator().manual_seed(0))
        rows = mixed.collate(draws.tolist())["input_ids"]  # (20000, 2): (set, example id)
        replayed = rows[rows[:, 0] == 1, 1]
        # 5,000 of 20,000 expected; the binomial's standard deviation is 61.
        assert abs(len(replayed) - 5000) < 250, len(replayed)
        assert int(replayed.min()) >= 0 and int(replayed.max()) < replay_size
        # Spread over the whole replay set, not its first rows.
        assert int(replayed.max()) > 0.95 * replay_size
        own = rows[rows[:, 0] == 0, 1]
        assert int(own.max()) < 1000
    with pytest.raises(ValueError, match="fraction 1"):
        mix_batches(examples(10, 0), examples(10, 1), 1)


def test_rows_that_cannot_share_a_batch_fail_in_one_line_naming_the_replay_key():
    from unbottle.core.training.loop import Batches, mix_batches

    def examples(widths: list[int], keys=("input_ids", "labels")) -> Batches:
        # A plugin objective that pads each batch to its longest row: example i is
        # widths[i] tokens wide.
        def collate(ids: list[int]) -> dict[str, torch.Tensor]:
            width = max(widths[i] for i in ids)
            return {k: torch.zeros(len(ids), width, dtype=torch.long) for k in keys}

        return Batches(size=len(widths), collate=collate, seed=0)

    key = "pretrain.continued.replay_text"
    # Caught before training when the first rows differ ...
    with pytest.raises(
        ConfigError,
        match=rf"^{key}: the objective's input_ids rows are \(8,\) "
        r"from the corpus and \(4,\) from the replay text; replay needs an "
        r"objective whose rows have one width$",
    ):
        mix_batches(examples([8] * 10), examples([4] * 10), 0.5, key=key)
    with pytest.raises(
        ConfigError,
        match=rf"^{key}: the objective's rows from the corpus have "
        r"the keys \['input_ids', 'labels'\] and from the replay text "
        r"\['input_ids'\]; replay needs the same keys in both$",
    ):
        mix_batches(examples([8] * 10), examples([8] * 10, ("input_ids",)), 0.5, key=key)
    # ... and in training when only later ones do, with the same line, not torch's.
    mixed = mix_batches(examples([8] * 10), examples([8] + [4] * 9), 0.5, key=key)
    assert mixed.collate([0, 1])["input_ids"].shape == (2, 8)
    assert mixed.collate([10, 11])["input_ids"].shape == (2, 8)  # replay rows alone
    with pytest.raises(ConfigError, match=rf"^{key}: the objective's input_ids rows"):
        mixed.collate([0, 12])


@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_a_sharded_strategy_refuses_adapters_before_checking_the_model(strategy):
    """Adapters cannot be merged from shards: the line says that, not that the wrapped
    model's layers were not found."""
    from peft import LoraConfig, get_peft_model

    from unbottle.core.training.loop import estimate_memory

    adapted = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(
        ConfigError,
        match=rf"^pretrain\.continued\.parallelism: {strategy} cannot merge a peft adapter at "
        r"the end of training; use ddp or single with a lora method$",
    ):
        estimate_memory(
            adapted,
            cfg(parallelism={"name": strategy}),
            registry=get_registry(),
            key="pretrain.continued",
            processes=2,
        )
