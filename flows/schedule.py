"""Scheduling: a Prefect deployment of the pipeline flow on a server and a work pool.

The deployment names the flow by module path (``unbottle.flows.pipeline:pipeline``), so a
process worker with unbottle installed runs it without building an image or copying code.
"""

from __future__ import annotations

import os
from pathlib import Path

from unbottle.core.contract.errors import UnbottleError

DEFAULT_POOL = "unbottle-process"


class SchedulingError(UnbottleError):
    """The server, the schedule or the work pool is not usable."""


def check_cron(expression: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=expression)
    except ValueError:
        raise SchedulingError(
            f"--cron: {expression!r} is not a cron expression; use five fields, "
            "e.g. '0 3 * * *' for 03:00 every day"
        ) from None


def check_server() -> str:
    """The API URL of a live Prefect server, or a one-line error saying what to do."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SchedulingError(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError:
        raise SchedulingError(
            f"PREFECT_API_URL={url}: no Prefect server answers there; start one with "
            "`prefect server start` or fix the URL"
        ) from None
    return url


def ensure_process_pool(name: str) -> None:
    """Create a process work pool named ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return
        if pool.type != "process":
            raise SchedulingError(
                f"--pool: work pool {name!r} is of type {pool.type!r}; use a process pool"
            )


def schedule(
    *,
    cron: str,
    name: str,
    pool: str,
    root: Path,
    params_file: str | None,
    overrides: list[str],
) -> str:
    """Create (or update) the deployment; return its full name, FLOW/DEPLOYMENT."""
    check_cron(cron)
    check_server()
    ensure_process_pool(pool)
    from prefect.deployments.runner import EntrypointType

    from unbottle.core.huge_pages import SWITCH, TUNABLE
    from unbottle.flows.pipeline import pipeline

    # The worker starts the flow's process: this is how its weights get huge pages, as the
    # command line's do (core/huge_pages.py). On a machine without them it changes nothing.
    env = {} if os.environ.get(SWITCH) == "0" else {"GLIBC_TUNABLES": TUNABLE}
    pipeline.deploy(
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters={"params_file": params_file, "overrides": overrides, "root": str(root)},
        job_variables={"env": env},
        entrypoint_type=EntrypointType.MODULE_PATH,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return f"{pipeline.name}/{name}"
