"""`unbottle cache` and `unbottle cache prune`: what the workspace cache holds, and
removing entries by last use or by size, never under a run that uses them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.test_bad_input import assert_one_line, cli
from unbottle.core.store.cache import RowCache, VariantCache, cache_root
from unbottle.core.store.cache_pruning import (
    CacheEntry,
    cache_entries,
    prune_cache,
    to_prune,
    using_cache,
)

DAY = 86400.0


def key(n: int) -> str:
    return f"{n:064x}"


def age(paths: list[Path], days: float) -> None:
    """Make the files look last used ``days`` ago."""
    when = time.time() - days * DAY
    for path in paths:
        for file in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.utime(file, (when, when))


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A workspace whose cache holds, written by the caches themselves: a token entry of
    1,000 bytes, two evaluation rows, and a variant whose weights are hard-linked from an
    artifact (as the compress stage leaves them)."""
    cache = cache_root(tmp_path)
    tokens = cache / "tokens"
    tokens.mkdir(parents=True)
    (tokens / f"{key(1)}.tokens").write_bytes(b"\0" * 1000)
    (tokens / f"{key(1)}.json").write_text('{"tokens": 500}', encoding="utf-8")
    (tokens / f"{key(1)}.lock").touch()
    rows = RowCache(cache / "evaluations")
    rows.put(key(2), {"perplexity": 3.0}, {})
    rows.put(key(3), {"perplexity": 4.0}, {})
    variant = tmp_path / "artifacts" / "compress" / "int4"
    variant.mkdir(parents=True)
    (variant / "model.safetensors").write_bytes(b"w" * 5000)
    VariantCache(cache / "variants").put(key(4), variant, {"size_mb": 0.005})
    return tmp_path


def by_key(entries: list[CacheEntry]) -> dict[str, CacheEntry]:
    return {e.key: e for e in entries}


def test_entries_group_an_entrys_files_and_count_linked_bytes_apart(filled):
    entries = by_key(cache_entries(cache_root(filled)))
    assert set(entries) == {key(1), key(2), key(3), key(4)}
    tokens = entries[key(1)]
    assert tokens.kind == "tokens" and tokens.what == "token ids" and len(tokens.paths) == 3
    assert tokens.size == 1000 + len('{"tokens": 500}') and tokens.frees == tokens.size
    assert {entries[key(2)].kind, entries[key(3)].kind} == {"evaluations"}
    variant = entries[key(4)]
    assert variant.kind == "variants"
    # The weights are the artifact's file too: removing the entry frees only its record.
    assert variant.shared == 5000 and 0 < variant.frees < 1000


def test_prune_by_age_removes_what_no_run_used_lately(filled):
    cache = cache_root(filled)
    age([cache / "tokens" / f"{key(1)}.{suffix}" for suffix in ("tokens", "json", "lock")], 40)
    age([cache / "evaluations" / f"{key(2)}.json", cache / "evaluations" / f"{key(3)}.json"], 40)
    age([cache / "variants" / key(4)], 40)
    # A run reuses one row: the lookup marks it used, so it is no longer old.
    assert RowCache(cache / "evaluations").get(key(3)) is not None

    dry = prune_cache(cache, older_than=30 * DAY, dry_run=True)
    assert {e.key for e in dry} == {key(1), key(2), key(4)}
    assert len(cache_entries(cache)) == 4  # a dry run removes nothing

    removed = prune_cache(cache, older_than=30 * DAY)
    assert {e.key for e in removed} == {key(1), key(2), key(4)}
    assert list(by_key(cache_entries(cache))) == [key(3)]
    assert list((cache / "tokens").iterdir()) == []
    # The artifact that shared the variant's weights is untouched.
    variant = filled / "artifacts" / "compress" / "int4" / "model.safetensors"
    assert variant.read_bytes() == b"w" * 5000


def test_prune_by_size_removes_the_least_recently_used_first():
    def entry(name: str, size: int, used: float, shared: int = 0) -> CacheEntry:
        return CacheEntry("tokens", name, (), size, shared, used)

    entries = [entry("a", 100, 1.0), entry("b", 100, 3.0), entry("c", 100, 2.0)]
    assert [e.key for e in to_prune(entries, max_size=150, now=10.0)] == ["a", "c"]
    assert [e.key for e in to_prune(entries, max_size=300, now=10.0)] == []
    assert [e.key for e in to_prune(entries, max_size=0, now=10.0)] == ["a", "c", "b"]
    # Bytes linked from artifacts are not the cache's: they do not count toward the size.
    linked = [entry("a", 100, 1.0, shared=100), entry("b", 100, 2.0)]
    assert to_prune(linked, max_size=100, now=10.0) == []
    # Age first, then size over what is left.
    assert [e.key for e in to_prune(entries, older_than=8.5, max_size=100, now=10.0)] == [
        "a",
        "c",
    ]


def test_the_cli_lists_the_cache_and_prunes_it(filled, capsys):
    code, out, err = cli(["cache"], filled, capsys)
    assert code == 0, err
    lines = {line.split()[1]: line for line in out.splitlines() if line.count("│") > 2}
    assert lines["tokens"].split("│")[2].strip() == "1"
    assert lines["evaluations"].split("│")[2].strip() == "2"
    assert lines["variants"].split("│")[2].strip() == "1"

    code, out, err = cli(["cache", "--json"], filled, capsys)
    assert code == 0, err
    listed = json.loads(out)
    assert sorted(e["key"] for e in listed) == [key(1), key(2), key(3), key(4)]
    assert sum(e["bytes"] for e in listed) == sum(e.size for e in cache_entries(cache_root(filled)))

    code, out, err = cli(["cache", "prune", "--max-size", "0"], filled, capsys)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("removed 4 entries, freeing ")
    assert cache_entries(cache_root(filled)) == []


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--older-than", "soon"], r"--older-than: 'soon' is not an age; .*30d"),
        (["--older-than", "-3d"], r"--older-than: '-3d' is not an age"),
        (["--max-size", "lots"], r"--max-size: 'lots' is not a size; .*20GB"),
        ([], r"cache prune: give --older-than AGE, --max-size SIZE or both"),
    ],
)
def test_bad_prune_options_are_one_line_and_remove_nothing(filled, capsys, args, pattern):
    before = cache_entries(cache_root(filled))
    assert_one_line(cli(["cache", "prune", *args], filled, capsys), pattern)
    assert cache_entries(cache_root(filled)) == before


def test_prune_is_refused_while_a_run_uses_the_cache(filled, capsys):
    """A stage or sweep task holds the cache shared while it runs: pruning would remove
    what it is about to read, so it is refused in one line, and nothing is removed."""
    cache = cache_root(filled)
    before = cache_entries(cache)
    with using_cache(cache), using_cache(cache):  # two runs at once may share it
        assert_one_line(
            cli(["cache", "prune", "--max-size", "0"], filled, capsys),
            r"cache: a stage or sweep of this workspace is using .*; prune it when",
        )
    assert cache_entries(cache) == before
    assert len(prune_cache(cache, max_size=0)) == 4  # after the run: allowed


def test_a_stage_holds_the_cache_while_it_runs(workspace, monkeypatch):
    """run_stage takes the cache's shared lock: a prune attempted from inside a stage
    (where a concurrent `unbottle cache prune` would land) is refused."""
    from unbottle.core.config.loading import load_params
    from unbottle.core.contract.errors import LockedError
    from unbottle.core.stages import runner
    from unbottle.core.stages.layout import Layout

    seen: list[str] = []

    def attempt(name, params, layout, registry):
        try:
            prune_cache(cache_root(layout.root), max_size=0)
        except LockedError as e:
            seen.append(str(e))
        raise KeyboardInterrupt  # stop the stage here; nothing else to see

    monkeypatch.setattr(runner, "_run", attempt)
    params = load_params(workspace / "params.yaml", [])
    with pytest.raises(KeyboardInterrupt):
        runner.run_stage("pretrain", params, Layout(workspace))
    assert seen and "is using" in seen[0]


def test_every_lookup_that_reuses_an_entry_marks_it_used(filled):
    """Pruning by age goes by last use: the variant cache, the row cache and the token
    cache (tokenizer and token ids) each touch the entry they hand back."""
    from unbottle.core.data.corpus import Corpus

    cache = cache_root(filled)
    corpus = filled / "corpus.txt"
    corpus.write_text("One document.\n\nAnother one, with words.\n", encoding="utf-8")
    tokens = cache / "tokens"
    tokenizer = Corpus(corpus, "t", token_cache=tokens).train_tokenizer(300)
    Corpus(corpus, "t", token_cache=tokens).token_ids(tokenizer)
    age([cache], 40)
    assert len(prune_cache(cache, older_than=30 * DAY, dry_run=True)) == 6  # all old

    assert VariantCache(cache / "variants").get(key(4)) is not None
    assert RowCache(cache / "evaluations").get(key(2)) is not None
    Corpus(corpus, "t", token_cache=tokens).train_tokenizer(300)
    Corpus(corpus, "t", token_cache=tokens).token_ids(tokenizer)

    old = {e.key for e in prune_cache(cache, older_than=30 * DAY, dry_run=True)}
    fresh = {e.key for e in cache_entries(cache)} - old
    assert {key(4), key(2)} <= fresh
    assert {e.what for e in cache_entries(cache) if e.key in fresh and e.kind == "tokens"} == {
        "tokenizer",
        "token ids",
    }
    assert old == {key(1), key(3)}


def test_the_checkpoints_runs_left_are_listed_and_pruned_with_the_cache(filled, capsys):
    """A run's training checkpoints (artifacts/.checkpoints/<stage>/<run key>/) outlive it
    where it was stopped or refused: one more kind of entry, listed, and pruned by last
    write, never under a stage."""
    root = filled / "artifacts" / ".checkpoints"
    old = root / "pretrain" / "0123456789abcdef"
    new = root / "finetune" / "fedcba9876543210"
    for run, step in ((old, "step-000010"), (new, ".step-000004.partial")):
        (run / step).mkdir(parents=True)
        (run / step / "model.safetensors").write_bytes(b"c" * 2000)
    age([old], 40)

    code, out, err = cli(["cache"], filled, capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.split()[1:2] == ["checkpoints"])
    assert row.split("│")[2].strip() == "2"
    assert "checkpoints: runs of pretrain 1, finetune 1 in artifacts/.checkpoints, " in (
        out.replace("\n", " ")
    )
    code, out, err = cli(["cache", "--json"], filled, capsys)
    listed = {e["key"]: e for e in json.loads(out) if e["kind"] == "checkpoints"}
    assert {k: e["what"] for k, e in listed.items()} == {
        old.name: "pretrain checkpoints",
        new.name: "finetune checkpoints",
    }
    assert listed[old.name]["bytes"] == listed[old.name]["frees"] == 2000

    with using_cache(cache_root(filled)):  # a stage writing or resuming them
        assert_one_line(
            cli(["cache", "prune", "--max-size", "0"], filled, capsys), r"cache: a stage .*"
        )
    assert old.is_dir() and new.is_dir()
    code, out, err = cli(["cache", "prune", "--older-than", "30d"], filled, capsys)
    assert code == 0, err
    assert f"removed pretrain checkpoints {old.name}  2.0 kB, last used 40 d ago" in out
    assert not old.exists() and new.is_dir()


def test_a_checkpoint_dir_params_name_is_listed_and_never_pruned(filled, capsys):
    """Runs in a train.checkpoint_dir (``<dir>/<run key>/``) are shown, as the stages
    that name the folder, so a user sees what runs left on a scratch disk; pruning leaves
    them (another workspace or node may be writing there), and the folder's other
    contents are not runs."""
    (filled / "params.yaml").write_text(
        "pretrain:\n  train: {checkpoint_dir: scratch}\n"
        "finetune:\n  train: {checkpoint_dir: scratch}\n",
        encoding="utf-8",
    )
    scratch = filled / "scratch"
    run = scratch / "0123456789abcdef" / "step-000100"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"c" * 3000)
    (scratch / "fedcba9876543210").mkdir()  # a run's name, no checkpoint in it
    (scratch / "notes" / "step-000001").mkdir(parents=True)  # the user's own folder
    age([scratch], 40)

    code, out, err = cli(["cache", "--json"], filled, capsys)
    assert code == 0, err
    listed = [e for e in json.loads(out) if e["kind"] == "checkpoint_dir"]
    assert [(e["key"], e["what"], e["bytes"]) for e in listed] == [
        ("0123456789abcdef", "pretrain/finetune checkpoints", 3000)
    ]
    code, out, err = cli(["cache"], filled, capsys)
    assert code == 0, err
    assert "checkpoint_dir: 1 run of pretrain/finetune in scratch (train.checkpoint_dir): " in (
        " ".join(out.split())
    )
    code, out, err = cli(["cache", "prune", "--max-size", "0"], filled, capsys)
    assert code == 0, err
    assert run.is_dir() and (scratch / "notes").is_dir()
    assert not list(cache_root(filled).glob("*/*"))  # the cache itself was emptied


def test_pruning_where_nothing_is_cached_removes_nothing_and_makes_no_folder(tmp_path, capsys):
    code, out, err = cli(["cache", "prune", "--max-size", "0"], tmp_path, capsys)
    assert code == 0, err
    assert out.strip() == "removed 0 entries, freeing 0 B"
    assert not (tmp_path / ".cache").exists()


# ------------------------------------------------------------------------ the shared cache


@pytest.fixture
def shared(tmp_path: Path, monkeypatch) -> Path:
    """The cache every workspace shares, holding two GGUF conversions laid out as the
    source loader writes them: one last used 40 days ago, one just now."""
    from unbottle.core.models.sources import CONVERSION_FORMAT, RECORD
    from unbottle.core.store.artifacts import file_hashes, write_json_atomic

    root = tmp_path / "shared"
    monkeypatch.setenv("UNBOTTLE_CACHE_DIR", str(root))
    for n, days in ((5, 40), (6, 0)):
        entry = root / "gguf" / key(n)
        entry.mkdir(parents=True)
        (entry / "model.safetensors").write_bytes(b"f" * 3000)
        files = file_hashes(entry, exclude=(RECORD,))
        record = {"format": CONVERSION_FORMAT, "source_sha256": key(n), "files": files}
        write_json_atomic(entry / RECORD, record)
        age([entry], days)
    return root


def test_the_shared_cache_lists_and_prunes_its_gguf_conversions(shared, tmp_path, capsys):
    code, out, err = cli(["cache", "--shared", "--json"], tmp_path, capsys)
    assert code == 0, err
    listed = {e["key"]: e for e in json.loads(out)}
    assert set(listed) == {key(5), key(6)}
    assert {e["what"] for e in listed.values()} == {"GGUF conversion"}
    assert all(e["bytes"] > 3000 and e["frees"] == e["bytes"] for e in listed.values())
    code, out, err = cli(["cache", "--shared"], tmp_path, capsys)
    assert code == 0 and "gguf" in out and "prune --shared" in out

    code, out, err = cli(["cache", "prune", "--shared", "--older-than", "30d"], tmp_path, capsys)
    assert code == 0, err
    assert f"removed GGUF conversion {key(5)[:16]}" in out
    assert not (shared / "gguf" / key(5)).exists() and (shared / "gguf" / key(6)).is_dir()
    assert not (tmp_path / ".cache").exists()  # the workspace's own cache: not touched


def test_the_workspace_listing_points_at_the_shared_conversions(shared, filled, capsys):
    code, out, err = cli(["cache"], filled, capsys)
    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"Outside the workspace, {shared} holds 2 GGUF ")
    assert out.splitlines()[-1].endswith("`unbottle cache --shared`.")


def test_shared_before_prune_prunes_the_shared_cache_too(shared, filled, capsys):
    """`unbottle cache --shared prune` reads as `cache prune --shared`: it must not prune
    the workspace's cache instead."""
    age([cache_root(filled)], 40)  # both caches hold entries unused for 40 days
    workspace = cache_entries(cache_root(filled))
    args = ["cache", "--shared", "prune", "--older-than", "30d"]
    code, out, err = cli(args, filled, capsys)
    assert code == 0, err
    assert f"removed GGUF conversion {key(5)[:16]}" in out
    assert cache_entries(cache_root(filled)) == workspace


def test_a_pretrain_reading_a_conversion_marks_it_used_and_holds_the_shared_cache(
    shared, monkeypatch
):
    """Loading a GGUF source reuses its conversion (marking it used, so that pruning by
    age keeps it) and holds the shared cache while it reads it: a prune then is refused."""
    from unbottle.core.contract.errors import LockedError
    from unbottle.core.models import loading, sources
    from unbottle.core.store.cache_pruning import SHARED_KINDS

    seen = []

    def load_model_pruning_meanwhile(directory):
        seen.append(directory)
        with pytest.raises(LockedError, match=r"^cache: a pretrain stage is using "):
            prune_cache(shared, max_size=0, kinds=SHARED_KINDS)
        raise RuntimeError("loaded")

    monkeypatch.setattr(loading, "load_model", load_model_pruning_meanwhile)
    source = sources.Source(kind="gguf", path=Path("model.gguf"), sha256=key(5))
    with pytest.raises(RuntimeError, match="loaded"):
        sources.load_source(source)
    assert seen == [shared / "gguf" / key(5)]  # reused, not converted again
    used = {e.key: e.last_used for e in cache_entries(shared, SHARED_KINDS)}
    assert time.time() - used[key(5)] < 60  # marked used: 40 days ago no more
    pruned = prune_cache(shared, older_than=30 * DAY, kinds=SHARED_KINDS)
    assert pruned == []  # and the lock is let go


def test_a_read_only_shared_cache_still_serves_its_conversions(shared, monkeypatch):
    """A shared cache mounted read-only (conversions made elsewhere): a pretrain reuses
    its conversion, holding the lock file opened read-only, or none where there is none."""
    import errno

    from unbottle.core.contract.errors import LockedError
    from unbottle.core.models import loading, sources
    from unbottle.core.store.cache_pruning import IN_USE, SHARED_KINDS

    writable_open, read_only = os.open, [True]

    def open_as_on_a_read_only_mount(path, flags, *args, **kwargs):
        if read_only[0] and flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return writable_open(path, flags, *args, **kwargs)

    held = []

    def load_model(directory):
        read_only[0] = False  # another host, which can write, tries to prune meanwhile
        try:
            prune_cache(shared, max_size=0, kinds=SHARED_KINDS)
            held.append(False)
        except LockedError:
            held.append(True)
        read_only[0] = True
        raise RuntimeError("loaded")

    with using_cache(shared):  # the lock file, made where the cache was written
        pass
    monkeypatch.setattr(os, "open", open_as_on_a_read_only_mount)
    monkeypatch.setattr(loading, "load_model", load_model)
    source = sources.Source(kind="gguf", path=Path("model.gguf"), sha256=key(6))
    with pytest.raises(RuntimeError, match="loaded"):
        sources.load_source(source)
    assert held == [True]  # the read-only lock kept the prune away

    (shared / IN_USE).unlink()
    source = sources.Source(kind="gguf", path=Path("model.gguf"), sha256=key(5))
    with pytest.raises(RuntimeError, match="loaded"):
        sources.load_source(source)  # no lock file: served all the same
