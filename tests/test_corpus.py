"""A user's own prose (`data.train_text`, `data.valid_text`): plain text or JSONL records,
gzipped or not, or a folder of such shards; and the token stream made of it.

Pretraining dumps usually come as JSONL, one ``{"text": ...}`` per document, and their
documents have paragraphs. Read as plain text, such a file would train the model on the
JSON syntax, and splitting at blank lines would cut each document into paragraphs with
an end-of-text token between them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, make_workspace
from tests.test_bad_input import artifacts_state, assert_one_line, cli
from unbottle.core.contract.errors import DataError
from unbottle.core.models.loading import DOCUMENT_BREAK, EOS, PAD, documents, read_text
from unbottle.core.store.artifacts import sha256_file

ARTICLE = "A title\n\nIts first paragraph.\n\nIts second paragraph."


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_blank_lines_separate_documents_unless_the_text_has_page_breaks():
    assert documents("one\n\ntwo\n\n\n\nthree\n") == ["one", "two", "three"]
    # A page break (form feed) separates documents that hold blank lines.
    text = f"{ARTICLE}\n{DOCUMENT_BREAK}\nAnother\n\ndocument.\n{DOCUMENT_BREAK}"
    assert documents(text) == [ARTICLE, "Another\n\ndocument."]


@pytest.mark.parametrize("seed", range(4))
def test_documents_come_one_at_a_time_as_the_whole_text_splits(seed):
    """iter_text_documents (what evaluate's metrics read a held-out text through) gives
    the blocks that splitting the whole text gives, on texts of random breaks."""
    import random

    from unbottle.core.models.loading import iter_text_documents

    pick = random.Random(seed)
    pieces = ["a", "bc", " ", "\n", "\n\n", "\n\n\n", DOCUMENT_BREAK, "\t", "word."]
    for _ in range(300):
        text = "".join(pick.choices(pieces, k=pick.randrange(0, 30)))
        blocks = text.split(DOCUMENT_BREAK) if DOCUMENT_BREAK in text else text.split("\n\n")
        assert list(iter_text_documents(text)) == [b.strip() for b in blocks if b.strip()]


def test_a_jsonl_corpus_is_a_document_per_record_paragraphs_kept(tmp_path):
    from unbottle.core.models.loading import encode_stream, train_tokenizer

    # JSON lets U+2028 stand unescaped in a string: it must not end the line.
    records = [{"text": ARTICLE, "url": "https://example.org/1"}, {"text": "Short\u2028one."}]
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps(records[0]), "", json.dumps(records[1], ensure_ascii=False)]
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")  # blank lines skipped
    text = read_text(path, "data.train_text")
    assert documents(text) == [ARTICLE, "Short\u2028one."]
    # One end-of-text token per record, none between a record's paragraphs.
    tokenizer = train_tokenizer(documents(text), 300)
    stream = encode_stream(tokenizer, text).tolist()
    assert stream.count(tokenizer.eos_token_id) == 2
    assert "{" not in tokenizer.decode(stream) and "url" not in tokenizer.decode(stream)


def test_a_page_break_inside_a_jsonl_record_does_not_split_it(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Page one.\fPage two."}, {"text": "B"}])
    assert documents(read_text(path, "data.train_text")) == ["Page one.\nPage two.", "B"]


def test_the_token_stream_is_each_document_then_end_of_text_across_batches(monkeypatch):
    import torch

    from unbottle.core.models import loading

    docs = [f"Document {i} says {'more ' * i}." for i in range(11)]
    tokenizer = loading.train_tokenizer(docs, 300)
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"]
        expected.append(tokenizer.eos_token_id)
    monkeypatch.setattr(loading, "ENCODE_BATCH", 4)  # 11 documents: batches of 4, 4 and 3
    stream = loading.encode_stream(tokenizer, "\n\n".join(docs))
    assert stream.dtype == torch.long and stream.tolist() == expected


TEXTS = [
    "Plain words, then more of them.",
    f"An end of text {EOS} in the middle, and a pad {PAD} too",
    "",
    "ünïcödé ✓ and 漢字, spaced   oddly\n\nover lines",
    "long " * 400,
]


def test_encode_texts_gives_what_the_tokenizer_call_gives():
    from unbottle.core.models import loading

    tokenizer = loading.train_tokenizer(TEXTS, 300)
    expected = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert loading.encode_texts(tokenizer, TEXTS) == expected
    # A tokenizer file may set truncation and padding (some released ones do); the call
    # turns both off when asked for neither, and so must the direct path.
    tokenizer.backend_tokenizer.enable_truncation(8)
    tokenizer.backend_tokenizer.enable_padding(length=600)
    assert loading.encode_texts(tokenizer, TEXTS) == expected
    assert tokenizer(TEXTS, add_special_tokens=False)["input_ids"] == expected


def test_encode_texts_calls_a_slow_tokenizer_as_usual(tmp_path):
    from transformers import GPT2Tokenizer

    from unbottle.core.models import loading

    fast = loading.train_tokenizer(TEXTS, 300)
    vocab, merges = fast.backend_tokenizer.model.save(str(tmp_path))
    slow = GPT2Tokenizer(vocab, merges, unk_token=EOS)
    assert not slow.is_fast
    texts = [t for t in TEXTS if EOS not in t]
    expected = slow(texts, add_special_tokens=False)["input_ids"]
    assert loading.encode_texts(slow, texts) == expected == fast(texts)["input_ids"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "fine"', "is not valid JSON"),
        ('["a list"]', 'is not an object with a string field "text"'),
        ('{"content": "elsewhere"}', 'is not an object with a string field "text"'),
        ('{"text": 42}', 'is not an object with a string field "text"'),
    ],
)
def test_a_bad_jsonl_record_is_named_by_its_line(tmp_path, line, problem):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a good first record"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_text(path, "data.train_text")
    assert str(error.value).startswith(f"data.train_text: {path}:2 {problem}")
    assert "\n" not in str(error.value)


def test_a_json_file_is_refused_not_read_as_prose(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus\.json is a \.json file; give plain text, or "):
        read_text(path, "data.train_text")


def test_a_jsonl_corpus_without_text_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "  "}, {"text": ""}])
    with pytest.raises(DataError, match=r"data\.valid_text: .*corpus\.jsonl is empty$"):
        read_text(path, "data.valid_text")


def test_a_folder_is_its_corpus_files_in_order_and_gzip_is_read_through(tmp_path):
    shards = tmp_path / "shards"
    (shards / "b").mkdir(parents=True)
    (shards / "a.txt").write_text("First.\n\nSecond.\n", encoding="utf-8")
    with gzip.open(shards / "b" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": ARTICLE}) + "\n" + json.dumps({"text": "Last."}) + "\n")
    (shards / "b" / "d.txt.gz").write_bytes(gzip.compress(b"Plain, compressed.\n"))
    (shards / ".hidden.txt").write_text("an editor's swap file", encoding="utf-8")
    (shards / "README.md").write_text("# what these shards are", encoding="utf-8")
    text = read_text(shards, "data.train_text")
    assert documents(text) == ["First.", "Second.", ARTICLE, "Last.", "Plain, compressed."]
    assert documents(read_text(shards / "b" / "c.jsonl.gz", "x")) == [ARTICLE, "Last."]


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (lambda d: d.mkdir(), r"shards is a folder with no corpus files \(\*\.txt, \*\.jsonl"),
        (
            lambda d: (d.mkdir(), (d / "x.txt.gz").write_bytes(b"not gzip")),
            r"shards/x\.txt\.gz is not a gzip file",
        ),
        (
            lambda d: (d.mkdir(), (d / "x.jsonl.gz").write_bytes(gzip.compress(b"[1]\n"))),
            r'shards/x\.jsonl\.gz:1 is not an object with a string field "text"',
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / "x.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "\xe9"}')),
            ),
            r"shards/x\.jsonl\.gz:2 is not UTF-8 text \(byte 0xe9 at offset 24\)",
        ),
    ],
    ids=["no corpus files", "not gzip", "gzipped JSONL of lists", "gzipped Latin-1"],
)
def test_a_bad_folder_or_compressed_file_is_one_line(tmp_path, setup, pattern):
    setup(tmp_path / "shards")
    with pytest.raises(DataError, match=pattern) as error:
        read_text(tmp_path / "shards", "data.train_text")
    assert str(error.value).startswith("data.train_text: ") and "\n" not in str(error.value)


def test_pretraining_on_the_corpus_as_jsonl_or_shards_gives_the_same_model(tmp_path, tiny_data):
    """The tiny corpus rewritten as JSONL, one record per document, and cut into a folder
    of shards (plain text, then gzipped JSONL): the pretrain stage trains the same
    tokenizer and the same weights, bit for bit."""
    from unbottle.core.config.schema import Params
    from unbottle.core.stages.layout import Layout
    from unbottle.core.stages.runner import run_stage

    weights = {}
    for form in ("txt", "jsonl", "shards"):
        root = make_workspace(tmp_path / form, tiny_data)
        for name in ("train", "valid"):
            plain = root / "data" / "corpus" / f"{name}.txt"
            docs = documents(read_text(plain, name))
            if form == "jsonl":
                write_jsonl(plain.with_suffix(".jsonl"), [{"text": d} for d in docs])
            elif form == "shards":
                shards, half = plain.with_suffix(".shards"), len(docs) // 2
                shards.mkdir()
                (shards / "0.txt").write_text("\n\n".join(docs[:half]), encoding="utf-8")
                with gzip.open(shards / "1.jsonl.gz", "wt", encoding="utf-8") as f:
                    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[half:])
        params = {**TINY_PARAMS, "data": dict(TINY_PARAMS["data"])}
        params["data"]["train_text"] = f"data/corpus/train.{form}"
        params["data"]["valid_text"] = f"data/corpus/valid.{form}"
        layout = Layout(root)
        run_stage("pretrain", Params.model_validate(params), layout)
        out = layout.artifact("pretrain")
        weights[form] = {
            name: sha256_file(out / name) for name in ("model.safetensors", "tokenizer.json")
        }
    assert weights["jsonl"] == weights["txt"] == weights["shards"]


def test_the_cli_refuses_a_bad_jsonl_corpus_in_one_line_before_any_work(
    tmp_path, tiny_data, capsys
):
    root = make_workspace(tmp_path, tiny_data)
    corpus = root / "data" / "corpus" / "train.jsonl"
    corpus.write_text('{"text": "fine"}\n{"body": "not text"}\n', encoding="utf-8")
    before = artifacts_state(root)
    result = cli(["stage", "pretrain", "-S", f"data.train_text={corpus}"], root, capsys)
    assert_one_line(result, rf"data\.train_text: {corpus}:2 is not an object with")
    assert artifacts_state(root) == before


# ---------------------------------------------------------------- read as it comes


@pytest.mark.parametrize("seed", range(6))
def test_a_text_file_read_line_by_line_has_the_documents_of_the_whole_text(tmp_path, seed):
    """iter_documents reads a plain-text file a line at a time: its documents must be
    exactly what documents() finds in the whole text, blank-line runs, page breaks in
    mid-line, carriage returns and a missing final newline included."""
    import random

    from unbottle.core.models.loading import iter_documents

    pick = random.Random(seed)
    pieces = ["word", " ", "\n", "\n", "\n\n", "\n\n\n", "\r\n", "  \n", "é"]
    if seed % 2:
        pieces.append(DOCUMENT_BREAK)
    text = "".join(pick.choice(pieces) for _ in range(400)) + "end"
    path = tmp_path / ("corpus.txt.gz" if seed % 3 == 0 else "corpus.txt")
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    assert list(iter_documents(path, "t")) == documents(text)


def test_a_single_record_keeps_its_paragraphs(tmp_path):
    """One JSONL record, or a folder whose whole corpus is one document, is one document
    even though it has blank lines (joined into one string, it used to be split at them)."""
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": ARTICLE}])
    assert documents(read_text(path, "t")) == [ARTICLE]
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "a.jsonl", [{"text": ARTICLE}])
    assert documents(read_text(tmp_path / "folder", "t")) == [ARTICLE]


def test_errors_surface_while_reading_as_they_did_when_read_whole(tmp_path):
    from unbottle.core.models.loading import iter_documents

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"fine\n\nfine again\nbad \xff here\n")
    with pytest.raises(
        DataError, match=r"corpus\.txt:4 is not UTF-8 text \(byte 0xff at offset 21\)"
    ):
        list(iter_documents(path, "data.train_text"))
    with pytest.raises(DataError, match=r"missing\.txt does not exist$"):
        list(iter_documents(tmp_path / "missing.txt", "data.train_text"))
    (tmp_path / "blank.txt").write_text(" \n\n\f\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.txt is empty$"):
        list(iter_documents(tmp_path / "blank.txt", "data.train_text"))


# ---------------------------------------------------------------- the token file


@pytest.fixture(scope="module")
def prose_tokenizer():
    from unbottle.core.models.loading import train_tokenizer

    return train_tokenizer([ARTICLE, "Another document, with other words."] * 4, 300)


def test_token_ids_are_the_stream_in_a_narrow_type_mapped_from_a_cached_file(
    tmp_path, prose_tokenizer, monkeypatch
):
    import numpy as np
    import torch

    from unbottle.core.data import corpus as corpus_module
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models import loading

    docs = [f"Document {i}.\n\n{'More words. ' * i}" for i in range(9)]
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    expected = loading.encode_stream(prose_tokenizer, read_text(path, "t"))
    cache = tmp_path / "tokens"

    monkeypatch.setattr(loading, "ENCODE_BATCH", 4)  # several batches written
    first = Corpus(path, "t", token_cache=cache)
    ids = first.token_ids(prose_tokenizer)
    assert ids.dtype == torch.uint16 and torch.equal(ids.long(), expected)
    assert first.document_count == len(docs)
    (token_file,) = cache.glob("*.tokens")
    assert token_file.stat().st_size == 2 * expected.numel()
    assert np.array_equal(np.fromfile(token_file, np.uint16), expected.numpy())

    # A second run maps the cached file: nothing is tokenized again.
    def no_tokenizing(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(loading, "encode_documents", no_tokenizing)
    again = Corpus(path, "t", token_cache=cache)
    assert torch.equal(again.token_ids(prose_tokenizer).long(), expected)
    assert again.document_count == len(docs)

    # A damaged entry (a run killed while copying the cache, say) is never reused, and
    # what a writer killed while tokenizing left is removed.
    monkeypatch.undo()
    leftover = cache / f".{token_file.name}.12345-abcd.tmp"
    leftover.write_bytes(b"\0" * 64)
    with open(token_file, "r+b") as f:
        f.truncate(10)
    assert torch.equal(
        Corpus(path, "t", token_cache=cache).token_ids(prose_tokenizer).long(), expected
    )
    assert token_file.stat().st_size == 2 * expected.numel() and not leftover.exists()

    # Another corpus or tokenizer is another file.
    path.write_text(json.dumps({"text": "Changed."}) + "\n", encoding="utf-8")
    Corpus(path, "t", token_cache=cache).token_ids(prose_tokenizer)
    assert len(list(cache.glob("*.tokens"))) == 2
    assert corpus_module.token_dtype(len(prose_tokenizer)) == np.uint16


def test_processes_sharing_the_cache_build_each_entry_once(tmp_path, monkeypatch):
    """Two workers (as the ranks of a torchrun) that reach the same cache entry together:
    one trains the tokenizer and tokenizes, the other waits for it and loads the entry."""
    import threading
    import time

    import torch
    from tokenizers import Tokenizer

    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models import loading

    path = write_jsonl(
        tmp_path / "corpus.jsonl", [{"text": f"Doc {i}. {ARTICLE}"} for i in range(9)]
    )
    cache, calls = tmp_path / "tokens", []
    train, encode = loading.train_tokenizer, loading.encode_documents

    def slow_train(docs, vocab_size):
        calls.append("train")
        time.sleep(0.5)  # long enough for the other worker to arrive
        return train(docs, vocab_size)

    def slow_encode(tokenizer, docs):
        calls.append("encode")
        time.sleep(0.5)
        yield from encode(tokenizer, docs)

    monkeypatch.setattr(loading, "train_tokenizer", slow_train)
    monkeypatch.setattr(loading, "encode_documents", slow_encode)
    ids: list[torch.Tensor] = []

    def worker() -> None:
        corpus = Corpus(path, "t", token_cache=cache)
        tokenizer = corpus.train_tokenizer(300)
        # Each worker its own tokenizer object, as each process has.
        tokenizer = loading.wrap_tokenizer(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
        ids.append(corpus.token_ids(tokenizer))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["train", "encode"] and len(ids) == 2 and torch.equal(ids[0], ids[1])


def test_without_a_cache_the_token_file_is_unnamed_and_the_ids_the_same(tmp_path, prose_tokenizer):
    import torch

    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models.loading import encode_stream

    path = tmp_path / "corpus.txt"
    path.write_text(f"{ARTICLE}\f\nAnother document, with other words.\n", encoding="utf-8")
    ids = Corpus(path, "t").token_ids(prose_tokenizer)
    assert torch.equal(ids.long(), encode_stream(prose_tokenizer, path.read_text()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_the_token_type_is_the_narrowest_that_holds_the_vocabulary():
    import numpy as np

    from unbottle.core.data.corpus import token_dtype

    assert token_dtype(49_152) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(128_256) == np.uint32


def test_the_pipeline_keeps_tokenizer_and_token_file_in_the_workspace_cache(
    tmp_path, tiny_data, monkeypatch
):
    """The pretrain stage writes the trained tokenizer and the corpus's token file under
    .cache/unbottle/tokens/; run again, it trains the same model from them without
    training a tokenizer or tokenizing anything."""
    from unbottle.core.config.schema import Params
    from unbottle.core.models import loading
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.pretrain import pretrain
    from unbottle.core.store.cache import cache_root

    root = make_workspace(tmp_path, tiny_data)
    params = Params.model_validate(TINY_PARAMS)
    cache = cache_root(root) / "tokens"

    def run(out: str):
        result = pretrain(
            params.pretrain,
            train_text=root / params.data.train_text,
            out_dir=tmp_path / out,
            seed=0,
            registry=get_registry(),
            token_cache=cache,
        )
        metrics.append(result.metrics)
        return {n: sha256_file(tmp_path / out / n) for n in ("model.safetensors", "tokenizer.json")}

    metrics: list[dict] = []
    first = run("first")
    (token_file,) = cache.glob("*.tokens")
    record = json.loads(token_file.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["dtype"] == "uint16" and token_file.stat().st_size == 2 * record["tokens"]
    # The metrics say how much of the corpus training went over.
    assert metrics[0]["corpus_tokens"] == record["tokens"]
    assert metrics[0]["epochs"] == metrics[0]["train_tokens"] / record["tokens"]
    assert record["documents"] == len(documents(read_text(root / params.data.train_text, "t")))
    assert len(list(cache.glob("*.tokenizer.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("done again")

    monkeypatch.setattr(loading, "train_tokenizer", refuse)
    monkeypatch.setattr(loading, "encode_documents", refuse)
    assert run("again") == first

    # A damaged tokenizer entry is trained again, never half-loaded.
    monkeypatch.undo()
    (tokenizer_file,) = cache.glob("*.tokenizer.json")
    tokenizer_file.write_text('{"model": ', encoding="utf-8")
    assert run("third") == first
    assert json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]["type"] == "BPE"


def test_a_tokenizer_sample_is_uniform_seeded_and_in_corpus_order(tmp_path):
    """Reservoir sampling (Algorithm R): each of n documents is in a sample of k with
    probability k/n, the same seed draws the same sample, and the sample keeps the
    corpus's order."""
    from collections import Counter

    from unbottle.core.data.corpus import Corpus

    docs = [f"Document {i}." for i in range(10)]
    corpus = Corpus(write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs]), "t")
    assert corpus.sample(3, seed=7) == corpus.sample(3, seed=7)
    assert corpus.sample(20, seed=0) == docs  # asked for more than there are: all of them
    counts: Counter[str] = Counter()
    for seed in range(2000):
        drawn = corpus.sample(3, seed)
        assert len(drawn) == 3 and drawn == sorted(drawn, key=docs.index)
        counts.update(drawn)
    # 600 expected per document; a binomial's standard deviation here is about 20.
    assert all(abs(counts[d] - 600) < 100 for d in docs), counts


def test_pretrain_trains_the_tokenizer_on_a_sample_when_asked(tmp_path, tiny_data, monkeypatch):
    from unbottle.core.config.schema import Params
    from unbottle.core.models import loading
    from unbottle.core.registry import get_registry
    from unbottle.core.stages.pretrain import pretrain

    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"]}}
    params["pretrain"]["tokenizer"] = {"vocab_size": 300, "sample_documents": 5}
    cfg = Params.model_validate(params)
    train, seen = loading.train_tokenizer, []

    def spy(texts, vocab_size):
        seen.append(list(texts))
        return train(seen[-1], vocab_size)

    monkeypatch.setattr(loading, "train_tokenizer", spy)
    corpus = tiny_data / "corpus" / "train.txt"
    pretrain(
        cfg.pretrain, train_text=corpus, out_dir=tmp_path / "out", seed=3, registry=get_registry()
    )
    all_docs = documents(corpus.read_text(encoding="utf-8"))
    assert len(seen) == 1 and len(seen[0]) == 5 and set(seen[0]) <= set(all_docs)


def test_compress_maps_the_training_ids_and_holds_only_its_calibration_windows(
    tmp_path, pipeline_run
):
    """The compress stage draws calibration windows (and kd its batches) from the training
    text's token file mapped in its narrow type, as pretraining does, not from a LongTensor
    copy of 8 bytes a token: a user's pretraining corpus is often the calibration text."""
    import torch

    from unbottle.core.registry import get_registry
    from unbottle.core.stages.compress import prepare

    layout, params = pipeline_run["layout"], pipeline_run["params"]
    cache = tmp_path / "tokens"
    bench = prepare(
        params.compress,
        model=layout.artifact("finetune"),
        train_text=layout.root / params.data.train_text,
        seed=0,
        registry=get_registry(),
        token_cache=cache,
    )
    (token_file,) = cache.glob("*.tokens")
    assert bench.stream.dtype == torch.uint16
    assert bench.stream.numel() * 2 == token_file.stat().st_size
    mapped = Path("/proc/self/maps").read_text(encoding="utf-8")
    assert str(token_file.resolve()) in mapped, "the ids are not the token file, mapped"
    # The windows a quantizer feeds the model are LongTensors of the stream's ids.
    seq_len = params.compress.calibration.seq_len
    assert len(bench.calibration) == params.compress.calibration.samples
    for window in bench.calibration:
        assert window.dtype == torch.long and window.shape == (1, seq_len)
    stream = bench.stream.long()
    starts = [
        s
        for s in range(stream.numel() - seq_len)
        if torch.equal(stream[s : s + seq_len], bench.calibration[0][0])
    ]
    assert starts, "a calibration window is not a window of the training ids"


def test_a_text_file_is_scanned_for_page_breaks_once_until_it_changes(tmp_path, monkeypatch):
    """Whether a plain-text file has page breaks takes a pass over the whole file; the
    evaluate stage reads the first documents of the held-out file once per metric and
    model, so the answer is kept while the file is the same, and asked again when not."""
    import os

    from unbottle.core.models import loading

    path = tmp_path / "held_out.txt"
    path.write_text("One.\n\nTwo.\n", encoding="utf-8")
    assert list(loading.iter_documents(path, "t")) == ["One.", "Two."]

    def scan_again(f):
        raise AssertionError("scanned again")

    with monkeypatch.context() as m:
        m.setattr(loading, "_has_page_breaks", scan_again)
        assert list(loading.iter_documents(path, "t")) == ["One.", "Two."]

    path.write_text(f"One.\n\nstill one.{DOCUMENT_BREAK}Two.\n", encoding="utf-8")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert list(loading.iter_documents(path, "t")) == ["One.\n\nstill one.", "Two."]


def test_a_missing_data_file_says_what_would_fix_it(tmp_path):
    """Only a path the demo writes points at `unbottle data demo` (which replaces the
    demo's folder); a user's own path misspelt names the file beside it."""
    from unbottle.core.data.prompts import read_pairs
    from unbottle.core.models.loading import iter_documents

    demo_path = tmp_path / "data" / "corpus" / "train.txt"
    with pytest.raises(DataError, match=r"train\.txt does not exist \(run `unbottle data demo`"):
        list(iter_documents(demo_path, "data.train_text"))

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "qa_train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(
        DataError, match=r"qa_trian\.jsonl does not exist \(did you mean qa_train\.jsonl\?\)$"
    ):
        read_pairs(mine / "qa_trian.jsonl", "data.qa_train")
    with pytest.raises(DataError, match=r"elsewhere\.jsonl does not exist$"):
        read_pairs(mine / "elsewhere.jsonl", "data.qa_train")
