"""The `unbottle` command line.

Known errors (bad params, missing data, unknown or broken plugins) print one line and
exit with code 2; `--debug` shows the traceback instead. Heavy libraries are imported
inside the commands that need them, so `unbottle --help` and `unbottle plugins` answer fast.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="unbottle: pretrain -> finetune -> compress -> evaluate -> deploy, reproducibly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Write input data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
cache_app = typer.Typer(
    help="What the workspace cache (.cache/unbottle/) and the checkpoints runs left "
    "(artifacts/.checkpoints/) hold, and pruning them.",
    invoke_without_command=True,
)
app.add_typer(cache_app, name="cache")

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
    # The temporary server's first start runs database migrations: on a busy 2-core machine
    # that can take longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Prefect's server sends anonymous usage data by default; offline it logs an ERROR
    # every ten minutes. A pipeline run phones home only if the user says so.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Nothing reaches the Hugging Face Hub unless the user says so (HF_HUB_OFFLINE=0):
    # a `pretrain.source.hub` model is then read from the local cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _logging() -> None:
    import sys

    from rich.logging import RichHandler

    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=True)
    else:
        # Into a file or a pipe: whole lines, never wrapped at rich's default 80 columns
        # (which mangled tables in CI logs). On stdout, as rich's handler logs: stderr
        # carries the one-line errors.
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
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
    from unbottle.core.config.loading import load_params

    return load_params(_params_path(params), overrides or [])


def _prepare_flow(
    params: Path | None, overrides: list[str] | None, stages: tuple[str, ...]
) -> tuple[Path, Path | None]:
    """Validate params, every strategy they name and the data of ``stages`` before
    Prefect starts; return the workspace root and the params file the flow will read."""
    root = Path.cwd().resolve()
    _environment(root)
    _logging()
    from unbottle.core.stages.preflight import preflight
    from unbottle.core.stages.runner import setup, workspace

    loaded = _load(params, overrides)
    registry = setup(loaded)
    # Data, params and shapes of every stage checked here, so a bad input is one line
    # before Prefect starts; the flow's stages make their upstream artifacts themselves.
    layout = workspace(root)
    for name in stages:
        preflight(name, loaded, layout, registry, planned=True)
    return root, _params_path(params)


ForceOption = Annotated[
    bool, typer.Option("--force", help="Run even when the output is current for its inputs.")
]


@app.command()
def run(
    params: ParamsOption = None,
    overrides: SetOption = None,
    push: Annotated[
        bool, typer.Option("--push", help="dvc push data and artifacts after the run.")
    ] = False,
) -> None:
    """Run the whole pipeline as one Prefect flow."""
    from unbottle.core.stages.layout import STAGES

    root, path = _prepare_flow(params, overrides, STAGES)
    from unbottle.flows.pipeline import pipeline

    if push:  # a missing remote fails now, not after training
        from unbottle.core.contract.errors import UnbottleError
        from unbottle.flows.pipeline import check_default_remote, is_dvc_project

        if not is_dvc_project(root):
            raise UnbottleError("--push: no DVC project here (dvc.yaml and .dvc/ are needed)")
        check_default_remote(root)
    summary = pipeline(
        params_file=str(path) if path else None,
        overrides=list(overrides or []),
        root=str(root),
        push=push,
    )
    typer.echo(f"deployed model: {summary['deployed']}")
    typer.echo(f"evaluation report: {summary['report']}")


@app.command()
def sweep(
    params: ParamsOption = None,
    overrides: SetOption = None,
    runner: Annotated[
        str, typer.Option(help="Where tasks run: thread (here, one at a time), dask or ray.")
    ] = "thread",
    address: Annotated[
        str | None,
        typer.Option(help="The dask or ray cluster to use (default: start a local one)."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Workers of a local dask or ray cluster.")] = 2,
) -> None:
    """Compress and evaluate every variant, sweeps included, into one report.

    Each variant of compress.variants and each point of the grids of compress.sweep is a
    mapped Prefect task; nothing is deployed.

    Example: unbottle sweep -S 'compress.sweep.mag=[{prune: magnitude, sparsity: {grid:
    [0.3, 0.5, 0.7]}}]' --runner dask --workers 2
    """
    # Sets PREFECT_HOME: before prefect loads. The sweep deploys nothing.
    root, path = _prepare_flow(params, overrides, ("pretrain", "finetune", "compress", "evaluate"))
    from unbottle.flows.sweep import sweep as sweep_flow
    from unbottle.flows.sweep import task_runner

    chosen_runner = task_runner(runner, address=address, workers=workers)

    summary = sweep_flow.with_options(task_runner=chosen_runner)(
        params_file=str(path) if path else None, overrides=list(overrides or []), root=str(root)
    )
    typer.echo(f"swept {len(summary['variants'])} variants: {', '.join(summary['variants'])}")
    typer.echo(f"sweep report: {summary['report']}")
    chosen = summary["would_deploy"]
    typer.echo(f"deploy.policy would pick: {chosen or 'none (no variant passes deploy.gates)'}")


@app.command("schedule")
def schedule_command(
    cron: Annotated[str, typer.Option(help="When to run, as cron: '0 3 * * *'.")],
    name: Annotated[str, typer.Option(help="The deployment's name.")] = "scheduled",
    pool: Annotated[str, typer.Option(help="A process work pool (created if missing).")] = (
        "unbottle-process"
    ),
    params: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Deploy the pipeline flow to the Prefect server at PREFECT_API_URL with a schedule."""
    root = Path.cwd().resolve()
    _environment(root)
    _load(params, overrides)  # a broken params file fails here, not at 3 a.m.
    from unbottle.flows.schedule import schedule

    path = _params_path(params)
    full_name = schedule(
        cron=cron,
        name=name,
        pool=pool,
        root=root,
        params_file=str(path.resolve()) if path else None,
        overrides=list(overrides or []),
    )
    typer.echo(f"deployment {full_name} runs at '{cron}' on work pool {pool}")
    typer.echo(f"start a worker: prefect worker start --pool {pool}")
    typer.echo(f"run it now:     prefect deployment run '{full_name}'")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="pretrain, finetune, compress, evaluate or deploy.")],
    params: ParamsOption = None,
    overrides: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Run one stage (what dvc.yaml calls); skipped when its output is already current."""
    root = Path.cwd().resolve()
    _environment(root)
    _logging()
    from unbottle.core.stages.runner import run_stage, workspace

    result = run_stage(name, _load(params, overrides), workspace(root), force=force)
    done = "up to date" if result.skipped else "wrote"
    typer.echo(f"{name}: {done} {result.out_dir.relative_to(root)}")
    _record_in_dvc(root, name, own_params=params is None and not overrides)


def _record_in_dvc(root: Path, name: str, *, own_params: bool) -> None:
    """Record the stage in dvc.lock, as the flow does, so `dvc repro` right after has
    nothing to do: only for a run of what dvc.yaml runs (the workspace's params.yaml, no
    overrides), and not under `dvc repro`, which records the stage itself."""
    from unbottle.flows.dvc_lock import is_dvc_project, record_stages, under_dvc

    if own_params and is_dvc_project(root) and not under_dvc():
        record_stages(root, [name])
        typer.echo(f"{name}: recorded in dvc.lock")


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    params: ParamsOption = None,
    overrides: SetOption = None,
    lock: Annotated[
        bool,
        typer.Option(
            "--lock",
            help="Write locks/<stage>.json: the strategies each stage uses, their "
            "distributions, versions and code hashes (dvc.yaml's `plugins` stage).",
        ),
    ] = False,
    markdown: Annotated[
        bool,
        typer.Option(
            "--markdown",
            help="Print the reference of every hook and built-in strategy (docs/plugins.md).",
        ),
    ] = False,
) -> None:
    """List every installed strategy (and lifecycle hook): kind, name, distribution, version."""
    from unbottle.core.registry import get_registry

    if lock:
        from unbottle.core.stages.runner import setup, workspace
        from unbottle.core.store.fingerprint import write_plugin_locks

        root, loaded = Path.cwd().resolve(), _load(params, overrides)
        for path in write_plugin_locks(loaded, workspace(root), setup(loaded)):
            typer.echo(str(path.relative_to(root)))
        return
    if markdown:
        from unbottle.core.contract.reference import reference_markdown

        typer.echo(reference_markdown(get_registry()), nl=False)
        return
    registry = get_registry()
    rows = [
        {
            "kind": info.kind,
            "name": info.name,
            "plugin": info.plugin,
            "distribution": info.distribution,
            "version": info.version,
        }
        for info in registry.all()
    ]
    # Plugins that watch a run (tracking, notifications, commands) show as their hooks.
    rows += [
        {
            "kind": "hook",
            "name": hook,
            "plugin": plugin.name,
            "distribution": plugin.distribution,
            "version": plugin.version,
        }
        for hook, plugin in registry.lifecycle_hooks()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_strategies(rows)


def _print_strategies(rows: list[dict[str, str]]) -> None:
    """The strategies as a table grouped by kind. Names are what people copy into params,
    so no column wraps: the plugin column (the registering module, for plugin authors) is
    left out when the terminal is too narrow for it, and the line under the table says so."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    columns = ["kind", "name", "distribution", "version", "plugin"]
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    # Each column takes its text, a space either side and a border; one border closes it.
    if sum(widths[c] + 3 for c in columns) + 1 > console.width:
        columns.remove("plugin")
    table = Table(title="unbottle strategies")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for i, row in enumerate(rows):
        first = i == 0 or rows[i - 1]["kind"] != row["kind"]
        last = i == len(rows) - 1 or rows[i + 1]["kind"] != row["kind"]
        cells = [row[c] if c != "kind" or first else "" for c in columns]
        table.add_row(*cells, end_section=last)
    console.print(table)
    if "plugin" not in columns:
        console.print("(the plugin column needs a wider terminal; --json lists it)")


@app.command()
def show(
    artifact: Annotated[
        Path, typer.Argument(help="An artifact directory, e.g. artifacts/finetune.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print an artifact's provenance: stage, config, strategies, inputs, metrics, versions."""
    from unbottle.core.store.artifacts import read_manifest

    manifest = read_manifest(artifact)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    env = manifest.get("environment", {})
    git = env.get("git") or {}
    facts = Table(title=f"{artifact} ({manifest.get('stage', '?')})", show_header=False)
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    commit = git.get("commit") or "not a git checkout"
    facts.add_row("git commit", commit + (" (dirty)" if git.get("dirty") else ""))
    facts.add_row("dvc data", str(env.get("dvc_data")))
    facts.add_row("device", str(env.get("device")))
    if env.get("cpu_kernels"):
        facts.add_row("cpu kernels", env["cpu_kernels"])
    packages = env.get("packages", {})
    facts.add_row("packages", ", ".join(f"{k} {v}" for k, v in packages.items()))
    for role, info in manifest.get("strategies", {}).items():
        facts.add_row(
            f"strategy {role}", f"{info['name']} ({info['distribution']} {info['version']})"
        )
    for name, digest in manifest.get("inputs", {}).items():
        facts.add_row(f"input {name}", f"sha256:{digest[:16]}")
    facts.add_row("config", json.dumps(manifest.get("config"), sort_keys=True))
    facts.add_row("metrics", json.dumps(manifest.get("metrics"), sort_keys=True))
    timing = _timing_of(Path(artifact), manifest)
    for key, value in timing.items():
        if not isinstance(value, dict) and not key.startswith("step"):
            facts.add_row(f"time {key}", str(value))
    console = Console()
    console.print(facts)
    if manifest.get("steps"):  # a compress variant: its recipe as it ran
        steps = Table(title="steps")
        for column in ("step", "action", "strategy", "options", "metrics", "seconds"):
            steps.add_column(column, overflow="fold")
        for record in manifest["steps"]:
            strategy = record.get("strategy", {})
            steps.add_row(
                str(record.get("step")),
                str(record.get("action")),
                f"{strategy.get('name')} ({strategy.get('distribution')} "
                f"{strategy.get('version')})",
                json.dumps(record.get("options"), sort_keys=True),
                json.dumps(record.get("metrics"), sort_keys=True),
                str(timing.get(f"step{record.get('step')}_seconds", "-")),
            )
        console.print(steps)


def _timing_of(artifact: Path, manifest: dict) -> dict:
    """The run's times for an artifact, from its workspace's metrics/<stage>_timing.json
    (timings stay out of manifests, which must be reproducible): a stage's own, or one
    compress variant's."""
    from unbottle.core.stages.layout import Layout
    from unbottle.core.store.provenance import workspace_root

    stage = manifest.get("stage")
    if stage is None:
        return {}
    path = Layout(workspace_root(artifact)).timing_file(stage)
    try:
        timing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    variant = (manifest.get("config") or {}).get("variant")
    if variant is not None:
        timing = timing.get(variant, {})
    return timing if isinstance(timing, dict) else {}


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="A deployed bundle, e.g. artifacts/deploy.")],
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default 127.0.0.1: this machine only).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding the API key: every endpoint but /health then needs "
            "`Authorization: Bearer KEY`. UNBOTTLE_API_KEY works too."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="The API key itself (visible to other users in `ps`: prefer --api-key-file).",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth", help="Allow a host other than loopback without an API key."
        ),
    ] = False,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="An origin browsers may call the API from (repeatable; none by default)."
        ),
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Sequences decoded together (default 8).")
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Sequences that may wait; beyond, 429 (default 64).")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="The model id clients name (default unbottle-VARIANT).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Threads that run the model (default: every core for ONNX and llama.cpp, "
            "all but one for torch)."
        ),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            help="Tokens one sequence may hold, prompt and completion (default: the "
            "model's); llama.cpp allocates max-batch x context up front."
        ),
    ] = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            help="Prompt tokens computed between two decode steps; longer prompts go in "
            "parts (default 128; 0: whole prompts)."
        ),
    ] = None,
    prompt_cache: Annotated[
        bool | None,
        typer.Option(
            "--prompt-cache/--no-prompt-cache",
            show_default=False,
            help="Reuse the cache of an earlier prompt that started the same way, computing "
            "only the rest (default on).",
        ),
    ] = None,
    speculative_config: Annotated[
        str | None,
        typer.Option(
            help='Speculative decoding by prompt lookup, as JSON, e.g. \'{"method": "ngram", '
            "\"num_speculative_tokens\": 3}' (vLLM's names; default off). A sequence "
            "decoding alone then checks a guess of its next tokens in the same step.",
        ),
    ] = None,
) -> None:
    """Serve a bundle with an OpenAI-compatible API (completions, chat, streaming, metrics)."""
    _environment(Path.cwd().resolve())
    _logging()
    from unbottle.core.contract.errors import ConfigError
    from unbottle.core.serving.engine import load_bundle, read_serve_config
    from unbottle.core.serving.http import check_exposure
    from unbottle.core.serving.http import serve as run_server
    from unbottle.core.store.artifacts import path_kind

    if api_key and api_key_file:
        raise ConfigError("serve: give --api-key or --api-key-file, not both")
    if api_key:
        logging.getLogger("unbottle.server").warning(
            "--api-key puts the key on the command line, where other users see it (ps); "
            "use --api-key-file or UNBOTTLE_API_KEY"
        )
    key = api_key or _read_api_key(api_key_file) or os.environ.get("UNBOTTLE_API_KEY") or None
    overrides = {
        "host": host,
        "port": port,
        "max_batch": max_batch,
        "max_queue": max_queue,
        "model_name": model_name,
        "threads": threads,
        "context": context,
        "prompt_cache": prompt_cache,
        "prefill_chunk": prefill_chunk,
        "cors_origins": tuple(cors_origin) if cors_origin else None,
        "speculative": _json_option("--speculative-config", speculative_config),
    }
    if path_kind(bundle, "bundle") == "directory":  # refuse an exposed host before loading
        check_exposure(read_serve_config(bundle, overrides).host, key, insecure_no_auth)
    run_server(load_bundle(bundle, overrides), api_key=key, insecure_no_auth=insecure_no_auth)


def _json_option(option: str, text: str | None) -> dict[str, Any] | None:
    """An option given as a JSON object, or None when not given."""
    from unbottle.core.contract.errors import ConfigError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option}: not JSON ({e.msg}); give an object, e.g. '{{}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: give a JSON object, not {type(value).__name__}")
    return value


def _read_api_key(path: Path | None) -> str | None:
    from unbottle.core.contract.errors import ConfigError

    if path is None:
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"--api-key-file {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--api-key-file {path}: not UTF-8 text") from None
    if not key:
        raise ConfigError(f"--api-key-file {path}: the file is empty")
    return key


@data_app.command("demo")
def data_demo(
    params: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option(help="Where to write the demo data.")] = Path("data"),
) -> None:
    """Write the demo world: deterministic prose and question/answer pairs."""
    from unbottle.core.contract.errors import DataError, shorten_path
    from unbottle.core.data.demo import DemoDataConfig, write_demo_data

    demo = _load(params, overrides).data.demo
    try:
        hashes = write_demo_data(out, DemoDataConfig(**demo.model_dump()))
    except OSError as e:  # a name too long, a folder not writable, a full disk
        raise DataError(f"--out: {shorten_path(out)}: {e.strerror or e}") from None
    except DataError as e:  # a folder holding the user's own files
        raise DataError(f"--out: {e}") from None
    for rel, digest in hashes.items():
        typer.echo(f"{out / rel}  sha256:{digest[:12]}")


@data_app.command("general")
def data_general(
    out: Annotated[Path, typer.Option(help="The folder to write the texts into.")] = Path(
        "data/general"
    ),
) -> None:
    """Write general text from this Python (its documentation, some stdlib code) for replay.

    For continued pretraining's replay_text and reference_text: the language
    reference's topics whole and in two halves that share no paragraph (replay one,
    measure on the other), and some standard-library modules' code.
    """
    from unbottle.core.contract.errors import DataError, shorten_path
    from unbottle.core.data.general import write_general_texts

    try:
        hashes = write_general_texts(out)
    except OSError as e:  # a name too long, a folder not writable, a full disk
        raise DataError(f"--out: {shorten_path(out)}: {e.strerror or e}") from None
    for name, digest in hashes.items():
        typer.echo(f"{out / name}  sha256:{digest[:12]}")


SharedOption = Annotated[
    bool,
    typer.Option(
        "--shared",
        help="The cache every workspace shares ($UNBOTTLE_CACHE_DIR, default "
        "~/.cache/unbottle): GGUF sources converted to float.",
    ),
]


def _which_cache(shared: bool) -> tuple[Path, tuple[str, ...], Path | None]:
    """The cache, its kinds of entry, and the training checkpoints listed and pruned with
    it: the workspace's (in the default checkpoint_dir), none for the shared cache."""
    from unbottle.core.models.sources import cache_root as shared_root
    from unbottle.core.stages.layout import Layout
    from unbottle.core.store.cache import cache_root
    from unbottle.core.store.cache_pruning import KINDS, SHARED_KINDS

    if shared:
        return shared_root(), SHARED_KINDS, None
    return cache_root(Path.cwd()), KINDS, Layout(Path(".")).checkpoints


def _checkpoint_dirs(params: Path | None, overrides: list[str] | None) -> dict[Path, str]:
    """The folders params name as a ``train.checkpoint_dir``, each with the sections that
    name it."""
    loaded = _load(params, overrides)
    sections = {
        "pretrain": loaded.pretrain.train,
        "pretrain.continued": loaded.pretrain.continued,
        "finetune": loaded.finetune.train,
    }
    named: dict[Path, list[str]] = {}
    for section, train in sections.items():
        if train is not None and train.checkpoint_dir is not None:
            named.setdefault(Path(train.checkpoint_dir), []).append(section)
    return {folder: "/".join(owners) for folder, owners in named.items()}


@cache_app.callback()
def cache_usage(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Every entry, as JSON.")] = False,
    shared: SharedOption = False,
    params: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Each kind of entry in the workspace cache, and the training checkpoints runs left
    (or with --shared, the cache every workspace shares): how many, their size, what
    removing them would free, and when they were last used. The runs in a
    train.checkpoint_dir that params name are listed too, and never pruned."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"shared": shared}  # `cache --shared prune` is `cache prune --shared`
        return
    from unbottle.core.store.cache_pruning import (
        CHECKPOINT_DIR,
        CHECKPOINTS,
        SHARED_KINDS,
        cache_entries,
        checkpoint_dir_entries,
    )

    cache, kinds, checkpoints = _which_cache(shared)
    entries = cache_entries(cache, kinds, checkpoints)
    named = {} if shared else _checkpoint_dirs(params, overrides)
    elsewhere_runs = {
        folder: checkpoint_dir_entries(folder, owner) for folder, owner in named.items()
    }
    entries += [run for runs in elsewhere_runs.values() for run in runs]
    if as_json:
        typer.echo(json.dumps([_entry_json(e) for e in entries], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cache}")
    for column in ("kind", "entries", "size", "frees", "last used", "oldest use"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    listed = kinds if checkpoints is None else (*kinds, CHECKPOINTS)
    for kind in (*listed, CHECKPOINT_DIR) if elsewhere_runs else listed:
        mine = [e for e in entries if e.kind == kind]
        if not mine:
            table.add_row(kind, "0", "-", "-", "-", "-")
            continue
        table.add_row(
            kind,
            str(len(mine)),
            _bytes(sum(e.size for e in mine)),
            _bytes(sum(e.frees for e in mine)),
            _ago(max(e.last_used for e in mine)),
            _ago(min(e.last_used for e in mine)),
        )
    Console().print(table)
    if shared:
        typer.echo(
            "A GGUF source's conversion is converted again by the next pretrain stage that "
            "needs it. `unbottle cache prune --shared --older-than 30d` or `--max-size "
            "20GB` prunes."
        )
        return
    typer.echo(
        "frees: what removing the entries gives back; the rest is hard-linked from "
        "artifacts. `unbottle cache prune --older-than 30d` or `--max-size 20GB` prunes."
    )
    if runs := [e for e in entries if e.kind == CHECKPOINTS]:
        from collections import Counter

        stages = Counter(e.paths[0].parent.name for e in runs)  # <stage>/<run key>
        by_stage = ", ".join(f"{stage} {n}" for stage, n in stages.items())
        typer.echo(
            f"checkpoints: runs of {by_stage} in {checkpoints}, stopped, refused or kept "
            "(clear_checkpoints: false); last used is their last write. A rerun of the "
            "same run resumes from its own; pruned, it trains from its start."
        )
    for folder, runs in elsewhere_runs.items():
        typer.echo(
            f"checkpoint_dir: {len(runs)} run{'s' * (len(runs) != 1)} of {named[folder]} in "
            f"{folder} (train.checkpoint_dir): listed, never pruned here, since another "
            "workspace or node may be writing there; remove a run's folder yourself when no "
            "stage uses it."
        )
    elsewhere, _, _ = _which_cache(shared=True)
    if conversions := cache_entries(elsewhere, SHARED_KINDS):
        count = f"{len(conversions)} GGUF conversion{'s' * (len(conversions) > 1)}"
        typer.echo(
            f"Outside the workspace, {elsewhere} holds {count} of "
            f"{_bytes(sum(e.size for e in conversions))}: `unbottle cache --shared`."
        )


@cache_app.command("prune")
def cache_prune(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(help="Remove entries unused for longer than this: 30d, 12h, 2w."),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            help="Then remove the least recently used until the cache's own bytes "
            "(checkpoints included) are at most this: 20GB, 500MiB (0 empties it)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")
    ] = False,
    shared: SharedOption = False,
) -> None:
    """Remove cache entries, and the training checkpoints runs left, by last use or total
    size.

    Refused while a stage or sweep of the workspace runs (with --shared: while a pretrain
    stage reads a conversion); every entry is only saved work, rebuilt when next needed
    (a run whose checkpoints are pruned trains from its start)."""
    from unbottle.core.store.cache_pruning import parse_age, parse_size, prune_cache

    cache, kinds, checkpoints = _which_cache(shared or (ctx.obj or {}).get("shared", False))
    removed = prune_cache(
        cache,
        older_than=None if older_than is None else parse_age(older_than),
        max_size=None if max_size is None else parse_size(max_size),
        dry_run=dry_run,
        kinds=kinds,
        checkpoints=checkpoints,
    )
    verb = "would remove" if dry_run else "removed"
    for entry in removed:
        typer.echo(
            f"{verb} {entry.what} {entry.key[:16]}  {_bytes(entry.size)}, "
            f"last used {_ago(entry.last_used)}"
        )
    entries = "entry" if len(removed) == 1 else "entries"
    freed = _bytes(sum(e.frees for e in removed))
    typer.echo(f"{verb} {len(removed)} {entries}, freeing {freed}")


def _entry_json(entry) -> dict:
    return {
        "kind": entry.kind,
        "what": entry.what,
        "key": entry.key,
        "paths": [str(p) for p in entry.paths],
        "bytes": entry.size,
        "frees": entry.frees,
        "last_used": entry.last_used,
    }


def _bytes(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError


def _ago(when: float) -> str:
    import time

    seconds = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


#: Commands that load no model for decoding: no reason to start them twice.
LIGHT_COMMANDS = frozenset({"plugins", "show", "schedule", "data", "cache"})


def decodes(argv: list[str]) -> bool:
    """Whether the command line ``argv`` (without the program) may load a model to decode:
    any command but :data:`LIGHT_COMMANDS` and help. A plugin's command may, so it counts."""
    if {"--help", "-h"} & set(argv):
        return False
    words = [a for a in argv if not a.startswith("-")]  # the one main option is a flag
    return bool(words) and words[0] not in LIGHT_COMMANDS


def console() -> None:
    """The ``unbottle`` command (and ``python -m unbottle``): :func:`main`, with weights on
    huge pages where the command may decode. They decode faster (core/huge_pages.py);
    glibc reads the switch only at start-up, so this runs the command again with it, once,
    before any work (0.2 s, which the commands in :data:`LIGHT_COMMANDS` skip)."""
    from unbottle.core.huge_pages import reexec_with_huge_pages

    if decodes(sys.argv[1:]):
        reexec_with_huge_pages()
    main()


def _reflow_help(group: typer.Typer) -> None:
    """Make each paragraph of every command's docstring one line, for the help to wrap.

    typer's rich help keeps a docstring's line breaks and the terminal then wraps the
    lines again, so a paragraph written at 88 columns printed ragged at 80, and a
    command list showed the summary's first line only up to its break. A command given
    ``help=`` keeps it as written."""
    for info in group.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _reflow_help(sub.typer_instance)


def main(argv: list[str] | None = None) -> None:
    """The command line's work; ``argv`` (default: the command line) lets tests call it
    in-process, where it never runs the process again."""
    from unbottle.core.contract.errors import UnbottleError

    # Known before typer parses the line: plugins load (and may fail) first.
    _state["debug"] = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        _plugin_commands()
        _reflow_help(app)  # the plugins' commands too
        app(args=argv)
    except Exception as e:
        if _state["debug"]:
            raise
        # ValueError "data.…": the demo data's own config checks.
        if isinstance(e, UnbottleError) or (isinstance(e, ValueError) and _is_user_value_error(e)):
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        if _report_plugin_failure(e):  # a plugin's code raised: name it
            sys.exit(2)
        raise  # everything else is a bug of unbottle's: its traceback


def _plugin_commands() -> None:
    """Let plugins add commands (hook ``register_commands``) before the line is parsed."""
    from unbottle.core.registry import get_registry

    get_registry().hook.register_commands(cli=app)


def _report_plugin_failure(error: BaseException) -> bool:
    """When a plugin's code raised ``error``, print one line naming the plugin and its
    distribution and return True; False when no plugin was running (a bug of unbottle's
    own keeps its traceback)."""
    from unbottle.core.registry import get_registry

    try:
        plugin = get_registry().plugin_at(error.__traceback__)
    except Exception:  # the registry itself failed: that error is the one to show
        return False
    if plugin is None:
        return False
    message = " ".join(str(error).split()) or "(no message)"
    typer.echo(
        f"error: {plugin.describe()} failed: {type(error).__name__}: {message} "
        "(--debug shows the traceback)",
        err=True,
    )
    return True


def _is_user_value_error(error: ValueError) -> bool:
    return str(error).startswith("data.")


if __name__ == "__main__":
    main()
