"""Publishing the evaluation in Prefect, and the deploy decision the flows check first."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from unbottle.core.config.schema import Params
from unbottle.core.stages.deploy import Decision


def publish_evaluation(evaluation_dir: Path, key: str = "unbottle-evaluation") -> None:
    """The report as a Markdown artifact ``key`` and its rows as the table ``key-table``.

    Prefect cannot show the report's PNGs, so their links become the files' paths.
    """
    from unbottle.core.stages.evaluate import REPORT, read_evaluation

    rows, _ = read_evaluation(evaluation_dir)
    report = (evaluation_dir / REPORT).read_text(encoding="utf-8")
    report = re.sub(
        r"!\[([^\]]*)\]\(([^)]+\.png)\)",
        lambda m: f"{m.group(1)}: `{(evaluation_dir / m.group(2)).resolve()}`",
        report,
    )
    create_markdown_artifact(key=key, markdown=report)
    create_table_artifact(
        key=f"{key}-table", table=[{"variant": name, **row} for name, row in rows.items()]
    )


def decide_deployment(params: Params, evaluation_dir: Path) -> Decision:
    """Apply deploy.gates and deploy.policy; publish the decision as ``unbottle-decision``.

    Raises :class:`GateError` (one line, each variant and the limit it broke) when no
    variant passes, so a flow stops before it deploys anything.
    """
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.deploy import decide

    decision = decide(params.deploy, evaluation_dir, get_registry())
    create_markdown_artifact(key="unbottle-decision", markdown=decision.markdown())
    get_run_logger().info("deploy decision: %s (policy %s)", decision.chosen, decision.policy)
    return decision
