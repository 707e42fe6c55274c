"""Bad input through the CLI: one line on stderr, exit code 2, earlier artifacts untouched."""

from __future__ import annotations

import itertools
import json
import os
import re
import stat

import pytest

from tests.conftest import TINY_DATA, run_cli
from unbottle.core.data.demo import generate_demo_data
from unbottle.core.store.artifacts import atomic_dir, file_hashes


def previous_artifact(workspace, stage: str) -> dict[str, str]:
    """Stand in for the output of an earlier run; returns its file hashes."""
    out = workspace / "artifacts" / stage
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"earlier weights")
    (out / "manifest.json").write_text("{}")
    return file_hashes(out, exclude=())


def assert_one_line_error(result, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["-S", "pretrain.train.steps=0"], r"pretrain\.train\.steps: 0 is invalid"),
        (["-S", "pretrain.train.optimizer=lamb"], r"Unknown optimizer 'lamb'\. Installed: "),
        (["-S", "data.train_text=data/nope.txt"], r"data\.train_text: .*nope\.txt does not exist"),
        (["-S", "pretrain.train.precision=fp16"], r"fp16 needs a CUDA GPU"),
        (["-S", "pretrain.train.seq_len=100000"], r"pretrain\.train\.seq_len: 100000 is longer"),
        (["--params", "missing.yaml"], r"params file 'missing\.yaml' does not exist"),
    ],
)
def test_bad_input_fails_in_one_line_and_keeps_earlier_artifacts(workspace, args, pattern):
    before = previous_artifact(workspace, "pretrain")
    result = run_cli("stage", "pretrain", *args, cwd=workspace)
    assert_one_line_error(result, pattern)
    assert file_hashes(workspace / "artifacts" / "pretrain", exclude=()) == before


def test_unknown_stage_and_unknown_compress_strategy(workspace):
    assert_one_line_error(run_cli("stage", "train", cwd=workspace), r"Unknown stage 'train'")
    result = run_cli("stage", "compress", "-S", "compress.variants.x=[{prune: foo}]", cwd=workspace)
    assert_one_line_error(result, r"compress\.variants\.x\[0\]: Unknown pruning strategy 'foo'")


def test_a_distillation_precision_the_device_lacks_fails_before_any_work(workspace):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    result = run_cli(
        "stage",
        "compress",
        "-S",
        "compress.variants.kd=[{distill: kd, layers: 1, precision: fp16}]",
        cwd=workspace,
    )
    assert_one_line_error(
        result,
        r"compress\.variants\.kd\[0\]\.precision: fp16 needs a CUDA GPU; use fp32 or auto on a "
        r"CPU$",
    )
    assert not (workspace / "artifacts" / "compress").exists()


def test_malformed_data_is_named_with_its_line(workspace):
    (workspace / "data/qa/train.jsonl").write_text('{"question": "q?", "answer": "a"}\nnot json\n')
    previous_artifact(workspace, "pretrain")
    result = run_cli("stage", "finetune", cwd=workspace)
    assert_one_line_error(result, r"train\.jsonl:2 is not valid JSON")


def test_stage_refuses_an_input_artifact_whose_files_changed(workspace):
    previous_artifact(workspace, "pretrain")
    result = run_cli("stage", "finetune", cwd=workspace)
    assert_one_line_error(result, r"artifacts/pretrain: files do not match its manifest")


def test_debug_shows_the_traceback(workspace):
    result = run_cli("--debug", "stage", "pretrain", "-S", "pretrain.train.steps=0", cwd=workspace)
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_data_demo_writes_the_deterministic_world(tmp_path):
    args = ["-S", "data.demo.people=8", "-S", "data.demo.renderings=2"]
    result = run_cli("data", "demo", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = generate_demo_data(TINY_DATA)
    for rel, text in expected.items():
        assert (tmp_path / "data" / rel).read_text(encoding="utf-8") == text
    bad = run_cli("data", "demo", "-S", "data.demo.people=1", cwd=tmp_path)
    assert_one_line_error(bad, r"data\.demo\.people: 1 is invalid")


def test_data_demo_never_deletes_a_users_data(tmp_path):
    """`unbottle data demo` replaces its folder: one holding the user's own files is refused
    in one line, and stays as it was."""
    mine = tmp_path / "data" / "qa_train.jsonl"
    mine.parent.mkdir()
    mine.write_text('{"question": "2 km in m?", "answer": "2000"}\n')
    result = run_cli("data", "demo", "-S", "data.demo.people=8", cwd=tmp_path)
    assert_one_line_error(
        result, r"--out: data holds files the demo does not write \(qa_train\.jsonl\)"
    )
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["qa_train.jsonl"]
    assert mine.read_text() == '{"question": "2 km in m?", "answer": "2000"}\n'


def test_data_general_writes_this_pythons_texts_beside_the_users_files(tmp_path):
    import hashlib

    mine = tmp_path / "data" / "general" / "mine.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("the user's own general text\n")
    result = run_cli("data", "general", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = ["python-docs.txt", "python-docs-1.txt", "python-docs-2.txt", "python-code.txt"]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f"data/general/{n}" for n in names]
    texts = {n: (mine.parent / n).read_text(encoding="utf-8") for n in names}
    for line, name in zip(lines, names, strict=True):  # the printed hash is the file's
        digest = hashlib.sha256((mine.parent / name).read_bytes()).hexdigest()
        assert line.split()[1] == f"sha256:{digest[:12]}"
    # Prose in two halves that share no paragraph (one to replay, one to measure on).
    assert 'The "if" statement' in texts["python-docs.txt"]
    first = {p.strip() for p in texts["python-docs-1.txt"].split("\n\n")}
    second = {p.strip() for p in texts["python-docs-2.txt"].split("\n\n")}
    assert len(first) > 100 and len(second) > 100 and not first & second
    assert "class ArgumentParser" in texts["python-code.txt"]
    assert mine.read_text() == "the user's own general text\n"  # the folder's other files stay

    (tmp_path / "a-file").write_text("x")
    bad = run_cli("data", "general", "--out", "a-file/general", cwd=tmp_path)
    assert_one_line_error(bad, r"^error: --out: a-file/general: ")


def test_atomic_dir_keeps_the_old_output_when_the_work_fails(tmp_path):
    final = tmp_path / "artifact"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "weights").write_text("half-written v2")
        raise RuntimeError("crash in the middle")
    assert (final / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no temp dirs left


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_outputs_are_as_readable_as_the_umask_allows(tmp_path, umask):
    """Temporary files are private (mkstemp, and safetensors >= 0.8 writes through a
    0600 temporary file): renamed into place as they are, weights and manifests could not
    be read by the user a bundle is copied to. Written files get the umask's mode."""
    import torch
    from safetensors.torch import save_file

    from unbottle.core.store.artifacts import write_json_atomic

    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "artifact") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "notes.txt").write_text("x")
        write_json_atomic(tmp_path / "artifact" / "manifest.json", {"a": 1})
    finally:
        os.umask(previous)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "artifact").rglob("*")
    }
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert modes == {
        "artifact/model.safetensors": file_mode,
        "artifact/sub": dir_mode,
        "artifact/sub/notes.txt": file_mode,
        "artifact/manifest.json": file_mode,
    }
    assert stat.S_IMODE((tmp_path / "artifact").stat().st_mode) == dir_mode


def test_plugins_json_is_machine_readable(tmp_path):
    rows = json.loads(run_cli("plugins", "--json", cwd=tmp_path).stdout)
    assert {"kind", "name", "distribution", "version", "plugin"} == set(rows[0])


def test_run_fails_fast_on_bad_params_before_prefect_starts(workspace):
    result = run_cli("run", "-S", "compress.variants.x=[{prune: nope}]", cwd=workspace)
    assert_one_line_error(result, r"compress\.variants\.x\[0\]: Unknown pruning strategy 'nope'")
    assert not (workspace / "artifacts").exists()
    assert not (workspace / ".prefect").exists()


def test_help_wraps_each_paragraph_once_at_the_terminals_width(tmp_path):
    """typer's rich help kept a docstring's line breaks and the terminal wrapped the
    lines again: at 80 columns sweep's help broke a paragraph after "compress.sweep is
    a", where the next word had room."""
    for command in ("sweep", "cache prune"):
        page = run_cli(*command.split(), "--help", cwd=tmp_path, env={"COLUMNS": "80"}).stdout
        description = page.split("╭")[0].splitlines()[3:]  # after the usage line
        for line, after in itertools.pairwise(description):
            if line.strip() and after.strip():  # two lines of one paragraph
                room = 80 - 2 - len(line.rstrip())  # rich keeps a column each side
                assert len(after.split()[0]) + 1 > room, (command, line, after)


def test_every_command_has_a_one_line_summary():
    """The line a command list shows; details go in later paragraphs."""
    import inspect

    import typer

    from unbottle.cli import _reflow_help, app

    # As main() does before typer parses: alone, this test saw the docstrings unflowed
    # (and failed on `cache prune`), and passed in a full run only after another test
    # had called main().
    _reflow_help(app)

    def commands(group, path: str) -> list:  # typer's click groups and commands
        found = []
        for name, command in group.commands.items():
            found.append((f"{path} {name}", command))
            if hasattr(command, "commands"):
                found += commands(command, f"{path} {name}")
        return found

    for name, command in commands(typer.main.get_command(app), "unbottle"):
        summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert summary and "\n" not in summary, name
