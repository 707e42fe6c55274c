"""The `unbottle` command line.

Known errors (bad params, missing data, unknown or broken plugins) print one line and
exit with code 2; `--debug` shows the traceback instead. Heavy libraries are imported
inside the commands that need them, so `unbottle --help` and `unbottle plugins` answer fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="unbottle: pretrain -> finetune -> compress -> evaluate -> deploy, reproducibly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Write input data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ParamsOption = Annotated[
    Path | None,
    typer.Option("--params", "-p", help="params.yaml to read (default: ./params.yaml if present)."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a param: -S compress.calibration.samples=8."),
]
_state = {"debug": False}


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    _state["debug"] = debug


def _environment(root: Path) -> None:
    """Defaults that keep a run inside the workspace and offline."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "unbottle")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _logging() -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, rich_tracebacks=True)
    logger = logging.getLogger("unbottle")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Some libraries (optimum's exporter) configure the root logger; don't print twice.
    logger.propagate = False


def _params_path(params: Path | None) -> Path | None:
    if params is not None:
        return params
    default = Path("params.yaml")
    return default if default.is_file() else None


def _load(params: Path | None, overrides: list[str] | None):
    from unbottle.core.config import load_params

    return load_params(_params_path(params), overrides or [])


@app.command()
def run(params: ParamsOption = None, overrides: SetOption = None) -> None:
    """Run the whole pipeline as one Prefect flow."""
    root = Path.cwd().resolve()
    _environment(root)
    _logging()
    params_obj = _load(params, overrides)  # fail fast, before Prefect starts

    from unbottle.core.pipeline import setup

    setup(params_obj)
    from unbottle.flows.pipeline import pipeline

    path = _params_path(params)
    summary = pipeline(
        params_file=str(path) if path else None,
        overrides=list(overrides or []),
        root=str(root),
    )
    typer.echo(f"deployed model: {summary['deployed']}")
    typer.echo(f"evaluation report: {summary['report']}")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="pretrain, finetune, compress, evaluate or deploy.")],
    params: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Run one stage (what dvc.yaml calls)."""
    root = Path.cwd().resolve()
    _environment(root)
    _logging()
    from unbottle.core.pipeline import run_stage, workspace

    result = run_stage(name, _load(params, overrides), workspace(root))
    typer.echo(f"{name}: wrote {result.out_dir.relative_to(root)}")


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    params: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """List every installed strategy: kind, name, distribution and version."""
    from unbottle.core.registry import get_registry

    rows = [
        {
            "kind": info.kind,
            "name": info.name,
            "plugin": info.plugin,
            "distribution": info.distribution,
            "version": info.version,
        }
        for info in get_registry().all()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="unbottle strategies")
    for column in ("kind", "name", "distribution", "version"):
        table.add_column(column, no_wrap=True)  # names are what people copy into params
    table.add_column("plugin", overflow="fold")
    for row in rows:
        table.add_row(row["kind"], row["name"], row["distribution"], row["version"], row["plugin"])
    Console().print(table)


@data_app.command("demo")
def data_demo(
    params: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option(help="Where to write the demo data.")] = Path("data"),
) -> None:
    """Write the demo world: deterministic prose and question/answer pairs."""
    from unbottle.core.data import DemoDataConfig, write_demo_data

    demo = _load(params, overrides).data.demo
    hashes = write_demo_data(out, DemoDataConfig(**demo.model_dump()))
    for rel, digest in hashes.items():
        typer.echo(f"{out / rel}  sha256:{digest[:12]}")


def main() -> None:
    from unbottle.core.errors import UnbottleError

    try:
        app()
    except (UnbottleError, ValueError) as e:
        # ValueError: the demo data's own config checks; everything else is a bug.
        if _state["debug"] or (isinstance(e, ValueError) and not _is_user_value_error(e)):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


def _is_user_value_error(error: ValueError) -> bool:
    return str(error).startswith("data.")


if __name__ == "__main__":
    main()
