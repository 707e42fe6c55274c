"""Helpers of the serving tests: one tiny finetuned model per session, a live server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_PARAMS, make_workspace
from unbottle.core.config.schema import Params
from unbottle.core.stages.layout import Layout
from unbottle.core.stages.runner import run_stage

_FINETUNED: dict[Path, Path] = {}


def finetuned_model(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """The tiny finetuned model, trained once per test session by the real stages."""
    key = tmp_path_factory.getbasetemp()
    if key not in _FINETUNED:
        root = make_workspace(tmp_path_factory.mktemp("serving"), tiny_data, TINY_PARAMS)
        params, layout = Params.model_validate(TINY_PARAMS), Layout(root)
        for stage in ("pretrain", "finetune"):
            run_stage(stage, params, layout)
        _FINETUNED[key] = layout.artifact("finetune")
    return _FINETUNED[key]


def variant_through_evaluate(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_data: Path,
    name: str,
    step: dict[str, Any],
) -> tuple[Params, Layout]:
    """A workspace whose one compress variant ``name`` (one ``step``) is compressed and
    evaluated (perplexity and size) from the session's tiny finetuned model, with the
    ``onnx`` deploy target set to ship it; deploy is left to the caller."""
    import copy
    import shutil

    params = copy.deepcopy(TINY_PARAMS)
    params["compress"]["variants"] = {name: [step]}
    params["evaluate"]["metrics"] = [{"name": "perplexity", "window": 64}, "size"]
    params["deploy"] = {"target": "onnx", "policy": "explicit", "variant": name}
    root = make_workspace(tmp_path, tiny_data, params)
    layout, validated = Layout(root), Params.model_validate(params)
    trained = finetuned_model(tmp_path_factory, tiny_data).parent
    for stage in ("pretrain", "finetune"):
        shutil.copytree(trained / stage, layout.artifact(stage))
    for stage in ("compress", "evaluate"):
        run_stage(stage, validated, layout)
    return validated, layout


def deploy_target(name: str, options: dict[str, Any], model_dir: Path, out_dir: Path) -> dict:
    """Run a deploy target on a variant, as the deploy stage does (without its evaluation)."""
    from unbottle.core.contract.strategies import DeployContext
    from unbottle.core.models.runtimes import model_format
    from unbottle.core.registry import get_registry
    from unbottle.core.store.artifacts import read_manifest

    target = get_registry().create("deploy_target", name, options)
    ctx = DeployContext(
        variant="finetuned",
        model_format=model_format(model_dir),
        metrics={},
        report_markdown="| variant |\n|---|\n| finetuned |",
        manifest=read_manifest(model_dir),
    )
    out_dir.mkdir(parents=True)
    return target.deploy(model_dir, out_dir, ctx)


def assert_prefill_from_a_past_matches(
    backend: Any, ids: list[int], kept: int, atol: float
) -> None:
    """``backend.prefill(ids, past)`` with ``past`` the cache of ``ids[:kept]`` gives the
    logits and cache of ``ids`` computed whole, within ``atol`` (the prompt cache's path):
    the rest is computed at its own positions, after the past's columns."""

    whole_logits, whole = backend.prefill(ids)
    _, head = backend.prefill(ids[:kept])
    logits, cache = backend.prefill(ids, head)
    assert backend.prompt_tokens_cached == kept
    assert (logits - whole_logits).abs().max() < atol
    assert [t.shape for layer in cache for t in layer] == [
        t.shape for layer in whole for t in layer
    ]
    for got, want in zip(cache, whole, strict=True):
        for a, b in zip(got, want, strict=True):
            assert (a - b).abs().max() < atol


def assert_every_position_scored(backend: Any, ids: list[int], kept: int, atol: float) -> None:
    """``backend.prefill(ids, all_logits=True)`` (a prompt's logprobs) gives each position's
    logits: row i is what ``prefill(ids[: i + 1])`` gives for its last position; from a
    past of ``kept`` tokens, the rows of the rest alone. A runtime that keeps its own cache
    computes the whole prompt again, though its cells hold it."""

    def release(handle: Any) -> None:
        if backend.owns_cache:
            backend.release(handle)

    _, held = backend.prefill(ids)
    release(held)
    every, cache = backend.prefill(ids, all_logits=True)
    release(cache)
    assert backend.prompt_tokens_cached == 0 and every.shape[0] == len(ids)
    for i in range(len(ids)):
        last, cache = backend.prefill(ids[: i + 1])
        release(cache)
        assert (every[i] - last).abs().max() < atol, i
    _, head = backend.prefill(ids[:kept])
    rest, cache = backend.prefill(ids, head, all_logits=True)
    release(cache)
    assert backend.prompt_tokens_cached == kept and rest.shape[0] == len(ids) - kept
    assert (rest - every[kept:]).abs().max() < atol


def assert_verify_matches_decode(
    backend: Any, ids: list[int], tokens: list[int], atol: float
) -> None:
    """``backend.verify(tokens, ...)`` after the prompt ``ids`` (speculative decoding's
    check of a lone row) gives, row by row, the logits that decoding ``tokens`` one step
    at a time gives, and leaves the cache those steps leave. A runtime that keeps its own
    cache is then cut back to the prompt (``truncate``) and decodes as if nothing had been
    checked."""
    import torch

    from unbottle.core.serving.engine import _Batch

    n = len(ids)
    if backend.owns_cache:
        _, seq = backend.prefill(ids)
        try:
            one = torch.tensor([1])
            stepped = [
                backend.decode(torch.tensor([t]), torch.tensor([n + i]), one, [seq], 0)[0]
                for i, t in enumerate(tokens)
            ]
            backend.truncate(seq, n)
            checked = backend.verify(tokens, n, seq, 0)
            assert (checked - torch.stack(stepped)).abs().max() < atol
            backend.truncate(seq, n + 1)  # the first token's cell stays, the rest go
            again = backend.decode(torch.tensor([tokens[1]]), torch.tensor([n + 1]), one, [seq], 0)
            assert (again[0] - stepped[1]).abs().max() < atol
        finally:
            backend.release(seq)
        return

    _, cache = backend.prefill(ids)

    def alone() -> _Batch:
        batch = _Batch(backend.right_padded)
        batch.add(object(), cache, backend.context)
        batch.make_room(backend.context, len(tokens))
        return batch

    stepwise, stepped = alone(), []
    for i, token in enumerate(tokens):
        mask = stepwise.next_mask()
        logits = backend.decode(
            torch.tensor([token]), torch.tensor([n + i]), mask, stepwise.buffers, stepwise.width
        )
        stepped.append(logits[0])
        stepwise.mask, stepwise.width = mask, stepwise.width + 1
    checked_batch = alone()
    checked = backend.verify(tokens, n, checked_batch.buffers, n)
    assert checked.shape == (len(tokens), stepped[0].shape[0])
    assert (checked - torch.stack(stepped)).abs().max() < atol
    end = n + len(tokens)
    for got, want in zip(checked_batch.buffers, stepwise.buffers, strict=True):
        for a, b in zip(got, want, strict=True):
            assert (a[:, :, :end] - b[:, :, :end]).abs().max() < atol


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(
    bundle: Path, overrides: dict[str, Any] | None = None, api_key: str | None = None
) -> Iterator[str]:
    """The real server (`unbottle serve`'s app, protocol and limits) on uvicorn, on a
    loopback port, in a thread; yields its base URL."""
    from unbottle.core.serving.engine import load_bundle
    from unbottle.core.serving.http import build_server

    server = build_server(load_bundle(bundle, overrides), api_key=api_key, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # loading the engine process is slow on a busy machine
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
