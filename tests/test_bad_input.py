"""Hostile and careless input through the CLI and the stages (issue 17, items 7 to 13).

Every bad input is one line on stderr, exit code 2, before any heavy work, and nothing
already written changes. The CLI runs in-process (``unbottle.cli.main(argv)``): a
subprocess per case would spend most of the budget importing torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PIPELINE_PARAMS, TINY_PARAMS, make_workspace, run_cli_here
from unbottle.core.store.artifacts import MANIFEST, file_hashes, sha256_file


def cli(args: list[str], cwd: Path, capsys) -> tuple[int, str, str]:
    """``unbottle ARGS`` in this process: (exit code, stdout, stderr)."""
    result = run_cli_here(*args, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


def assert_one_line(result: tuple[int, str, str], pattern: str) -> str:
    """Exit 2, and stdout + stderr together are one line: the error, matching ``pattern``
    (no INFO line of a stage that started working before it failed)."""
    code, out, err = result
    lines = (out + err).strip().splitlines()
    assert code == 2, out + err
    assert len(lines) == 1, out + err
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def artifacts_state(root: Path) -> dict[str, str]:
    """Every file under artifacts/ but the stages' lock files (they hold the last pid)."""
    art = root / "artifacts"
    files = file_hashes(art, exclude=()) if art.is_dir() else {}
    return {rel: h for rel, h in files.items() if not rel.endswith(".lock")}


@pytest.fixture
def upstream(tmp_path: Path, tiny_data: Path, pipeline_run: dict) -> Path:
    """A workspace with tiny data and copies of the pipeline run's pretrain and finetune
    artifacts (made with the same params)."""
    root = make_workspace(tmp_path, tiny_data, PIPELINE_PARAMS)
    for stage in ("pretrain", "finetune"):
        shutil.copytree(pipeline_run["layout"].artifact(stage), root / "artifacts" / stage)
    return root


# ------------------------------------------------------------------ 7: no tracebacks


@pytest.mark.parametrize(
    ("stage", "file"),
    [
        ("pretrain", "data/corpus/train.txt"),
        ("finetune", "data/qa/train.jsonl"),
        ("evaluate", "data/corpus/valid.txt"),
        ("evaluate", "data/qa/test.jsonl"),
    ],
)
def test_non_utf8_data_is_one_line_naming_the_file(upstream, capsys, stage, file):
    path = upstream / file
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"caf\xe9 \xff" + lines[2]  # Latin-1 bytes on the third line
    path.write_bytes(b"\n".join(lines))
    before = artifacts_state(upstream)
    result = cli(["stage", stage], upstream, capsys)
    assert_one_line(result, rf"{re.escape(file)}:3 is not UTF-8 text \(byte 0xe9 at offset \d+\)")
    assert artifacts_state(upstream) == before


def test_non_utf8_params_file(upstream, capsys):
    (upstream / "latin1.yaml").write_bytes("seed: 0\n# café\n".encode("latin-1"))
    result = cli(["stage", "pretrain", "--params", "latin1.yaml"], upstream, capsys)
    assert_one_line(result, r"params file: latin1\.yaml:2 is not UTF-8 text \(byte 0xe9")


def test_deeply_nested_yaml_and_override(upstream, capsys):
    (upstream / "deep.yaml").write_text("seed: " + "[" * 10_000 + "]" * 10_000 + "\n")
    result = cli(["stage", "pretrain", "--params", "deep.yaml"], upstream, capsys)
    assert_one_line(result, r"deep\.yaml: nested too deeply to be params")
    deep = "{a: " * 10_000 + "1" + "}" * 10_000
    result = cli(
        ["stage", "pretrain", "-S", f"pretrain.train.optimizer.x={deep}"], upstream, capsys
    )
    assert_one_line(result, r"override 'pretrain\.train\.optimizer\.x=\{a: \{a: .*…: the value is")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"garbage{", r"not valid JSON"),
        (b"[]", r"a JSON list where an object"),
        (b"\x00\xff\xfe\x89PNG binary", r"not UTF-8"),
        (b'{"files": "x"}', r"a JSON dict where an object"),
    ],
)
def test_damaged_upstream_manifest_is_one_line(upstream, capsys, content, reason):
    (upstream / "artifacts/pretrain" / MANIFEST).write_bytes(content)
    before = artifacts_state(upstream)
    result = cli(["stage", "finetune"], upstream, capsys)
    assert_one_line(result, rf"artifacts/pretrain/manifest\.json: damaged manifest \({reason}")
    assert artifacts_state(upstream) == before


def test_damaged_own_manifest_means_stale_not_a_crash(pipeline_run, tmp_path):
    from unbottle.core.store.fingerprint import is_current

    layout = pipeline_run["layout"]
    out = tmp_path / "finetune"
    shutil.copytree(layout.artifact("finetune"), out)
    stamp = json.loads((out / MANIFEST).read_text())["fingerprint"]
    metrics = layout.metrics_file("finetune")
    assert is_current(out, stamp, metrics)
    for content in (b"garbage{", b"[]", b"\xff\xfe binary"):
        (out / MANIFEST).write_bytes(content)
        assert is_current(out, stamp, metrics) is False


def test_truncated_weights_whose_hash_was_rewritten(upstream, capsys):
    art = upstream / "artifacts/pretrain"
    weights = art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = sha256_file(weights)  # the hash agrees
    (art / MANIFEST).write_text(json.dumps(manifest))
    before = artifacts_state(upstream)
    result = cli(["stage", "finetune"], upstream, capsys)
    assert_one_line(result, r"artifacts/pretrain/model\.safetensors: damaged weights \(")
    assert artifacts_state(upstream) == before


# ------------------------------------------------------------------ 8, 9: fail fast


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


FAIL_FAST = [
    (
        "compress",
        ["-S", "compress.variants.g100=[{quantize: rtn, group_size: 100}]"],
        r"compress\.variants\.g100\[0\]\.group_size: 100 does not divide the input size 32",
    ),
    (
        "finetune",
        ["-S", "finetune.train.batch_size=4000000", "-S", "finetune.train.seq_len=64"],
        r"finetune\.train: training needs about [\d.]+ GiB .* free; lower finetune\.train",
    ),
    (
        "finetune",
        ["-S", "finetune.train.grad_accum_steps=3"],
        r"finetune\.train\.batch_size: 4 does not split over 1 process x 3 accumulation",
    ),
    (
        "finetune",
        ["-S", "finetune.train.precision=fp16"],
        r"finetune\.train\.precision: fp16 needs a CUDA GPU",
    ),
    (
        "pretrain",
        ["-S", "pretrain.train.parallelism=ddp"],
        r"pretrain\.train\.parallelism: 'ddp' needs at least 2 processes but 1 was launched",
    ),
    (
        "compress",
        ["-S", "compress.variants.slim=[{prune: structured, layers: 2}]"],
        r"compress\.variants\.slim\[0\]: layers 2 would remove every decoder layer \(2\)",
    ),
    (
        "compress",
        ["-S", "compress.variants={}"],
        r"compress\.variants: no variants to build",
    ),
    (
        "compress",
        ["-S", "compress.calibration.source=chat"],
        r"compress\.calibration\.source: .*'train_text', 'qa_train' or 'both'",
    ),
]


@pytest.mark.parametrize(("stage", "args", "pattern"), FAIL_FAST)
def test_setup_refuses_before_loading_anything(upstream, capsys, monkeypatch, stage, args, pattern):
    if "fp16" in " ".join(args) and not _no_gpu():
        pytest.skip("fp16 is valid on a GPU")
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    # Stand in for an earlier compress artifact: the empty recipe list must not replace it.
    earlier = upstream / "artifacts/compress"
    earlier.mkdir()
    (earlier / "variants.json").write_text('["a", "b", "c"]')
    before = artifacts_state(upstream)
    # One line and nothing else: no stage logged that it had started loading or training.
    assert_one_line(cli(["stage", stage, *args], upstream, capsys), pattern)
    assert artifacts_state(upstream) == before


def test_a_step_after_a_shape_change_names_its_full_key_path_when_it_runs(upstream):
    """Structured pruning changes the shapes the next step sees, so the quantizer's group
    size is checked when it runs; its message still names the whole key path."""
    import copy

    from unbottle.core.config.schema import Params
    from unbottle.core.contract.errors import ConfigError
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    tree = copy.deepcopy(PIPELINE_PARAMS)
    tree["compress"]["variants"] = {
        "slim-int4": [{"prune": "structured", "ffn": 0.5}, {"quantize": "rtn", "group_size": 64}]
    }
    before = artifacts_state(upstream)
    with pytest.raises(ConfigError, match=r"^compress\.variants\.slim-int4\[1\]\.group_size: 64 "):
        run_stage("compress", Params.model_validate(tree), Layout(upstream))
    assert artifacts_state(upstream) == before  # no compress artifact, no leftovers


def test_calibration_on_pairs_checks_them_before_the_model_loads(upstream, capsys):
    (upstream / "data/qa/train.jsonl").write_text('{"question": "q?", "answer": "a"}\n{"q": 1}\n')
    before = artifacts_state(upstream)
    args = ["stage", "compress", "-S", "compress.calibration.source=both"]
    assert_one_line(cli(args, upstream, capsys), r"data\.qa_train: .*train\.jsonl:2 ")
    assert artifacts_state(upstream) == before


def test_run_checks_every_stage_data_before_prefect_starts(upstream, capsys):
    (upstream / "data/qa/train.jsonl").write_text('{"question": "q?", "answer": "a"}\nnot json\n')
    result = cli(["run"], upstream, capsys)
    assert_one_line(result, r"data\.qa_train: .*train\.jsonl:2 is not valid JSON")
    assert not (upstream / ".prefect").exists()  # Prefect never started


# ------------------------------------------------------------------ 11: echoed values


def test_huge_values_and_keys_are_cut_in_the_error_line(upstream, capsys):
    huge = "x" * 1_000_000
    line = assert_one_line(
        cli(["stage", "pretrain", "-S", f"pretrain.train.steps={huge}"], upstream, capsys),
        r"pretrain\.train\.steps: 'xxx+…",
    )
    assert len(line) < 400
    params = dict(TINY_PARAMS, **{huge: 1})
    (upstream / "huge.yaml").write_text(yaml.safe_dump(params))
    result = cli(["stage", "pretrain", "--params", "huge.yaml"], upstream, capsys)
    assert len(assert_one_line(result, r"xxx…: unknown key; allowed: seed, data")) < 400


def test_a_missing_file_deep_in_the_tree_is_named_in_full(upstream, capsys):
    # A file's name is at the end of its path: an error line must not cut it off.
    deep = upstream / ("a-long-folder-name-" * 4) / "data" / "my-own-training-text.txt"
    for stage, key in (("pretrain", "data.train_text"), ("finetune", "data.qa_train")):
        result = cli(["stage", stage, "-S", f"{key}={deep}"], upstream, capsys)
        assert f"{key}: {deep} does not exist" in assert_one_line(result, "does not exist")
    # A path longer than a line should be keeps its end.
    huge = upstream / ("x" * 200) / ("y" * 200) / "nope.txt"
    result = cli(["stage", "pretrain", "-S", f"data.train_text={huge}"], upstream, capsys)
    assert len(assert_one_line(result, r": …x*/?y+/nope\.txt does not exist$")) < 400
    # A name the file system refuses, or a folder, is one line too.
    refused = upstream / ("z" * 300) / "nope.txt"
    result = cli(["stage", "pretrain", "-S", f"data.train_text={refused}"], upstream, capsys)
    assert_one_line(result, r"data\.train_text: …z+/nope\.txt: File name too long$")
    result = cli(["stage", "finetune", "-S", "data.qa_train=data"], upstream, capsys)
    assert_one_line(result, rf"data\.qa_train: {upstream / 'data'} is a directory; name a file$")


def test_every_path_argument_turns_a_name_the_system_refuses_into_one_line(
    upstream, tmp_path, capsys
):
    # Path.is_file() and .exists() raise on a name too long (ENAMETOOLONG) and say False
    # for a link that loops: each command that looks at a user's path first must still
    # answer in one line, and name what the system said.
    refused = tmp_path / ("z" * 300) / "x"
    refusal = r": …z+/x: File name too long$"
    for args, named in (
        (["stage", "pretrain", "--params", str(refused)], "params file"),
        (["run", "--params", str(refused)], "params file"),
        (["stage", "pretrain", "-S", f"pretrain.source.path={refused}"], "pretrain.source.path"),
        (["serve", str(refused)], "bundle"),
        (["show", str(refused)], "artifact"),
        (["data", "demo", "--out", str(refused)], "--out"),
    ):
        assert_one_line(cli(args, upstream, capsys), re.escape(named) + refusal)
    # A symbolic link that loops: refused too, not "does not exist".
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for args, named in ((["serve", str(loop / "b")], "bundle"), (["show", str(loop)], "artifact")):
        pattern = rf"{named}: {re.escape(str(loop))}(/b)?: Too many levels of symbolic links$"
        assert_one_line(cli(args, upstream, capsys), pattern)


# ------------------------------------------------------------------ 12: locks, leftovers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_of_a_stage_is_refused_naming_the_holder(upstream, capsys):
    from unbottle.core.store.locking import stage_lock

    before = artifacts_state(upstream)
    with stage_lock(upstream / "artifacts", "pretrain"):
        result = cli(["stage", "pretrain"], upstream, capsys)
    assert_one_line(
        result, rf"stage pretrain is already running in this workspace \(pid {os.getpid()} holds"
    )
    assert artifacts_state(upstream) == before


def test_a_lock_left_by_a_dead_process_is_broken(tmp_path):
    from unbottle.core.store.locking import stage_lock

    lock = tmp_path / ".pretrain.lock"
    lock.write_text(f"{_dead_pid()}\n")
    with stage_lock(tmp_path, "pretrain") as path:
        assert path.read_text() == f"{os.getpid()}\n"


def test_leftovers_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    from unbottle.core.store.locking import sweep_leftovers

    dead, alive = _dead_pid(), os.getpid()
    names = [
        f".compress.{dead}-ab12cd.tmp",
        f".compress.old-{dead}",
        f".compress.prefixes.{dead}-x1y2",
        ".compress.k3j4h5g6.tmp",  # named before writers put their pid in
        f".compress.{alive}-zz99.tmp",
        f".pretrain.{dead}-ab12cd.tmp",  # another stage's: its own run sweeps it
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / "compress").mkdir()
    removed = sweep_leftovers(tmp_path, "compress")
    assert sorted(removed) == sorted(names[:4])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        ["compress", f".compress.{alive}-zz99.tmp", f".pretrain.{dead}-ab12cd.tmp"]
    )


def test_a_kill_between_the_two_renames_of_a_swap_costs_no_rebuild(upstream, pipeline_run):
    """The state a kill between `final -> .old-PID` and `tmp -> final` leaves: no artifact
    in place, the old one aside, the new one whole under its temporary name. The next run
    finishes the swap and finds the artifact current."""
    from unbottle.core.stages.runner import run_stage

    layout = pipeline_run["layout"]
    art = upstream / "artifacts"
    shutil.copytree(layout.metrics_dir, upstream / "metrics")
    dead = _dead_pid()
    (art / "pretrain").rename(art / f".pretrain.{dead}-q1w2e3.tmp")
    (art / f".pretrain.old-{dead}").mkdir()
    (art / f".pretrain.old-{dead}" / "model.safetensors").write_bytes(b"older weights")
    result = run_stage("pretrain", pipeline_run["params"], type(layout)(upstream))
    assert result.skipped
    assert file_hashes(art / "pretrain") == file_hashes(layout.artifact("pretrain"))
    assert sorted(p.name for p in art.iterdir() if p.name.startswith(".pretrain.")) == [
        ".pretrain.lock"
    ]


def test_the_fingerprint_and_metrics_are_in_the_manifest_before_the_swap(pipeline_run):
    from unbottle.core.store.fingerprint import METRICS_STAMP

    layout = pipeline_run["layout"]
    for stage in ("pretrain", "finetune", "compress", "evaluate", "deploy"):
        manifest = json.loads((layout.artifact(stage) / MANIFEST).read_text())
        assert len(manifest["fingerprint"]) == 64
        assert manifest[METRICS_STAMP] == sha256_file(layout.metrics_file(stage))


def test_metrics_left_by_another_run_make_an_artifact_stale(pipeline_run, tmp_path):
    from unbottle.core.store.fingerprint import is_current

    layout = pipeline_run["layout"]
    stamp = json.loads((layout.artifact("finetune") / MANIFEST).read_text())["fingerprint"]
    other = tmp_path / "finetune.json"
    other.write_text('{"final_loss": 1.0}\n')
    assert is_current(layout.artifact("finetune"), stamp, layout.metrics_file("finetune"))
    assert not is_current(layout.artifact("finetune"), stamp, other)


# ------------------------------------------------------------------ 13: fuzzing params


def _key_paths(tree: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a params tree (mappings and list items), the root included."""
    paths = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            paths += _key_paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            paths += _key_paths(value, (*prefix, i))
    return paths


def _fuzz_strategies():
    from hypothesis import strategies as st

    text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        text,
        st.sampled_from(["x" * 5000, "adamw", "magnitude", "rtn", "auto", "fp16", "ddp"]),
    )
    values = st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)
        ),
        max_leaves=6,
    )
    paths = _key_paths(TINY_PARAMS)

    @st.composite
    def broken(draw) -> str:
        """TINY_PARAMS with 1 to 3 edits: a value replaced (wrong type, out of range,
        nested), an unknown key added, or a value nested thousands of levels deep."""
        import copy

        tree = copy.deepcopy(TINY_PARAMS)
        deep = None
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            node = tree
            for part in path[:-1]:
                node = node[part] if isinstance(node, dict) and part in node else None
                if node is None:
                    break
            edit = draw(st.sampled_from(["replace", "replace", "unknown", "deep"]))
            if edit == "unknown":
                target = (
                    node if not path else node.get(path[-1]) if isinstance(node, dict) else None
                )
                if isinstance(target, dict):
                    target[draw(text)] = draw(values)
            elif path and isinstance(node, dict | list):
                node[path[-1]] = "__DEEP__" if edit == "deep" else draw(values)
                if edit == "deep":
                    deep = draw(st.integers(100, 5000))
        dumped = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
        if deep is not None:
            dumped = dumped.replace("__DEEP__", "[" * deep + "]" * deep)
        return dumped

    return broken(), st.sampled_from(["pretrain", "compress"])


def test_fuzzed_params_files_fail_in_one_line_and_touch_nothing(upstream, capsys):
    """Generated params files: each one that validation refuses is refused with an
    UnbottleError (never another exception), by the CLI with exit 2 in one short line,
    and leaves the artifacts as they were."""
    from hypothesis import HealthCheck, Phase, given, settings

    from unbottle.core.config.loading import load_params
    from unbottle.core.contract.errors import UnbottleError
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.preflight import preflight
    from unbottle.core.stages.runner import setup

    params_files, stages = _fuzz_strategies()
    before = artifacts_state(upstream)
    layout = Layout(upstream)
    path = upstream / "fuzz.yaml"
    refused = []

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,  # the same examples on every run
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time on a failure
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(text=params_files, stage=stages)
    def check(text: str, stage: str) -> None:
        path.write_text(text, encoding="utf-8")
        try:
            params = load_params(path)
            preflight(stage, params, layout, setup(params))
        except UnbottleError:
            pass
        else:
            return  # valid: the stage would start work, which is not this test's business
        refused.append(stage)
        line = assert_one_line(cli(["stage", stage, "--params", str(path)], upstream, capsys), ".")
        assert len(line) < 500, line[:600]
        assert artifacts_state(upstream) == before

    check()
    assert len(refused) > 20  # most generated files are invalid: the test saw real refusals


def test_a_pair_longer_than_seq_len_is_refused_before_the_weights_load(
    upstream, capsys, monkeypatch
):
    """The pairs are encoded with the base's tokenizer before its weights load: a large
    model's load is not waited for to learn that seq_len is too short."""
    from unbottle.core.models import loading

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the pairs were checked")

    monkeypatch.setattr(loading, "load_model", no_weights)
    before = artifacts_state(upstream)
    result = cli(["stage", "finetune", "-S", "finetune.train.seq_len=8"], upstream, capsys)
    assert_one_line(result, r"data\.qa_train: the pair '.*' is \d+ tokens, longer than finetune")
    assert artifacts_state(upstream) == before


@pytest.mark.parametrize(
    ("variants", "pattern"),
    [
        (
            "{fine: [{prune: magnitude, sparsity: 0.4}], bad: [{prune: wanda, pattern: '2:128'}]}",
            r"compress\.variants\.bad\[0\]: prune: pattern 2:128 needs M=128 to divide every "
            r"layer's input width; model\.layers\.0\.self_attn\.q_proj has \d+$",
        ),
        (
            "{fine: [{prune: magnitude, sparsity: 0.4}], "
            "bad: [{prune: magnitude, pattern: '2:4'}, {prune: structured, ffn: 0.25}]}",
            r"compress\.variants\.bad\[1\]: structured changes the layers' shapes after an "
            r"N:M pattern \(bad\[0\]\), which would no longer hold; put the N:M step after it$",
        ),
    ],
    ids=["pattern-does-not-divide", "nm-then-structured"],
)
def test_a_compress_step_the_model_cannot_take_is_refused_before_any_variant_is_built(
    upstream, capsys, variants, pattern
):
    """Refused in one line before the first variant is built (it used to be after)."""
    before = artifacts_state(upstream)
    result = cli(["stage", "compress", "-S", f"compress.variants={variants}"], upstream, capsys)
    assert_one_line(result, pattern)
    assert artifacts_state(upstream) == before
