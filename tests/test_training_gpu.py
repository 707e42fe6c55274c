"""The CUDA paths of training: bf16 autocast, fp16 with a gradient scaler, NCCL DDP, FSDP.

Skipped where there is no CUDA GPU (CI runs on CPUs); run on a GPU machine with
``pytest tests/test_training_gpu.py``. GPU kernels are not bit-reproducible, so these
compare with tolerances where the CPU tests compare bit for bit.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import TINY_PARAMS, cli_env, make_workspace
from tests.test_training import _matmul_dtype, cfg, losses_csv, tiny_model, token_windows
from unbottle.core.registry import get_registry
from unbottle.core.training.loop import checkpoint_store, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_mixed_precision_trains_on_the_gpu(precision, dtype):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    seen = set()

    def loss_fn(model, batch):
        seen.add(_matmul_dtype(model, batch))
        return model(**batch, use_cache=False).loss

    model, report = train(
        tiny_model(),
        token_windows(),
        cfg(precision=precision),
        registry=get_registry(),
        desc="t",
        loss_fn=loss_fn,
    )
    assert report.precision == precision
    assert report.losses[-1] < report.losses[0]
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights
    assert next(model.parameters()).device.type == "cuda"
    assert report.peak_memory_bytes > 0  # the allocator's peak
    assert seen == {dtype}  # the projections ran in the low precision


def test_fp16_scaler_state_is_checkpointed_and_resumed(tmp_path):
    from tests.test_training import Crash

    settings = cfg(precision="fp16", checkpoint_every=4)
    store = checkpoint_store(settings, stage="t", out_dir=tmp_path / "out", identity={})
    with pytest.raises(Crash):
        train(
            tiny_model(),
            token_windows(crash_at=11),
            settings,
            registry=get_registry(),
            desc="t",
            checkpoints=store,
        )
    trainer = json.loads((store.final_dir(8) / "trainer.json").read_text())
    assert trainer["scaler"] and trainer["scaler"]["scale"] > 0
    _, resumed = train(
        tiny_model(),
        token_windows(),
        settings,
        registry=get_registry(),
        desc="t",
        checkpoints=store,
    )
    _, straight = train(
        tiny_model(), token_windows(), cfg(precision="fp16"), registry=get_registry(), desc="t"
    )
    assert resumed.resumed_from == 8
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-2)


def _torchrun(workspace, processes: int, strategy: str):
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    return subprocess.run(
        [
            *launch,
            "-m",
            "unbottle",
            "stage",
            "pretrain",
            "-S",
            f"pretrain.train.parallelism={strategy}",
        ],
        cwd=workspace,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.skipif(GPUS < 2, reason="NCCL DDP needs two GPUs")
def test_ddp_over_nccl_matches_one_gpu(tmp_path, tiny_data):
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["train"].update(steps=20, batch_size=4, precision="fp32")
    ddp = make_workspace(tmp_path / "ddp", tiny_data, params)
    result = _torchrun(ddp, 2, "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    single = make_workspace(tmp_path / "single", tiny_data, params)
    run_stage("pretrain", Params.model_validate(params), Layout(single))
    a = losses_csv(ddp / "metrics/pretrain_loss.csv")
    b = losses_csv(single / "metrics/pretrain_loss.csv")
    assert a == pytest.approx(b, rel=1e-3)


def test_fsdp_trains_and_writes_a_whole_model(tmp_path, tiny_data):
    from transformers import AutoModelForCausalLM

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["train"].update(steps=12, batch_size=4 * max(GPUS, 1))
    workspace = make_workspace(tmp_path, tiny_data, params)
    result = _torchrun(workspace, max(1, min(GPUS, 2)), "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = losses_csv(workspace / "metrics/pretrain_loss.csv")
    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(workspace / "artifacts/pretrain")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.skipif(GPUS < 2, reason="model parallelism over NCCL needs two GPUs")
@pytest.mark.parametrize("strategy", ["tp", "pp", "fsdp"])
def test_model_parallelism_over_nccl_matches_one_gpu(tmp_path, tiny_data, strategy):
    """The CPU tests' comparison (tests/test_parallel.py), on GPUs with NCCL."""
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["train"].update(steps=12, batch_size=4, precision="fp32")
    sharded = make_workspace(tmp_path / strategy, tiny_data, params)
    result = _torchrun(sharded, 2, strategy)
    assert result.returncode == 0, result.stderr[-3000:]
    single = make_workspace(tmp_path / "single", tiny_data, params)
    run_stage("pretrain", Params.model_validate(params), Layout(single))
    a = losses_csv(sharded / "metrics/pretrain_loss.csv")
    b = losses_csv(single / "metrics/pretrain_loss.csv")
    assert a == pytest.approx(b, rel=1e-3)
