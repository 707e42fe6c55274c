"""Strategy resolution: every strategy params names, checked against the installed plugins.

Run after :func:`unbottle.core.config.loading.load_params`, once the plugins are loaded:
an unknown name or invalid options fail here, before any heavy work, in one line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import ValidationError

from unbottle.core.config.evaluation_plan import check_evaluation_plan
from unbottle.core.config.schema import Params
from unbottle.core.config.validation_errors import one_line
from unbottle.core.contract.errors import ConfigError, UnknownStrategyError
from unbottle.core.contract.kinds import KINDS

StrategyPlace = tuple[str, str, str, dict[str, Any]]  # (key path, kind, name, options)


def strategy_refs(params: Params) -> Iterator[StrategyPlace]:
    """Every strategy params name: (key path, kind, name, options).

    The places come from the table of kinds (``Kind.params`` and ``Kind.step``), in
    params.yaml's order: stage by stage, a stage's ``train`` section before its own keys,
    and a compress recipe's steps in order.
    """
    for stage in ("pretrain", "finetune", "compress", "evaluate", "deploy"):
        places = sorted(
            (path, kind.name)
            for kind in KINDS.values()
            for path in kind.params
            if path.startswith(f"{stage}.")
        )
        # Deeper keys (a stage's train section) first; then by name.
        for path, kind in sorted(places, key=lambda p: -p[0].count(".")):
            yield from _refs_at(params, path, kind)
        continued = params.pretrain.continued
        if stage == "pretrain" and continued is not None and continued.reference_text:
            # What it measures the reference text with: its code decides the stage's metrics.
            where = "pretrain.continued.reference_text"
            yield where, "metric", "perplexity", {"max_tokens": continued.reference_tokens}
        if stage == "compress":
            for variant, steps in params.compress.variants.items():
                for i, step in enumerate(steps):
                    where = f"compress.variants.{variant}[{i}]"
                    yield where, step.kind, step.strategy, step.options


def _refs_at(params: Params, path: str, kind: str) -> Iterator[StrategyPlace]:
    """The strategy (or, for a path ending in ``[]``, the list of them) at ``path``."""
    node: Any = params
    for part in path.removesuffix("[]").split("."):
        node = getattr(node, part)
        if node is None:  # an optional section left out (pretrain.continued)
            return
    if path.endswith("[]"):
        base = path.removesuffix("[]")
        for i, ref in enumerate(node):
            yield f"{base}[{i}]", kind, ref.name, ref.options
    elif node is not None:
        yield path, kind, node.name, node.options


def check_strategies(params: Params, registry: Any) -> None:
    """Fail fast if a named strategy is not installed or its options are invalid."""
    for where, kind, name, options in strategy_refs(params):
        try:
            info = registry.get(kind, name)
        except UnknownStrategyError as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            info.cls.Config(**options)
        except ValidationError as e:
            raise ConfigError(one_line(e, info.cls.Config, prefix=where)) from None
    check_objective(params, registry)
    check_evaluation_plan(params, registry)


def check_objective(params: Params, registry: Any) -> None:
    """The pretraining objective fits the model params describe (or the source)."""
    cfg = params.pretrain
    objective = registry.get("objective", cfg.objective.name).cls
    if cfg.source is not None:
        if objective.model_kind != "causal":
            raise ConfigError(
                f"pretrain.objective: {cfg.objective.name} trains an {objective.model_kind} "
                "from scratch, but pretrain.source is set (a pretrained causal LM, which "
                "pretrain.continued trains further on a causal objective); remove "
                "pretrain.source or use a causal objective such as clm"
            )
        return
    architecture = cfg.model.architecture
    if architecture is not None and architecture not in objective.architectures:
        raise ConfigError(
            f"pretrain.model.architecture: {architecture!r} does not fit pretrain.objective "
            f"{cfg.objective.name} (it trains {objective.model_kind} models); use "
            f"{' or '.join(objective.architectures)}, or leave architecture unset"
        )


#: The stages that take the pretrained model as a causal LM.
CAUSAL_STAGES = ("finetune", "compress", "evaluate", "deploy")


def check_stages_fit(params: Params, registry: Any, stages: Sequence[str]) -> None:
    """Refuse, before any work, a stage that cannot take what pretraining makes: the
    stages after pretrain work on causal LMs, so an encoder objective stops there."""
    cfg = params.pretrain
    if cfg.source is not None:
        return
    objective = registry.get("objective", cfg.objective.name).cls
    if objective.model_kind == "causal":
        return
    for stage in stages:
        if stage in CAUSAL_STAGES:
            raise ConfigError(
                f"{stage}: works on causal LMs, and pretrain.objective {cfg.objective.name} "
                f"trains an {objective.model_kind}; run `unbottle stage pretrain` alone "
                "(it reports the encoder's held-out figures) or use pretrain.objective clm"
            )
