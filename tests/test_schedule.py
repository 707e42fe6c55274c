"""Scheduling against a real Prefect server: a process work pool, a worker, a deployment
with a cron schedule, a triggered run that completes, and its artifacts read over the API."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, cli_env, run_cli
from unbottle.core.huge_pages import TUNABLE

PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on loopback with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = cli_env({"PREFECT_HOME": str(home), "PREFECT_API_URL": api})
    server = start(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        home / "server.log",
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            pytest.fail((home / "server.log").read_text())
        time.sleep(1)
    else:
        stop(server)
        pytest.fail("the Prefect server did not become healthy in 180 s")
    yield {"api": api, "env": env, "home": home}
    stop(server)


@pytest.mark.slow
def test_scheduled_deployment_runs_on_a_worker(prefect_server, workspace):
    api, env = prefect_server["api"], prefect_server["env"]
    pool = "unbottle-process"  # the pool prefect.yaml names too
    created = subprocess.run(
        [*PREFECT, "work-pool", "create", pool, "--type", "process"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr

    scheduled = run_cli(
        "schedule",
        "--cron",
        "0 3 * * *",
        "--name",
        "nightly",
        "--pool",
        pool,
        cwd=workspace,
        env={"PREFECT_API_URL": api, "PREFECT_HOME": str(prefect_server["home"])},
    )
    assert scheduled.returncode == 0, scheduled.stderr
    assert "unbottle-pipeline/nightly" in scheduled.stdout

    deployment = httpx.get(f"{api}/deployments/name/unbottle-pipeline/nightly", timeout=10).json()
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert deployment["work_pool_name"] == pool
    # The flow's process gets its weights on huge pages, as `unbottle run` does.
    assert deployment["job_variables"]["env"] == {"GLIBC_TUNABLES": TUNABLE}

    worker = start(
        [*PREFECT, "worker", "start", "--pool", pool], env, prefect_server["home"] / "worker.log"
    )
    try:
        run = subprocess.run(
            [
                *PREFECT,
                "deployment",
                "run",
                "unbottle-pipeline/nightly",
                "--watch",
                "--watch-timeout",
                "600",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=660,
        )
    finally:
        stop(worker)
    worker_log = (prefect_server["home"] / "worker.log").read_text()
    assert run.returncode == 0, run.stdout + run.stderr + worker_log
    assert "Completed" in run.stdout, run.stdout + worker_log

    assert (workspace / "artifacts" / "deploy" / "model.safetensors").is_file()
    # The repository's prefect.yaml registers the same kind of deployment.
    shutil.copy(REPO / "prefect.yaml", workspace / "prefect.yaml")
    shutil.copytree(REPO / "flows", workspace / "flows")
    deployed = subprocess.run(
        [*PREFECT, "--no-prompt", "deploy", "--all"],
        cwd=workspace,
        env={**env, "UNBOTTLE_PROJECT_DIR": str(workspace)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    nightly = httpx.get(f"{api}/deployments/name/unbottle-pipeline/nightly", timeout=10).json()
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline"
    assert nightly["job_variables"]["env"] == {"GLIBC_TUNABLES": TUNABLE}

    found = httpx.post(
        f"{api}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["unbottle-evaluation"]}}},
        timeout=10,
    ).json()
    assert found and "| finetuned |" in found[0]["data"]


def test_schedule_refuses_bad_cron_and_missing_server(workspace):
    bad_cron = run_cli("schedule", "--cron", "every night", cwd=workspace)
    assert bad_cron.returncode == 2
    assert bad_cron.stderr.strip() == (
        "error: --cron: 'every night' is not a cron expression; use five fields, "
        "e.g. '0 3 * * *' for 03:00 every day"
    )
    nowhere = f"http://127.0.0.1:{free_port()}/api"
    no_server = run_cli(
        "schedule", "--cron", "0 3 * * *", cwd=workspace, env={"PREFECT_API_URL": nowhere}
    )
    assert no_server.returncode == 2
    assert no_server.stderr.strip() == (
        f"error: PREFECT_API_URL={nowhere}: no Prefect server answers there; start one with "
        "`prefect server start` or fix the URL"
    )
