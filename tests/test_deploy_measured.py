"""Issue #15 item 7: what ships is what was measured.

A deploy target that writes a new model (the ``onnx`` target's int8 export of a float
variant) has that model evaluated with the evaluate stage's metrics, in the runtime it
ships in; its row goes into the deploy metrics, the manifest and the model card, and the
gates apply to it. A target that ships the evaluated variant as it is reuses the evaluate
stage's row.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from unbottle.core.config.schema import Params
from unbottle.core.stages.layout import Layout
from unbottle.core.stages.runner import run_stage
from unbottle.core.store.artifacts import read_manifest, tree_hash


def card_library(bundle: Path) -> str | None:
    header = (bundle / "README.md").read_text().split("---")[1]
    lines = [line for line in header.splitlines() if line.startswith("library_name:")]
    return lines[0].split(":", 1)[1].strip() if lines else None


def evaluated(layout: Layout, variant: str) -> dict:
    data = json.loads((layout.artifact("evaluate") / "evaluation.json").read_text())
    return data["variants"][variant]


@pytest.fixture(scope="module")
def workspace(pipeline_run, tmp_path_factory) -> tuple[dict, Layout]:
    """A copy of the shared tiny pipeline run, so deploying again leaves it alone."""
    root = tmp_path_factory.mktemp("measured") / "ws"
    shutil.copytree(pipeline_run["layout"].root, root, symlinks=True)
    return copy.deepcopy(pipeline_run["params"].model_dump(mode="json")), Layout(root)


def onnx_params(params: dict, gates: dict | None = None) -> Params:
    params = copy.deepcopy(params)
    params["deploy"] = {
        "target": "onnx",
        "policy": "explicit",
        "variant": "finetuned",
        "gates": gates or {},
    }
    return Params.model_validate(params)


def test_onnx_int8_bundle_is_measured_and_its_row_is_in_the_card(workspace):
    params, layout = workspace
    float_row = evaluated(layout, "finetuned")
    result = run_stage("deploy", onnx_params(params), layout)
    bundle = layout.artifact("deploy")

    measured = result.metrics["measured"]
    assert measured["source"] == "deploy"  # evaluated here, not copied from evaluate
    row = measured["row"]
    assert row["format"] == "onnx"
    # Every metric the evaluate stage ran is in the bundle's row.
    for key in ("perplexity", "accuracy", "size_bytes", "decode_tokens_per_s"):
        assert key in row, key
    # The int8 graph is not the float model: its size and its perplexity are its own.
    assert row["size_bytes"] == (bundle / result.metrics["onnx_file"]).stat().st_size
    assert row["size_bytes"] != float_row["size_bytes"]  # (the tiny graph is the larger)
    assert row["perplexity"] != float_row["perplexity"]
    assert row["perplexity_ratio"] == pytest.approx(row["perplexity"] / float_row["perplexity"])
    # The compress stage's int8 variant goes through the same export and quantization:
    # the evaluate stage measured the same graph, and got the same figure.
    assert row["perplexity"] == pytest.approx(evaluated(layout, "int8")["perplexity"])

    # The same figure, measured independently in ONNX Runtime with the perplexity metric.
    from unbottle.core.contract.strategies import EvalContext
    from unbottle.core.models.runtimes import OnnxRunner
    from unbottle.core.registry import get_registry

    runner = OnnxRunner(bundle)
    perplexity = get_registry().create("metric", "perplexity", {"window": 32})
    ctx = EvalContext(
        tokenizer=runner.tokenizer,
        valid_text=layout.resolve(Path(params["data"]["valid_text"])).read_text(),
        questions=[],
        model_dir=bundle,
        seed=params["seed"],
    )
    assert perplexity.measure(runner, ctx)["perplexity"] == pytest.approx(row["perplexity"])

    # The manifest records it, and the card shows it (not the torch float row).
    manifest = read_manifest(bundle)
    assert manifest["metrics"]["measured"]["row"]["perplexity"] == row["perplexity"]
    assert "decode_tokens_per_s" not in manifest["metrics"]["measured"]["row"]  # a timing
    valid_text = layout.resolve(Path(params["data"]["valid_text"]))
    assert manifest["inputs"]["valid_text"] == tree_hash(valid_text)  # what it measured on
    card = (bundle / "README.md").read_text()
    shipped = card.split("### This bundle, as shipped")[1].split("###")[0]
    assert f"{row['perplexity']:.3f}" in shipped and "| onnx |" in shipped
    assert "| hf |" not in shipped  # the torch float row is not presented as the bundle's
    assert card_library(bundle) is None  # transformers does not load an ONNX graph


def test_gates_apply_to_the_shipped_bundle_and_a_failure_writes_nothing(workspace):
    from unbottle.core.contract.errors import GateError

    params, layout = workspace
    run_stage("deploy", onnx_params(params), layout)  # a finished bundle to keep
    int8 = read_manifest(layout.artifact("deploy"))["metrics"]["measured"]["row"]["perplexity"]
    fp32 = evaluated(layout, "finetuned")["perplexity"]
    # A limit between the two: the float row the decision reads passes, the int8 row not.
    middle = (int8 + fp32) / 2
    gate = {"max": middle} if int8 > fp32 else {"min": middle}
    before = tree_hash(layout.artifact("deploy"))
    metrics_before = layout.metrics_file("deploy").read_bytes()

    with pytest.raises(GateError, match=r"^deploy\.gates: the onnx bundle of 'finetuned' "
                       r"fails: perplexity \S+ [<>] (max|min) \S+ \(the evaluated variant "
                       r"passed\)$"):  # fmt: skip
        run_stage("deploy", onnx_params(params, {"perplexity": gate}), layout)
    assert tree_hash(layout.artifact("deploy")) == before
    assert layout.metrics_file("deploy").read_bytes() == metrics_before
    leftovers = [p.name for p in layout.artifacts.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_target_that_ships_the_variant_as_it_is_reuses_the_evaluated_row(pipeline_run):
    """The shared run deploys the float variant with ``hf``: a copy, measured once."""
    layout = pipeline_run["layout"]
    metrics = pipeline_run["results"]["deploy"].metrics
    assert metrics["measured"]["source"] == "evaluate"
    row = evaluated(layout, pipeline_run["params"].deploy.variant)
    assert metrics["measured"]["row"]["perplexity"] == row["perplexity"]
    card = (layout.artifact("deploy") / "README.md").read_text()
    shipped = card.split("### This bundle, as shipped")[1].split("###")[0]
    assert f"{row['perplexity']:.3f}" in shipped
    assert card_library(layout.artifact("deploy")) == "transformers"


def test_a_gguf_file_is_measured_as_its_reader_decodes_it(workspace):
    """Q8_0 from the float variant: the file's weights, dequantized by transformers'
    GGUF reader, are what the row measures."""
    from tests.conftest import require_extra

    require_extra("gguf")
    params, layout = workspace
    params = copy.deepcopy(params)
    params["deploy"] = {"target": {"name": "gguf", "type": "Q8_0"}, "variant": "finetuned"}
    result = run_stage("deploy", Params.model_validate(params), layout)
    bundle = layout.artifact("deploy")

    row = result.metrics["measured"]["row"]
    assert result.metrics["measured"]["source"] == "deploy"
    assert row["format"] == "gguf"
    assert row["size_bytes"] == (bundle / result.metrics["gguf_file"]).stat().st_size
    assert row["perplexity"] != evaluated(layout, "finetuned")["perplexity"]
    card = (bundle / "README.md").read_text()
    shipped = card.split("### This bundle, as shipped")[1].split("###")[0]
    assert f"{row['perplexity']:.3f}" in shipped and "| gguf |" in shipped
    assert (
        "measured after it was written with the evaluate stage's metrics, in transformers ("
        in shipped
    )
    assert "the speed figures torch's, not llama.cpp's" in shipped
    assert card_library(bundle) is None


def test_a_gguf_file_with_runtime_llama_cpp_is_measured_by_llama_cpp(workspace):
    """``runtime: llama.cpp``: the row is llama.cpp's (its logits for perplexity and
    accuracy, its decoding loop for speed, the file's bytes for the roofline), close to
    what transformers' reader measures of the same file."""
    from tests.test_formats import require_llama_cpp

    require_llama_cpp()
    from unbottle.export import LlamaCppRunner

    params, layout = workspace
    params = copy.deepcopy(params)
    params["evaluate"]["metrics"].append("roofline")
    measured = {}
    for runtime in ("transformers", "llama.cpp"):
        target = {"name": "gguf", "type": "Q8_0", "runtime": runtime}
        params["deploy"] = {"target": target, "variant": "finetuned"}
        result = run_stage("deploy", Params.model_validate(params), layout)
        measured[runtime] = result.metrics["measured"]["row"]
    assert result.metrics["gguf_runtime"] == "llama.cpp"
    row, reader = measured["llama.cpp"], measured["transformers"]
    assert row["format"] == "gguf"
    assert row["perplexity"] == pytest.approx(reader["perplexity"], rel=2e-3)
    assert row["perplexity"] != reader["perplexity"]  # llama.cpp's own arithmetic
    assert row["accuracy"] == reader["accuracy"]
    assert row["decode_tokens_per_s"] > 0 and row["speed_requests"] >= 1
    runner = LlamaCppRunner(layout.artifact("deploy"))
    assert row["weight_bytes_per_token"] == runner.bytes_per_token()
    assert row["nonzero_parameters"] == runner.parameter_counts()[1]
    runner.close()
    card = (layout.artifact("deploy") / "README.md").read_text()
    assert "evaluate stage's metrics, in llama.cpp (its own tokenizer, kernels" in card

    # The card's llama-cpp-python example runs as a user would paste it, and llama.cpp's
    # own completion loop answers what the runner's greedy decoding answers.
    code = next(c for c in re.findall(r"```python\n(.*?)```", card, re.S) if "llama_cpp" in c)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("path/to/this/bundle", str(layout.artifact("deploy"))), {})
    prompt = re.search(r"out = llm\((.*), max_tokens=(\d+)", code)
    runner = LlamaCppRunner(layout.artifact("deploy"))
    text = ast.literal_eval(prompt.group(1))
    ids = runner.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    new = runner.generate(ids["input_ids"], ids["attention_mask"], int(prompt.group(2)))
    answer = runner.tokenizer.decode(new[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.getvalue() == answer + "\n"
    runner.close()


def test_a_gptq_variants_hf_bundle_is_measured_and_loads_as_its_card_claims(workspace):
    """GPTQ int4 through ``hf``: a compressed-tensors checkpoint, a new model the deploy
    stage measures, and one plain transformers loads with the variant's own weights, so
    its card may say ``library_name: transformers``. (The ``onnx`` bundle claims no
    library, above; ``server`` ships the packed files, which plain transformers refuses,
    and claims none: tests/test_formats.py.)"""
    from tests.conftest import require_extra

    require_extra("compressed_tensors")
    import torch
    from transformers import AutoModelForCausalLM

    from unbottle.core.models.runtimes import TorchRunner

    params, layout = workspace
    params = copy.deepcopy(params)
    params["compress"]["variants"] = {
        "gptq4": [{"quantize": "gptq", "bits": 4, "group_size": 16, "act_order": True}]
    }
    params["deploy"] = {"target": "hf", "policy": "explicit", "variant": "gptq4"}
    for stage in ("compress", "evaluate", "deploy"):
        result = run_stage(stage, Params.model_validate(params), layout)
    bundle, packed = layout.artifact("deploy"), layout.artifact("compress") / "gptq4"
    row = result.metrics["measured"]["row"]
    assert result.metrics["measured"]["source"] == "deploy"
    assert row["format"] == "hf"  # a standard checkpoint, measured through transformers
    assert row["size_bytes"] == (bundle / "model.safetensors").stat().st_size
    assert card_library(bundle) == "transformers"
    # The claim holds: transformers loads the packed variant's own weights.
    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, TorchRunner(packed).logits(ids), atol=1e-4)
    assert row["perplexity"] == pytest.approx(evaluated(layout, "gptq4")["perplexity"], rel=1e-4)
