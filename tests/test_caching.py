"""Per-variant and per-model caches: a changed variant is the only thing redone.

One tiny workspace is built once (pretrain, finetune, two magnitude variants, evaluate);
each test works on its own copy of it, cache included.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, make_workspace

PARAMS = copy.deepcopy(TINY_PARAMS)
PARAMS["compress"]["variants"] = {
    "m50": [{"prune": "magnitude", "sparsity": 0.5}],
    "m30": [{"prune": "magnitude", "sparsity": 0.3}],
}
PARAMS["evaluate"]["metrics"] = [
    {"name": "perplexity", "window": 32, "max_tokens": 128},
    "size",
    {"name": "speed", "prompt_tokens": 8, "new_tokens": 4, "repeats": 1, "batch_size": 2},
]
PARAMS["evaluate"]["max_questions"] = 4


def run(root: Path, params: dict, *stages: str, force: bool = False) -> dict:
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    validated = Params.model_validate(params)
    return {s: run_stage(s, validated, Layout(root), force=force) for s in stages}


def hashes(folder: Path) -> dict[str, str]:
    from unbottle.core.store.artifacts import file_hashes

    return file_hashes(folder, exclude=())


def timing(root: Path, stage: str) -> dict:
    return json.loads((root / "metrics" / f"{stage}_timing.json").read_text())


def quality(evaluation: Path) -> dict:
    """evaluation.json without what measures the machine rather than the model."""
    from unbottle.core.stages.layout import split_timings

    data = json.loads((evaluation / "evaluation.json").read_text())
    rows = {name: split_timings(row)[0] for name, row in data["variants"].items()}
    return {"rows": rows, "order": data["order"], "samples": data["samples"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, pipeline_run) -> Path:
    """Compressed and evaluated, from the shared pipeline's pretrained and finetuned models
    (same params, so those two stages are current and skipped)."""
    root = make_workspace(tmp_path_factory.mktemp("caching"), tiny_data, PARAMS)
    shared = pipeline_run["layout"].root
    for stage in ("pretrain", "finetune"):
        shutil.copytree(shared / "artifacts" / stage, root / "artifacts" / stage)
        for produced in (shared / "metrics").glob(f"{stage}*"):
            (root / "metrics").mkdir(exist_ok=True)
            shutil.copy2(produced, root / "metrics" / produced.name)
    results = run(root, PARAMS, "pretrain", "finetune", "compress", "evaluate")
    assert results["pretrain"].skipped and results["finetune"].skipped
    return root


@pytest.fixture
def ws(built: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(built, root)
    return root


def with_option(path: str, value) -> dict:
    """PARAMS with one option changed: ``path`` like ``compress.variants.m30.0.sparsity``."""
    params = copy.deepcopy(PARAMS)
    *parents, last = path.split(".")
    node = params
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return params


def test_changing_one_variant_recomputes_only_that_variant(ws, caplog):
    compress = ws / "artifacts" / "compress"
    before = {name: hashes(compress / name) for name in ("m50", "m30")}
    assert timing(ws, "compress")["m50"]["reused"] is False  # the first run built both

    params = with_option("compress.variants.m30.0.sparsity", 0.4)
    with caplog.at_level(logging.INFO, logger="unbottle"):
        run(ws, params, "compress")
    assert timing(ws, "compress")["m50"]["reused"] is True
    assert timing(ws, "compress")["m30"]["reused"] is False
    assert any("compress m50: unchanged" in r.getMessage() for r in caplog.records)
    assert any("compress m30: step 1/1" in r.getMessage() for r in caplog.records)
    assert not any("compress m50: step" in r.getMessage() for r in caplog.records)
    # The untouched variant is the same bytes, manifest included; the changed one is not.
    assert hashes(compress / "m50") == before["m50"]
    assert hashes(compress / "m30") != before["m30"]
    # Its reported quality is the one its first run reported.
    metrics = json.loads((ws / "metrics" / "compress.json").read_text())
    assert metrics["m50"]["prune_sparsity"] == pytest.approx(0.5, abs=0.1)
    assert metrics["m30"]["prune_sparsity"] == pytest.approx(0.4, abs=0.1)

    # Evaluate then measures the changed variant alone, and writes what a fresh run would.
    old_speed = json.loads((ws / "artifacts" / "evaluate" / "evaluation.json").read_text())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unbottle"):
        run(ws, params, "evaluate")
    assert timing(ws, "evaluate")["reused"] == ["pretrained", "finetuned", "m50"]
    # measure_variant logs "evaluate NAME: METRIC" before each metric it measures.
    measured = {
        m.split(":")[0].removeprefix("evaluate ")
        for m in (r.getMessage() for r in caplog.records)
        if m.startswith("evaluate ") and m.endswith((": perplexity", ": size", ": speed"))
    }
    assert measured == {"m30"}
    rows = json.loads((ws / "artifacts" / "evaluate" / "evaluation.json").read_text())
    # A reused row keeps its timings exactly as they were measured.
    assert rows["variants"]["m50"]["ttft_s"] == old_speed["variants"]["m50"]["ttft_s"]

    fresh = ws / "fresh"
    from unbottle.core.config.schema import Params
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.evaluate import evaluate

    validated = Params.model_validate(params)
    evaluate(
        validated.evaluate,
        pretrained=ws / "artifacts" / "pretrain",
        baseline=ws / "artifacts" / "finetune",
        variants_dir=compress,
        valid_text=ws / params["data"]["valid_text"],
        qa_test=ws / params["data"]["qa_test"],
        out_dir=fresh,
        seed=0,
        registry=get_registry(),
    )
    assert quality(ws / "artifacts" / "evaluate") == quality(fresh)


def test_a_changed_metric_option_measures_every_model_again(ws):
    run(ws, with_option("evaluate.metrics.0.window", 16), "evaluate")
    assert timing(ws, "evaluate")["reused"] == []
    rows = json.loads((ws / "metrics" / "evaluate.json").read_text())["variants"]
    assert rows["m50"]["perplexity_tokens"] == 128  # the budget, whatever the text's length
    # Back to the first option: every row is the cached one again.
    run(ws, PARAMS, "evaluate")
    assert timing(ws, "evaluate")["reused"] == ["pretrained", "finetuned", "m50", "m30"]


def test_a_damaged_cache_entry_is_not_reused(ws, caplog):
    from unbottle.core.store.cache import cache_root

    cache = cache_root(ws)
    weights = hashes(ws / "artifacts" / "compress" / "m50")
    # Damage every variant entry's weights (written anew: a write in place would damage
    # the artifact's hard-linked copy too) and one evaluation row.
    for entry in (cache / "variants").iterdir():
        target = entry / "model.safetensors"
        data = target.read_bytes()
        target.unlink()
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    row = sorted((cache / "evaluations").iterdir())[0]
    record = json.loads(row.read_text())
    first = next(iter(record["row"]))
    record["row"][first] = "damaged"
    row.write_text(json.dumps(record))

    with caplog.at_level(logging.INFO, logger="unbottle"):
        run(ws, PARAMS, "compress", force=True)
        run(ws, PARAMS, "evaluate", force=True)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("variant entry" in m and "damaged" in m for m in messages) == 2
    assert timing(ws, "compress")["m50"]["reused"] is False
    assert timing(ws, "compress")["m30"]["reused"] is False
    # Rebuilt from scratch, the variant is the same bytes as at first.
    assert hashes(ws / "artifacts" / "compress" / "m50") == weights
    assert sum("evaluation row" in m and "damaged" in m for m in messages) == 1
    assert len(timing(ws, "evaluate")["reused"]) == 3
    rows = json.loads((ws / "artifacts" / "evaluate" / "evaluation.json").read_text())
    assert "damaged" not in json.dumps(rows["variants"])


class SleepyRunner:
    """A runner whose every decoding step takes 5 ms; it counts the requests it serves."""

    format = "hf"
    context = 64

    def __init__(self) -> None:
        self.requests: list[int] = []

    def generate(self, prompt, mask, new_tokens, *, streamer=None, **_):
        import time

        self.requests.append(new_tokens)
        streamer.put(prompt)
        for _ in range(new_tokens):
            time.sleep(0.005)
            streamer.put(prompt[:, :1])
        return prompt


@pytest.fixture(scope="module")
def ctx(tiny_data):
    from unbottle import EvalContext
    from unbottle.core.models.loading import documents, read_text, train_tokenizer

    tokenizer = train_tokenizer(documents(read_text(tiny_data / "corpus" / "train.txt", "t")), 320)
    return EvalContext(
        tokenizer=tokenizer,
        valid_text=(tiny_data / "corpus" / "valid.txt").read_text(),
        questions=[],
        model_dir=Path("."),
    )


def test_speed_is_timed_for_its_budget_not_a_fixed_count(ctx):
    from unbottle.plugins.metrics import Speed

    runner = SleepyRunner()
    config = Speed.Config(prompt_tokens=8, new_tokens=4, repeats=1000, batch_size=2, budget_s=0.2)
    Speed(config).measure(runner, ctx)
    timed = [n for n in runner.requests if n == 4]
    # Each request takes at least 20 ms: half a 0.2 s budget holds at most 5 per batch size.
    assert 2 <= len(timed) <= 12
    assert runner.requests.count(2) == 2  # one short warm-up per batch size


def test_speed_reports_the_spread_of_its_requests_and_how_many_there_were(ctx):
    """The median decode speed comes with the slowest and fastest request and their
    count: a reader (and the report's frontier) can tell a difference from noise."""
    from unbottle.plugins.metrics import Speed

    class Uneven(SleepyRunner):
        """Each timed request's steps take 4, 12 or 6 ms, in turn."""

        step_s = (0.004, 0.012, 0.006)

        def generate(self, prompt, mask, new_tokens, *, streamer=None, **_):
            import time

            pause = self.step_s[sum(n == new_tokens for n in self.requests) % 3]
            self.requests.append(new_tokens)
            streamer.put(prompt)
            for _ in range(new_tokens):
                time.sleep(pause)
                streamer.put(prompt[:, :1])
            return prompt

    config = Speed.Config(prompt_tokens=8, new_tokens=6, repeats=3, batch_size=2, budget_s=60)
    figures = Speed(config).measure(Uneven(), ctx)
    assert figures["speed_requests"] == 3
    low, median, high = (
        figures["decode_tokens_per_s_low"],
        figures["decode_tokens_per_s"],
        figures["decode_tokens_per_s_high"],
    )
    assert low < median < high
    assert low < 1 / 0.012 * 1.01 and high > 1 / 0.004 * 0.6  # the 12 ms and the 4 ms ones


def test_a_perplexity_budget_below_one_window_is_one_line(ctx):
    from unbottle import DataError
    from unbottle.plugins.metrics import Perplexity

    metric = Perplexity(Perplexity.Config(window=32, max_tokens=16))
    with pytest.raises(DataError, match=r"^perplexity.max_tokens: 16 is smaller than the window"):
        metric.measure(SleepyRunner(), ctx)
