"""Metric names, gates and the deploy policy: checked to name metrics that will exist."""

from __future__ import annotations

from typing import Any

from unbottle.core.config.schema import Params
from unbottle.core.contract.errors import ConfigError

#: Metrics the evaluate stage derives from others: name -> (source, which way is better).
DERIVED_METRICS: dict[str, tuple[str, str]] = {
    "perplexity_ratio": ("perplexity", "lower"),
    "answer_perplexity_ratio": ("answer_perplexity", "lower"),
    # The share of the finetuned model's accuracy a variant keeps ("recovery").
    "accuracy_ratio": ("accuracy", "higher"),
}
#: The metric each ranking policy orders by, and which way is better.
POLICY_METRICS: dict[str, tuple[str, str]] = {
    "smallest": ("size_bytes", "lower"),
    "fastest": ("decode_tokens_per_s", "higher"),
}


def metric_outputs(params: Params, registry: Any) -> tuple[dict[str, str | None], bool]:
    """The names the configured metrics produce, with which way is better, and whether
    that list is complete (a plugin metric without a ``produces`` listing makes it not)."""
    produced: dict[str, str | None] = {}
    complete = True
    for ref in params.evaluate.metrics:
        listing = getattr(registry.get("metric", ref.name).cls, "produces", None)
        if listing is None:
            complete = False
        elif isinstance(listing, dict):
            produced.update(listing)
        else:
            produced.update(dict.fromkeys(listing))
    for name, (source, better) in DERIVED_METRICS.items():
        if source in produced:
            produced[name] = better
    return produced, complete


def check_evaluation_plan(params: Params, registry: Any) -> None:
    """Metric prerequisites, gates and the deploy policy name metrics that will exist."""
    earlier: set[str] = set()
    earlier_known = True  # False once a metric without a `produces` listing came before
    for i, ref in enumerate(params.evaluate.metrics):
        cls = registry.get("metric", ref.name).cls
        for needed in getattr(cls, "requires", ()):
            if earlier_known and needed not in earlier:
                makers = [
                    n
                    for n in registry.names("metric")
                    if needed in (getattr(registry.get("metric", n).cls, "produces", None) or ())
                ]
                hint = f"; list {' or '.join(makers)} before it" if makers else ""
                raise ConfigError(
                    f"evaluate.metrics[{i}]: {ref.name} needs {needed!r} from a metric listed "
                    f"before it{hint}"
                )
        listing = getattr(cls, "produces", None)
        earlier_known = earlier_known and listing is not None
        earlier.update(listing or ())
    produced, complete = metric_outputs(params, registry)
    names = ", ".join(sorted(produced)) or "none"
    deploy = params.deploy
    for name in deploy.gates:
        if complete and name not in produced:
            raise ConfigError(
                f"deploy.gates.{name}: no metric in evaluate.metrics produces {name!r}; "
                f"gates can use: {names}"
            )
    if deploy.policy in POLICY_METRICS:
        name = POLICY_METRICS[deploy.policy][0]
        if complete and name not in produced:
            raise ConfigError(
                f"deploy.policy: {deploy.policy!r} ranks by {name}, which no metric in "
                "evaluate.metrics produces; add the metric that does"
            )
    if deploy.policy == "best":
        if complete and deploy.quality not in produced:
            raise ConfigError(
                f"deploy.quality: no metric in evaluate.metrics produces {deploy.quality!r}; "
                f"choose one of: {names}"
            )
        if deploy.quality in produced and produced[deploy.quality] is None:
            ranked = ", ".join(sorted(k for k, v in produced.items() if v))
            raise ConfigError(
                f"deploy.quality: {deploy.quality!r} is neither better low nor high; "
                f"choose one of: {ranked}"
            )
