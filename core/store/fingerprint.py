"""Content fingerprints of stages: what decides whether a stage's output is current.

A stage's fingerprint hashes everything its output depends on: the params it reads (the
same keys dvc.yaml lists), the content of its input data and upstream artifacts, the
source of the code it runs (its core modules and subpackages, and the whole package of
every strategy it uses) and the versions of unbottle and of every strategy plugin's
distribution. When the
output's manifest records the same fingerprint and its files still match their hashes,
the stage has nothing to do: `unbottle stage` and the Prefect flow skip it, and the
flow's tasks use the fingerprint as their cache key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from unbottle.core.config.loading import dump_params
from unbottle.core.config.schema import Params
from unbottle.core.config.strategy_checks import strategy_refs
from unbottle.core.contract.errors import DataError
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import Layout
from unbottle.core.store.artifacts import MANIFEST, tree_hash, write_json_atomic
from unbottle.core.store.provenance import package_version

#: The params each stage reads; dvc.yaml declares the same lists (a test checks).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    # An encoder objective also reads data.valid_text for its held-out figures: its
    # fingerprint hashes that file (stage_inputs), but DVC does not declare it, since DVC
    # would delete and retrain every causal model when the held-out text changed.
    "pretrain": ("seed", "data.train_text", "pretrain"),
    "finetune": ("seed", "data.qa_train", "finetune"),
    "compress": ("seed", "data.train_text", "data.qa_train", "compress"),
    "evaluate": ("seed", "data.valid_text", "data.qa_test", "data.qa_train", "evaluate"),
    # A target that writes a new model measures it as the evaluate stage does.
    "deploy": ("seed", "data.valid_text", "data.qa_test", "data.qa_train", "evaluate", "deploy"),
}

#: The core code each stage runs besides its strategies' own (which the plugin locks
#: hash), as dotted names under ``unbottle``: the stage's own module, the other stage
#: modules it calls, and whole subpackages for the rest (a test checks this covers every
#: core module the stage imports). The framework (config, contract, store, the runner)
#: decides whether a stage runs, not what it writes, and is left out. dvc.yaml lists the
#: same files and folders as deps (a test checks).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "pretrain": (
        "core.stages.pretrain",
        "core.stages.model_artifact",
        "core.compression",
        "core.data",
        "core.models",
        "core.training",
    ),
    "finetune": (
        "core.stages.finetune",
        "core.stages.model_artifact",
        "core.compression",
        "core.data",
        "core.models",
        "core.training",
    ),
    "compress": (
        "core.stages.compress",
        "core.compression",
        "core.data",
        "core.models",
        "core.training",  # the kd distiller trains through the pipeline's loop
    ),
    "evaluate": (
        "core.stages.evaluate",
        "core.stages.report",
        "core.stages.compress",
        "core.compression",
        "core.data",
        "core.models",
        "core.training",
    ),
    # The gates and the decision live in evaluate; the bundles load models through runtime.
    "deploy": (
        "core.stages.deploy",
        "core.stages.evaluate",
        "core.stages.report",
        "core.stages.compress",
        "core.compression",
        "core.data",
        "core.models",
        "core.serving",
        "core.training",
    ),
}


def stage_code_paths(stage: str) -> dict[str, Path]:
    """Each entry of ``STAGE_CODE[stage]`` and its file or folder."""
    from unbottle.core.store.code import code_path

    paths = {}
    for module in STAGE_CODE[stage]:
        path = code_path(f"unbottle.{module}")
        if path is None:
            raise DataError(f"STAGE_CODE['{stage}']: unbottle.{module} has no source")
        paths[f"unbottle.{module}"] = path
    return paths


def stage_inputs(
    stage: str, params: Params, layout: Layout, registry: Registry | None = None
) -> dict[str, Path]:
    """The files and artifacts a stage reads."""
    data, art = params.data, layout.artifact
    return {
        "pretrain": lambda: {
            "train_text": layout.resolve(data.train_text),
            **source_input(params, layout),
            **continued_texts(params, layout),
            **held_out_input(params, layout, registry),
        },
        "finetune": lambda: {
            "pretrain": art("pretrain"),
            "qa_train": layout.resolve(data.qa_train),
        },
        "compress": lambda: {
            "finetune": art("finetune"),
            "train_text": layout.resolve(data.train_text),
            "qa_train": layout.resolve(data.qa_train),  # calibration windows, by its source
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
            "valid_text": layout.resolve(data.valid_text),
            "qa_test": layout.resolve(data.qa_test),
            "qa_train": layout.resolve(data.qa_train),
        },
    }[stage]()


def source_input(params: Params, layout: Layout) -> dict[str, Path]:
    """The pretrained model the pretrain stage starts from, if any: its content is part of
    the stage's fingerprint, so a changed file reruns the stage."""
    if params.pretrain.source is None:
        return {}
    from unbottle.core.models.sources import locate

    # Only the files' paths, to hash them: reading the config would import transformers
    # into the flow's cache-key check, which otherwise never needs it.
    return {"source": locate(params.pretrain.source, layout.root, read_config=False)[1]}


def continued_texts(params: Params, layout: Layout) -> dict[str, Path]:
    """Continued pretraining's other texts: the one it replays (the weights depend on it)
    and the one on which it measures what it cost the model elsewhere (its metrics do)."""
    continued = params.pretrain.continued
    if params.pretrain.source is None or continued is None:
        return {}
    texts = {"replay_text": continued.replay_text, "reference_text": continued.reference_text}
    return {name: layout.resolve(path) for name, path in texts.items() if path is not None}


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


def strategy_lock(stage: str, params: Params, registry: Registry) -> dict[str, dict[str, str]]:
    """The strategies a stage uses, each with its plugin, distribution, version and the
    hash of its package's code (:mod:`unbottle.core.store.code`). Part of the stage's
    fingerprint, and what DVC's ``plugins`` stage writes to ``locks/<stage>.json``."""
    from unbottle.core.store.code import strategy_code_hash

    lock = {}
    for where, kind, name, _ in strategy_refs(params):
        if where.startswith(stage):
            info = registry.get(kind, name)
            lock[where] = {
                "kind": kind,
                "name": name,
                "plugin": info.plugin,
                "distribution": info.distribution,
                "version": info.version,
                "code": strategy_code_hash(info.cls),
            }
    return lock


def write_plugin_locks(params: Params, layout: Layout, registry: Registry) -> list[Path]:
    """Write ``locks/<stage>.json`` for every stage; a file whose content would not change
    is left alone. DVC's always-changed ``plugins`` stage runs this, and every stage
    depends on its own lock, so DVC reruns a stage exactly when one of its plugins changed.
    """
    from unbottle.core.stages.layout import STAGES
    from unbottle.core.store.artifacts import write_text_atomic

    written = []
    for stage in STAGES:
        path = layout.plugin_lock_file(stage)
        text = json.dumps(strategy_lock(stage, params, registry), indent=2, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
        written.append(path)
    return written


def fingerprint(stage: str, params: Params, layout: Layout, registry: Registry) -> str:
    """The sha256 that names this stage's output for these inputs, params and code."""
    from unbottle.core.store.code import code_hash

    inputs = {}
    for name, path in stage_inputs(stage, params, layout, registry).items():
        try:
            inputs[name] = tree_hash(path)
        except DataError:
            inputs[name] = "missing"
    code = {module: code_hash(path) for module, path in stage_code_paths(stage).items()}
    record = {
        "stage": stage,
        "params": _params_slice(stage, params),
        "inputs": inputs,
        "code": code,
        "strategies": strategy_lock(stage, params, registry),
        # The deploy stage measures a new bundle with the evaluate stage's metrics.
        **({"metrics": strategy_lock("evaluate", params, registry)} if stage == "deploy" else {}),
        "unbottle": package_version("unbottle"),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def is_current(out_dir: Path, expected: str, metrics_file: Path) -> bool:
    """True when ``out_dir`` was made for ``expected`` and is intact."""
    from unbottle.core.store.artifacts import read_manifest, verify_artifact

    if not (out_dir / MANIFEST).is_file() or not metrics_file.is_file():
        return False
    try:  # a damaged manifest of the stage's own output: stale, the stage rebuilds it
        if read_manifest(out_dir).get("fingerprint") != expected:
            return False
        manifest = verify_artifact(out_dir)
        metrics_bytes = metrics_file.read_bytes()
        metrics = json.loads(metrics_bytes.decode("utf-8"))
    except (DataError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    # The metrics file must be the one written with this artifact (older artifacts have
    # no record of it).
    recorded = manifest.get(METRICS_STAMP)
    if recorded is not None and recorded != hashlib.sha256(metrics_bytes).hexdigest():
        return False
    return isinstance(metrics, dict)


#: The manifest key that holds the sha256 of the metrics file written with the artifact.
METRICS_STAMP = "metrics_file_sha256"


def metrics_stamp(metrics_text: str) -> dict[str, str]:
    """The manifest field that ties an artifact to the metrics file written with it."""
    return {METRICS_STAMP: hashlib.sha256(metrics_text.encode()).hexdigest()}


def record(out_dir: Path, value: str) -> None:
    """Stamp a finished artifact's manifest with the fingerprint it was made for."""
    from unbottle.core.store.artifacts import read_manifest

    manifest = read_manifest(out_dir)
    manifest["fingerprint"] = value
    write_json_atomic(out_dir / MANIFEST, manifest)
