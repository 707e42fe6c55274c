"""Content fingerprints of stages: what decides whether a stage's output is current.

A stage's fingerprint hashes everything its output depends on: the params it reads (the
same keys dvc.yaml lists), the content of its input data and upstream artifacts, the
source of the code it runs (its core modules and the modules of the strategies it uses)
and the versions of unbottle and of every strategy plugin's distribution. When the
output's manifest records the same fingerprint and its files still match their hashes,
the stage has nothing to do: `unbottle stage` and the Prefect flow skip it, and the
flow's tasks use the fingerprint as their cache key.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from unbottle.core.config.params import Params, dump_params, strategy_refs
from unbottle.core.contract.errors import DataError
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import Layout
from unbottle.core.store.artifacts import MANIFEST, tree_hash, write_json_atomic
from unbottle.core.store.provenance import package_version

#: The params each stage reads; dvc.yaml declares the same lists (a test checks).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "pretrain": ("seed", "data.train_text", "data.valid_text", "pretrain"),
    "finetune": ("seed", "data.qa_train", "finetune"),
    "compress": ("seed", "data.train_text", "compress"),
    "evaluate": ("seed", "data.valid_text", "data.qa_test", "data.qa_train", "evaluate"),
    "deploy": ("deploy",),
}

#: The modules each stage runs besides its strategies' own, as dotted names under
#: ``unbottle``; dvc.yaml lists the same files as deps (a test checks).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "pretrain": (
        "core.stages.pretrain",
        "core.models.sources",
        "core.training.loop",
        "core.training.checkpoint",
        "core.training.memory",
        "core.models.loading",
    ),
    "finetune": (
        "core.stages.finetune",
        "core.data.prompts",
        "core.training.loop",
        "core.training.checkpoint",
        "core.training.memory",
        "core.models.loading",
    ),
    # The pruning and quantization algorithms the built-in strategies call.
    "compress": (
        "core.stages.compress",
        "core.models.loading",
        "core.compression.calibration",
        "core.compression.sparsity",
        "plugins.pruning.sparsegpt",
        "plugins.pruning.structured",
        "core.compression.grids",
        "plugins.quantization.gptq",
        "core.models.lowbit",
    ),
    "evaluate": (
        "core.stages.evaluate",
        "core.models.runtimes",
        "core.stages.report",
        "core.data.prompts",
        "core.models.lowbit",
        "core.compression.grids",
    ),
    # The gates and the decision live in evaluate; the bundles load models through runtime.
    "deploy": (
        "core.stages.deploy",
        "core.stages.evaluate",
        "core.models.runtimes",
        "core.serving.engine",
        "core.models.lowbit",
        "core.compression.grids",
    ),
}


def stage_inputs(
    stage: str, params: Params, layout: Layout, registry: Registry | None = None
) -> dict[str, Path]:
    """The files and artifacts a stage reads."""
    data, art = params.data, layout.artifact
    return {
        "pretrain": lambda: {
            "train_text": layout.resolve(data.train_text),
            **source_input(params, layout),
            **held_out_input(params, layout, registry),
        },
        "finetune": lambda: {
            "pretrain": art("pretrain"),
            "qa_train": layout.resolve(data.qa_train),
        },
        "compress": lambda: {
            "finetune": art("finetune"),
            "train_text": layout.resolve(data.train_text),
        },
        "evaluate": lambda: {
            "pretrain": art("pretrain"),
            "finetune": art("finetune"),
            "compress": art("compress"),
            "valid_text": layout.resolve(data.valid_text),
            "qa_test": layout.resolve(data.qa_test),
            "qa_train": layout.resolve(data.qa_train),
        },
        "deploy": lambda: {
            "finetune": art("finetune"),
            "compress": art("compress"),
            "evaluate": art("evaluate"),
        },
    }[stage]()


def source_input(params: Params, layout: Layout) -> dict[str, Path]:
    """The pretrained model the pretrain stage starts from, if any: its content is part of
    the stage's fingerprint, so a changed file reruns the stage."""
    if params.pretrain.source is None:
        return {}
    from unbottle.core.models.sources import locate

    return {"source": locate(params.pretrain.source, layout.root)[1]}


def held_out_input(params: Params, layout: Layout, registry: Registry | None) -> dict[str, Path]:
    """The held-out text on which the pretrain stage measures an encoder objective (a
    causal model is measured by the evaluate stage, so it does not read that text)."""
    if params.pretrain.source is not None or registry is None:
        return {}
    objective = registry.get("objective", params.pretrain.objective.name).cls
    if objective.model_kind == "causal":
        return {}
    return {"valid_text": layout.resolve(params.data.valid_text)}


def _params_slice(stage: str, params: Params) -> dict[str, Any]:
    tree = dump_params(params)
    picked: dict[str, Any] = {}
    for key in STAGE_PARAMS[stage]:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return picked


def _source_hash(module_name: str) -> str:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    return tree_hash(Path(path)) if path else "unknown"


def fingerprint(stage: str, params: Params, layout: Layout, registry: Registry) -> str:
    """The sha256 that names this stage's output for these inputs, params and code."""
    import importlib

    inputs = {}
    for name, path in stage_inputs(stage, params, layout, registry).items():
        try:
            inputs[name] = tree_hash(path)
        except DataError:
            inputs[name] = "missing"
    code = {}
    for module in STAGE_CODE[stage]:
        qualified = f"unbottle.{module}"
        importlib.import_module(qualified)
        code[qualified] = _source_hash(qualified)
    strategies = {}
    for where, kind, name, _ in strategy_refs(params):
        if where.startswith(stage):
            info = registry.get(kind, name)
            strategies[where] = {
                "name": name,
                "distribution": f"{info.distribution} {info.version}",
                "source": _source_hash(info.cls.__module__),
            }
    record = {
        "stage": stage,
        "params": _params_slice(stage, params),
        "inputs": inputs,
        "code": code,
        "strategies": strategies,
        "unbottle": package_version("unbottle"),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def is_current(out_dir: Path, expected: str, metrics_file: Path) -> bool:
    """True when ``out_dir`` was made for ``expected`` and is intact."""
    from unbottle.core.store.artifacts import read_manifest, verify_artifact

    if not (out_dir / MANIFEST).is_file() or not metrics_file.is_file():
        return False
    if read_manifest(out_dir).get("fingerprint") != expected:
        return False
    try:
        verify_artifact(out_dir)
    except DataError:
        return False
    return True


def record(out_dir: Path, value: str) -> None:
    """Stamp a finished artifact's manifest with the fingerprint it was made for."""
    from unbottle.core.store.artifacts import read_manifest

    manifest = read_manifest(out_dir)
    manifest["fingerprint"] = value
    write_json_atomic(out_dir / MANIFEST, manifest)
