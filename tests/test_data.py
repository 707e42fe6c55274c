"""Tests for the synthetic demo world (unbottle.core.data.demo)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from unbottle.core.contract.errors import DataError
from unbottle.core.data.demo import (
    ATTRIBUTES,
    DEMO_FILES,
    DemoDataConfig,
    SplitMix64,
    build_world,
    generate_demo_data,
    write_demo_data,
)

EXPECTED_FILES = ("corpus/train.txt", "corpus/valid.txt", "qa/train.jsonl", "qa/test.jsonl")

# sha256 over every output of DemoDataConfig(seed=0, people=8), in path order.  If this
# changes, the data set changed: every cached artifact built from it is stale.
GOLDEN_SHA256 = "ada22bc38b458198ad5b2d2a298e1eaa3ad09f13c579ea62f488b676a44b2422"

# Pins randbelow's rejection sampling and the Fisher-Yates loop on top of the raw stream.
GOLDEN_RANDBELOW = [4, 7, 5, 0, 3, 6, 6, 8]  # SplitMix64(12345).randbelow(10) x 8
GOLDEN_SHUFFLE = [8, 1, 5, 9, 0, 4, 3, 2, 6, 7]  # SplitMix64(7).shuffle(list(range(10)))


@pytest.fixture(scope="module")
def default_data() -> dict[str, str]:
    return generate_demo_data(DemoDataConfig())


def _digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + files[path].encode("utf-8") + b"\0")
    return h.hexdigest()


def _jsonl(text: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in text.splitlines()]


def _paragraphs(text: str) -> list[str]:
    return text.rstrip("\n").split("\n\n")


def _mentions(paragraph: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", paragraph) is not None


# ---------------------------------------------------------------------------- PRNG


def test_splitmix64_matches_reference_outputs() -> None:
    # First outputs of Vigna's reference splitmix64.c seeded with 0.
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(4)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
        0xF88BB8A8724C81EC,
    ]


def test_splitmix64_derived_helpers_are_pinned() -> None:
    rng = SplitMix64(12345)
    assert [rng.randbelow(10) for _ in range(8)] == GOLDEN_RANDBELOW
    items = list(range(10))
    SplitMix64(7).shuffle(items)
    assert items == GOLDEN_SHUFFLE


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 100, 2**63 + 1, 2**64])
def test_randbelow_stays_in_range(n: int) -> None:
    rng = SplitMix64(n)
    assert all(0 <= rng.randbelow(n) < n for _ in range(500))


def test_randbelow_covers_small_ranges_and_rejects_bad_bounds() -> None:
    rng = SplitMix64(1)
    assert sorted({rng.randbelow(6) for _ in range(300)}) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="randbelow"):
        rng.randbelow(0)


def test_shuffle_and_sample_are_permutations() -> None:
    rng = SplitMix64(3)
    for size in (0, 1, 2, 5, 50):
        items = list(range(size))
        rng.shuffle(items)
        assert sorted(items) == list(range(size))
    picked = rng.sample(range(20), 7)
    assert len(picked) == len(set(picked)) == 7
    assert all(0 <= x < 20 for x in picked)
    with pytest.raises(ValueError, match="sample"):
        rng.sample([1, 2], 3)
    with pytest.raises(IndexError):
        rng.choice([])


# ----------------------------------------------------------------------- determinism


def test_same_config_gives_identical_output(default_data: dict[str, str]) -> None:
    assert generate_demo_data(DemoDataConfig()) == default_data
    assert tuple(default_data) == EXPECTED_FILES


def test_different_seed_changes_every_file(default_data: dict[str, str]) -> None:
    other = generate_demo_data(DemoDataConfig(seed=1))
    for path in EXPECTED_FILES:
        assert other[path] != default_data[path]


def test_golden_hash_pins_cross_version_determinism() -> None:
    assert _digest(generate_demo_data(DemoDataConfig(seed=0, people=8))) == GOLDEN_SHA256


def test_world_is_a_prefix_and_independent_of_renderings() -> None:
    small = build_world(DemoDataConfig(people=10))
    large = build_world(DemoDataConfig(people=30, renderings=5))
    assert large.people[:10] == small.people
    assert large.towns == small.towns


def test_names_are_unique_at_maximum_size() -> None:
    world = build_world(DemoDataConfig(people=5000))
    names = [p.name for p in world.people]
    assert len(set(names)) == 5000
    town_names = {t.name for t in world.towns}
    assert len(town_names) == len(world.towns) == 12
    assert not town_names & {part for n in names for part in n.split()}


# ----------------------------------------------------------------------------- format


def test_text_format(default_data: dict[str, str]) -> None:
    for path, text in default_data.items():
        assert text.endswith("\n") and not text.endswith("\n\n"), path
        assert "\r" not in text, path
        text.encode("ascii")  # plain English only: no surprises for a tokenizer
    for path in ("qa/train.jsonl", "qa/test.jsonl"):
        for line in default_data[path].splitlines():
            record = json.loads(line)
            assert sorted(record) == ["answer", "attribute", "person", "question"]
            assert line == json.dumps(record, ensure_ascii=True, sort_keys=True)


def test_default_sizes_are_sensible(default_data: dict[str, str]) -> None:
    size = len(default_data["corpus/train.txt"].encode())
    assert 40_000 <= size <= 80_000
    people = DemoDataConfig().people
    assert len(_paragraphs(default_data["corpus/train.txt"])) == 3 * people
    assert len(_paragraphs(default_data["corpus/valid.txt"])) == people
    facts = len(_jsonl(default_data["qa/train.jsonl"])) + len(_jsonl(default_data["qa/test.jsonl"]))
    assert facts == len(ATTRIBUTES) * people


# ------------------------------------------------------------------------------- QA


def test_qa_split_is_disjoint_and_complete(default_data: dict[str, str]) -> None:
    train = {(r["person"], r["attribute"]) for r in _jsonl(default_data["qa/train.jsonl"])}
    test = {(r["person"], r["attribute"]) for r in _jsonl(default_data["qa/test.jsonl"])}
    assert not train & test
    people = {p.name for p in build_world(DemoDataConfig()).people}
    assert train | test == {(p, a) for p in people for a in ATTRIBUTES}
    # 20% of five facts: exactly one held-out fact per person.
    assert sorted(p for p, _ in test) == sorted(people)
    assert {a for _, a in train} == set(ATTRIBUTES)


def test_test_answers_are_stated_in_every_train_paragraph_about_the_person(
    default_data: dict[str, str],
) -> None:
    paragraphs = _paragraphs(default_data["corpus/train.txt"])
    for record in _jsonl(default_data["qa/test.jsonl"]):
        about = [p for p in paragraphs if _mentions(p, record["person"])]
        assert len(about) == 3, record
        for paragraph in about:
            assert _mentions(paragraph, record["answer"]), (record, paragraph)


def test_answers_match_the_world(default_data: dict[str, str]) -> None:
    people = {p.name: p for p in build_world(DemoDataConfig()).people}
    for path in ("qa/train.jsonl", "qa/test.jsonl"):
        for record in _jsonl(default_data[path]):
            person = people[record["person"]]
            assert record["answer"] == str(getattr(person, record["attribute"]))
            assert record["person"] in record["question"]
            assert " " not in record["answer"]


def test_question_forms_are_shared_between_train_and_test(default_data: dict[str, str]) -> None:
    def forms(path: str) -> set[str]:
        return {r["question"].replace(r["person"], "X") for r in _jsonl(default_data[path])}

    assert len(forms("qa/train.jsonl")) == len(ATTRIBUTES)
    assert forms("qa/test.jsonl") <= forms("qa/train.jsonl")


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_every_attribute_stays_in_train_for_extreme_fractions(fraction: float) -> None:
    data = generate_demo_data(DemoDataConfig(people=4, test_fraction=fraction))
    train = _jsonl(data["qa/train.jsonl"])
    assert {r["attribute"] for r in train} == set(ATTRIBUTES)
    assert _jsonl(data["qa/test.jsonl"])


def test_valid_paragraphs_are_new_compositions(default_data: dict[str, str]) -> None:
    train_paragraphs = set(_paragraphs(default_data["corpus/train.txt"]))
    valid = _paragraphs(default_data["corpus/valid.txt"])
    assert len(valid) == DemoDataConfig().people
    assert not train_paragraphs & set(valid)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"people": 2}, r"^data\.demo\.people: 2 is out of range \[4, 5000\]$"),
        ({"people": 5001}, r"^data\.demo\.people: 5001 is out of range \[4, 5000\]$"),
        ({"people": 10.0}, r"^data\.demo\.people: 10\.0 must be an integer$"),
        ({"renderings": 0}, r"^data\.demo\.renderings: 0 must be >= 1$"),
        ({"test_fraction": 0.0}, r"^data\.demo\.test_fraction: 0\.0 is out of range \(0, 1\)$"),
        ({"test_fraction": 1}, r"^data\.demo\.test_fraction: 1 is out of range \(0, 1\)$"),
        ({"test_fraction": float("nan")}, r"^data\.demo\.test_fraction: nan is out of range"),
        ({"test_fraction": "0.2"}, r"^data\.demo\.test_fraction: '0\.2' must be a number"),
        ({"seed": True}, r"^data\.demo\.seed: True must be an integer$"),
    ],
)
def test_bad_config_raises_value_error(changes: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DemoDataConfig(**changes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=pattern):
        dataclasses.replace(DemoDataConfig(), **changes)


# ---------------------------------------------------------------------------- write


def test_write_demo_data_writes_files_and_hashes(tmp_path: Path) -> None:
    config = DemoDataConfig(people=6, renderings=1)
    out = tmp_path / "data"
    hashes = write_demo_data(out, config)
    expected = generate_demo_data(config)
    assert sorted(hashes) == sorted(EXPECTED_FILES) == sorted(DEMO_FILES)
    for path, text in expected.items():
        raw = (out / path).read_bytes()
        assert raw == text.encode("utf-8")
        assert hashes[path] == hashlib.sha256(raw).hexdigest()


def test_write_demo_data_replaces_an_earlier_demo_without_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "data"
    write_demo_data(out, DemoDataConfig(people=6, seed=1))
    hashes = write_demo_data(out, DemoDataConfig(people=6, seed=2))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    written = sorted(str(p.relative_to(out).as_posix()) for p in out.rglob("*") if p.is_file())
    assert written == sorted(EXPECTED_FILES)
    for path, digest in hashes.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("theirs", ["qa_train.jsonl", "corpus/notes.txt", "extra/a.txt"])
def test_write_demo_data_refuses_a_folder_holding_a_users_files(tmp_path: Path, theirs) -> None:
    """The demo replaces its whole folder: a folder holding anything the demo does not
    write (a user's own data, put where the demo's was) is refused, and left as it was."""
    out = tmp_path / "data"
    write_demo_data(out, DemoDataConfig(people=6, seed=1))
    (out / theirs).parent.mkdir(parents=True, exist_ok=True)
    (out / theirs).write_text("my own data\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(DataError, match=rf"data holds files the demo does not write \({theirs}\)"):
        write_demo_data(out, DemoDataConfig(people=6, seed=2))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_write_demo_data_refuses_a_file_where_its_folder_goes(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.write_text("not a folder\n")
    with pytest.raises(DataError, match=r"data is a file, not a folder"):
        write_demo_data(out, DemoDataConfig(people=6))
    assert out.read_text() == "not a folder\n"


def test_write_demo_data_creates_missing_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "data"
    write_demo_data(out, DemoDataConfig(people=4, renderings=1))
    assert (out / "qa" / "test.jsonl").is_file()
