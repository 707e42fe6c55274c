"""Model parallelism on CPUs (gloo): fsdp, tp, pp and hybrid against one process.

Each strategy trains the tiny pretrain model under torchrun; the run (torchrun and every
worker) is killed with SIGKILL after its first checkpoint and launched again, resumes
from the checkpoint, and its losses over every step and its final weights are compared
with one process trained on the same global batch.
Then each bad mesh's one-line refusal, and the memory estimate's per-process shares.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_PARAMS, cli_env, make_workspace, run_cli
from tests.test_training import ONE_THREAD, losses_csv
from unbottle.core.contract.errors import ConfigError

STEPS, EVERY = 12, 3
PARAMS = copy.deepcopy(TINY_PARAMS)
# fp32: a strategy must take one process's steps to float tolerance, which bf16 autocast's
# rounding (auto's choice on a CPU with native bf16) would blur.
PARAMS["pretrain"]["train"].update(
    steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=1, precision="fp32"
)

# name: (processes, params.yaml's pretrain.train.parallelism)
STRATEGIES = {
    "fsdp": (2, "fsdp"),
    "tp": (2, "tp"),
    "pp": (2, {"name": "pp", "microbatches": 2}),
    "hybrid": (4, {"name": "hybrid", "dp": 2, "tp": 2}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_data) -> Path:
    """The same run in one process: the reference."""
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    root = make_workspace(tmp_path_factory.mktemp("single"), tiny_data, PARAMS)
    run_stage("pretrain", Params.model_validate(PARAMS), Layout(root))
    return root


def launch(processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "unbottle",
        "stage",
        "pretrain",
    ]


def kill_9_after_the_first_checkpoint(processes: int, root: Path, log: Path) -> None:
    """Start the run; SIGKILL torchrun and every worker once a checkpoint is whole."""
    checkpoints = root / "artifacts/.checkpoints/pretrain"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            launch(processes), cwd=root, env=cli_env(ONE_THREAD), stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 240
            while not list(checkpoints.glob(f"*/step-{EVERY:06d}/manifest.json")):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.01)
            tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
            assert len(tree) == processes + 1, tree  # torchrun and its workers, all running
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "artifacts/pretrain").exists()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_matches_one_process_and_resumes_after_kill_9(
    name, tmp_path, tiny_data, single_run
):
    processes, strategy = STRATEGIES[name]
    params = copy.deepcopy(PARAMS)
    params["pretrain"]["train"]["parallelism"] = strategy
    root = make_workspace(tmp_path / name, tiny_data, params)
    kill_9_after_the_first_checkpoint(processes, root, tmp_path / "killed.log")
    rerun = subprocess.run(
        launch(processes),
        cwd=root,
        env=cli_env(ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    timing = json.loads((root / "metrics/pretrain_timing.json").read_text())
    assert timing["resumed_from_step"] >= EVERY and timing["resumed_from_step"] % EVERY == 0
    assert json.loads((root / "metrics/pretrain.json").read_text())["world_size"] == processes
    assert not any((root / "artifacts/.checkpoints/pretrain").glob("*/step-*"))

    mine = losses_csv(root / "metrics/pretrain_loss.csv")
    single = losses_csv(single_run / "metrics/pretrain_loss.csv")
    assert len(mine) == len(single) == STEPS
    for step, (a, b) in enumerate(zip(mine, single, strict=True), 1):
        assert abs(a - b) / abs(b) < 1e-4, (step, a, b)
    assert single[-1] < single[0]
    a = load_file(root / "artifacts/pretrain/model.safetensors")
    b = load_file(single_run / "artifacts/pretrain/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


# ------------------------------------------------------------------- bad input


def llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32,
    }
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}))


def train_cfg(**overrides):
    from unbottle.core.config.schema import TrainParams

    return TrainParams(**{"batch_size": 4, "seq_len": 16, **overrides})


@pytest.mark.parametrize(
    ("world", "name", "options", "model", "message"),
    [
        (
            2,
            "hybrid",
            {"dp": 2, "tp": 2},
            {},
            r"^pretrain\.train\.parallelism: 'hybrid' mesh dp 2 x tp 2 = 4 processes, but 2 were "
            r"launched; launch 4 \(`torchrun",
        ),
        (
            2,
            "tp",
            {"tp": 4},
            {},
            r"^pretrain\.train\.parallelism: 'tp' mesh tp 4 = 4 processes, but 2 were launched",
        ),
        (
            3,
            "tp",
            {},
            {},
            r"^pretrain\.train\.parallelism\.tp: 3 does not divide the model's 4 attention "
            r"heads; use a tp that divides heads, key/value heads and intermediate_size$",
        ),
        (
            4,
            "tp",
            {},
            {"num_key_value_heads": 2},
            r"^pretrain\.train\.parallelism\.tp: 4 does not divide the model's 2 key/value heads",
        ),
        (
            4,
            "hybrid",
            {"dp": 1, "tp": 4},
            {"intermediate_size": 66},
            r"^pretrain\.train\.parallelism\.tp: 4 does not divide the model's 66 FFN width",
        ),
        (
            3,
            "pp",
            {},
            {},
            r"^pretrain\.train\.parallelism\.stages: 3 pipeline stages but the model has 2 "
            r"decoder layers; use at most 2$",
        ),
        (
            2,
            "pp",
            {"microbatches": 3},
            {},
            r"^pretrain\.train\.parallelism\.microbatches: 3 does not divide the 4 rows",
        ),
    ],
)
def test_a_mesh_the_launch_or_model_cannot_take_is_refused_in_one_line(
    monkeypatch, world, name, options, model, message
):
    from unbottle.core.registry import get_registry

    monkeypatch.setenv("WORLD_SIZE", str(world))
    strategy = get_registry().create("parallelism", name, options)
    with pytest.raises(ConfigError, match=message):
        strategy.check_model(llama(**model), train_cfg(), "pretrain.train")


def test_the_cli_refuses_a_bad_mesh_before_any_work(workspace):
    result = run_cli(
        "stage",
        "pretrain",
        "-S",
        "pretrain.train.parallelism.name=hybrid",
        "-S",
        "pretrain.train.parallelism.dp=2",
        "-S",
        "pretrain.train.parallelism.tp=2",
        cwd=workspace,
        env={"WORLD_SIZE": "2"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith(
        "pretrain.train.parallelism: 'hybrid' mesh dp 2 x tp 2 = 4 processes, but 2 were launched; "
        "launch 4 (`torchrun --nproc_per_node N -m unbottle stage "
        "<stage> ...`) or change the mesh"
    ), result.stderr
    assert not (workspace / "artifacts/pretrain").exists()


@pytest.mark.parametrize(
    ("stage", "overrides", "message"),
    [
        (
            "pretrain",
            ["pretrain.train.parallelism={name: hybrid, dp: 2, tp: 2}"],
            r"^pretrain\.train\.parallelism: 'hybrid' mesh dp 2 x tp 2 = 4 processes, but 2 ",
        ),
        (
            "finetune",
            ["finetune.train.parallelism=ddp", "finetune.train.batch_size=3"],
            r"^finetune\.train\.batch_size: 3 does not split over 2 processes x 1 accumulation",
        ),
        (  # continued pretraining of a released model: its source is not even read
            "pretrain",
            [
                "pretrain.source=released-model",
                "pretrain.continued={parallelism: {name: tp, tp: 4}}",
            ],
            r"^pretrain\.continued\.parallelism: 'tp' mesh tp 4 = 4 processes, but 2 ",
        ),
    ],
)
def test_a_launch_that_does_not_fit_is_refused_before_the_data_is_read(
    workspace, monkeypatch, stage, overrides, message
):
    """A wrong process count is known from the launch alone: refused before a corpus is
    read through (gigabytes, for a real one) or a model is built."""
    from unbottle.core.config.loading import load_params
    from unbottle.core.data import prompts
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.stages import preflight
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import setup

    def too_soon(*args, **kwargs):
        raise AssertionError("read or built before the launch was checked")

    readers = [(Corpus, "check"), (prompts, "read_pairs")]
    builders = [
        (preflight, "meta_model"),
        (preflight, "_meta_model_from_params"),
        (preflight, "_source_model"),
    ]
    for owner, name in readers + builders:
        monkeypatch.setattr(owner, name, too_soon)
    monkeypatch.setenv("WORLD_SIZE", "2")
    params = load_params(workspace / "params.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        # planned: as `unbottle run` checks it, with no upstream artifact made yet
        preflight.preflight(stage, params, Layout(workspace), setup(params), planned=True)


def test_every_strategy_is_registered():
    from unbottle.core.registry import get_registry

    names = get_registry().names("parallelism")
    assert {"single", "ddp", "fsdp", "tp", "pp", "hybrid"} <= set(names)


# ------------------------------------------------------------------- memory


def test_the_memory_estimate_knows_each_strategys_share():
    """Per process: FSDP a 1/N shard (plus the layers it gathers), TP half of every
    projection, PP the stage with the most to hold; activations follow the rows each sees."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbottle.core.registry import get_registry
    from unbottle.core.training.memory import Split, estimate

    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=32,
                tie_word_embeddings=True,
            )
        )
    cfg = train_cfg(batch_size=8)
    adamw = get_registry().create("optimizer", "adamw", {})

    def plan(split: Split, rows: int):
        return estimate(
            model,
            cfg,
            micro_batch=rows,
            mixed_precision="no",
            optimizer_strategy=adamw,
            world_size=1,
            split=split,
        )

    params = dict(model.named_parameters())
    projections = sum(
        p.numel() * 4 for n, p in params.items() if n.rsplit(".", 2)[-2].endswith("proj")
    )
    layer0 = sum(p.numel() * 4 for n, p in params.items() if ".layers.0." in n)
    whole = plan(Split(), 8)
    assert whole.weights == sum(p.numel() * 4 for p in params.values()) + 4 * 4  # + inv_freq

    fsdp = plan(Split(data=2, shard=2), 4)
    assert fsdp.weights == whole.weights // 2
    assert fsdp.optimizer == whole.optimizer // 2
    assert fsdp.activations == whole.activations // 2
    assert fsdp.transient - 3 * layer0 == plan(Split(), 4).transient

    tp = plan(Split(tensor=2), 8)
    assert tp.weights == whole.weights - projections // 2
    assert tp.gradients == whole.gradients - projections // 2
    assert whole.activations // 2 < tp.activations < whole.activations

    gpipe = plan(Split(pipeline=2, microbatches=4), 8)
    one_f_one_b = plan(Split(pipeline=2, microbatches=4, schedule="1f1b"), 8)
    embedding = 64 * 32 * 4
    # The last stage holds two layers, the final norm and the (tied) head.
    assert gpipe.weights == 2 * layer0 + 32 * 4 + embedding + 4 * 4
    assert one_f_one_b.activations < gpipe.activations < whole.activations

    hybrid = plan(Split(data=2, shard=2, tensor=2), 4)
    assert hybrid.weights == tp.weights // 2
