"""`unbottle serve` on the gguf target's bundle: llama.cpp runs the file, the engine batches.

The engine keeps no cache of its own for it: each request is a llama.cpp sequence with
cells of its own, prefilled alone and decoded with the others in one ``llama_decode`` per
step. Expected tokens come from :class:`LlamaCppRunner` (the deploy stage's measurement of
the same file), one prompt at a time. These tests need llama-cpp-python, which `make test`
does not build (test_formats.require_llama_cpp); the refusal without it runs everywhere.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.serving_helpers import (
    assert_every_position_scored,
    assert_verify_matches_decode,
    live_server,
)
from tests.test_bad_input import assert_one_line, cli
from tests.test_formats import deploy, require_llama_cpp
from tests.test_formats import tokenizer as tokenizer  # a fixture, shared

PROMPTS = ["the quick brown", "fox", "the lazy dog jumps over the", "quick quick", "dog", "a"]
NEW = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama as a Q8_0 file, deployed by the gguf target and checked in llama.cpp.
    Its weights are random at a larger scale than training starts from, and its head is
    its own, so that greedy decoding wanders over the vocabulary instead of repeating
    one token: a row given another row's cache would show."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbottle.core.models.loading import save_model

    require_llama_cpp()
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("gguf-serve")
    save_model(LlamaForCausalLM(config).eval(), tokenizer, root / "float")
    deploy("gguf", {"type": "Q8_0", "runtime": "llama.cpp"}, root / "float", root / "tiny-q8")
    return root / "tiny-q8"


@pytest.fixture(scope="module")
def solo(bundle, tokenizer) -> dict[str, list[int]]:
    """Each prompt's greedy continuation by llama.cpp alone (the deploy stage's runner)."""
    from unbottle.export import LlamaCppRunner

    runner = LlamaCppRunner(bundle, threads=1)
    out = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        row = runner.generate(ids, torch.ones_like(ids), NEW, eos_token_id=None)
        out[prompt] = row[0, ids.shape[1] :].tolist()
    runner.close()
    assert len({token for tokens in out.values() for token in tokens}) > 2 * NEW
    return out


def test_serving_a_gguf_bundle_without_llama_cpp_is_refused_in_one_line(
    tmp_path, capsys, monkeypatch
):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model-Q4_0.gguf").write_bytes(b"GGUF")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a),
    )
    assert_one_line(
        cli(["serve", str(bundle)], tmp_path, capsys),
        rf"serve: {bundle}: running a GGUF file in llama\.cpp needs the llama-cpp-python "
        r"package; install it with `pip install 'unbottle\[llama-cpp\]'` .*",
    )


def test_other_readers_of_a_model_directory_name_a_gguf_bundle_for_what_it_is(tmp_path):
    """Only the server runs a GGUF bundle; anything else that reads a model directory
    says what the directory is and what runs it, not "no model there"."""
    from unbottle.core.contract.errors import DataError
    from unbottle.core.models.runtimes import model_format

    (tmp_path / "model-Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(DataError) as refused:
        model_format(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}: a GGUF bundle (model-Q4_0.gguf), for llama.cpp and Ollama "
        f"(`unbottle serve {tmp_path}` runs it in llama.cpp); here only hf, packed, onnx and "
        "genai directories are read"
    )


def test_a_file_llama_cpp_cannot_read_or_a_batch_it_cannot_hold_is_refused_in_one_line(
    tmp_path, capsys
):
    require_llama_cpp()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model-Q4_0.gguf").write_bytes(b"GGUF")
    assert_one_line(
        cli(["serve", str(bundle)], tmp_path, capsys),
        rf"{bundle / 'model-Q4_0.gguf'}: not a GGUF model file with a context length .*",
    )
    assert_one_line(
        cli(["serve", str(bundle), "--max-batch", "257"], tmp_path, capsys),
        r"^error: serve: max_batch 257: llama\.cpp decodes at most 256 sequences together",
    )


@pytest.mark.parametrize("prefill_chunk", [512, 2])
def test_requests_joining_a_running_batch_decode_what_llama_cpp_decodes_alone(
    bundle, solo, prefill_chunk
):
    """Also with prompts computed 2 tokens an engine iteration, each part going on in the
    cells of the sequence the first part took."""
    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

    loaded = load_bundle(bundle, {"max_batch": 3, "threads": 1, "prefill_chunk": prefill_chunk})
    assert loaded.format == "gguf" and loaded.context == 64  # from the file's metadata
    backend = loaded.backend
    assert backend.owns_cache and backend.context == 64
    steps: list[int] = []
    engine = loaded.engine(on_step=steps.append)
    engine.start()
    done = threading.Semaphore(0)
    lengths = [8, 7, 6, 8, 5, 4]  # leave at different steps; the last alone
    seqs = [
        Sequence(
            loaded.tokenizer(p, add_special_tokens=False)["input_ids"],
            SamplingParams(max_tokens=n, ignore_eos=True),
            lambda seq, text, finish: finish and done.release(),
        )
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    try:
        # Six requests for three rows: the last three wait for rows to finish and join
        # the running batch.
        engine.submit(seqs[:1])
        engine.submit(seqs[1:])
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    for seq, prompt, n in zip(seqs, PROMPTS, lengths, strict=True):
        assert seq.finish_reason == "length"
        assert seq.generated == solo[prompt][:n], prompt
    assert max(steps) == 3  # rows shared decode steps, at most max_batch of them
    assert steps != sorted(steps)  # ...and it shrank once no one was waiting
    # Every sequence's cells were cleared and its id given back; a reused id starts clean.
    assert sorted(backend._free) == [0, 1, 2]
    again = loaded.engine()
    again.start()
    try:
        ids = seqs[2].prompt
        assert (
            again.generate(ids, SamplingParams(max_tokens=NEW, ignore_eos=True)).generated
            == (solo[PROMPTS[2]])
        )
    finally:
        again.stop()


@pytest.mark.parametrize(("prompt_cache", "prefill_chunk"), [(True, 512), (True, 2), (False, 512)])
def test_a_prompt_computes_only_what_a_finished_requests_cells_do_not_hold(
    bundle, tokenizer, prompt_cache, prefill_chunk
):
    """llama-server's ``cache_prompt``: a sequence that leaves keeps its cells, and the
    next prompt takes the free sequence whose cells hold the longest start of it. Each
    request still decodes exactly what llama.cpp decodes from a fresh cache; the cells
    past where it parts from the cached tokens are cut. Off: every prompt from scratch."""
    from unbottle.core.serving.engine import SamplingParams, load_bundle
    from unbottle.export import LlamaCppRunner

    runner = LlamaCppRunner(bundle, threads=1)

    def fresh(ids: list[int]) -> list[int]:
        row = torch.tensor([ids])
        return runner.generate(row, torch.ones_like(row), NEW, eos_token_id=None)[0, len(ids) :]

    options = {"prompt_cache": prompt_cache, "prefill_chunk": prefill_chunk}
    loaded = load_bundle(bundle, {"max_batch": 2, "threads": 1, **options})
    engine = loaded.engine()
    engine.start()
    try:

        def served(ids: list[int]) -> tuple[list[int], int]:
            seq = engine.generate(ids, SamplingParams(max_tokens=NEW, ignore_eos=True))
            assert seq.generated == fresh(ids).tolist(), ids
            return seq.generated, seq.cached_tokens

        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        first = encode(PROMPTS[2])
        answer, cached = served(first)
        assert cached == 0
        # The next turn: the prompt, 3 of the answer's tokens, then the user's new words.
        # The cells hold the prompt and the answer but for its last token (never fed).
        turn = first + answer[:3] + encode(" fox fox")
        assert turn[len(first) + 3] != answer[3]
        assert served(turn)[1] == (len(first) + 3 if prompt_cache else 0)
        # Another prompt: the other, empty sequence (the one free the longest).
        other = encode("quick quick brown fox")
        assert other[0] != first[0] and served(other)[1] == 0
        # Parting from the turn's cells after 2 tokens: the rest is cut, then computed.
        parted = first[:2] + encode(" quick fox")
        assert parted[2] != first[2] and served(parted)[1] == (2 if prompt_cache else 0)
        # A prompt the cells hold whole: its last token is computed again, for its logits.
        assert served(other)[1] == (len(other) - 1 if prompt_cache else 0)
    finally:
        engine.stop()
        runner.close()
    assert sorted(loaded.backend._free) == [0, 1]


def test_a_prompt_copies_the_cells_of_a_running_sequence_that_holds_its_start(
    bundle, tokenizer, monkeypatch
):
    """Choices of one prompt (``n``), or requests that share a system prompt and arrive
    together: no free sequence holds the start yet, a running one does, and its cells are
    copied (``llama_memory_seq_cp``) and cut where the prompts part. Each decodes what
    llama.cpp decodes from a fresh cache."""
    from unbottle.core.serving.engine import LlamaCppBackend, SamplingParams, Sequence, load_bundle
    from unbottle.export import LlamaCppRunner

    monkeypatch.setattr(LlamaCppBackend, "COPY_AT_LEAST", 2)  # the tiny prompts are short
    runner = LlamaCppRunner(bundle, threads=1)

    def fresh(ids: list[int], n: int) -> list[int]:
        row = torch.tensor([ids])
        return runner.generate(row, torch.ones_like(row), n, eos_token_id=None)[0, len(ids) :]

    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    start = encode(PROMPTS[2])
    first, second = start + encode(" fox fox"), start + encode(" quick dog")
    loaded = load_bundle(bundle, {"max_batch": 3, "threads": 1})
    engine = loaded.engine()
    engine.start()
    done = threading.Semaphore(0)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)

    def sequence(ids: list[int]) -> Sequence:
        return Sequence(ids, params, lambda seq, text, finish: finish and done.release())

    try:
        # Two choices of one prompt: the second copies all of it but its last token.
        choices = [sequence(first), sequence(first)]
        engine.submit(choices)
        # A prompt sharing the start of the running ones: both choices hold it, and a
        # free sequence holds nothing yet.
        while len(choices[0].generated) < 2:
            time.sleep(0.001)
        late = sequence(second)
        engine.submit([late])
        for _ in range(3):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert [s.cached_tokens for s in choices] == [0, len(first) - 1]
    assert late.cached_tokens == len(start)
    for seq in (*choices, late):
        assert seq.generated == fresh(seq.prompt, NEW).tolist()
    assert sorted(loaded.backend._free) == [0, 1, 2]
    loaded.backend.close()
    runner.close()


def test_speculative_checks_in_llama_cpp_give_its_plain_tokens(bundle, solo, tokenizer):
    """Drafted tokens go into the sequence's cells with the step's own token; those the
    model refuses are cut from them (``truncate``), so what follows decodes as alone."""
    from unbottle.core.serving.engine import SamplingParams, load_bundle

    speculative = {"num_speculative_tokens": 4, "prompt_lookup_min": 1}
    loaded = load_bundle(bundle, {"threads": 1, "speculative": speculative})
    assert loaded.backend.rewinds  # a Llama's cache drops positions; a recurrent one's not
    ids = {p: tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}
    assert_verify_matches_decode(loaded.backend, ids[PROMPTS[2]], [5, 9, 11, 5], atol=1e-4)
    engine = loaded.engine()
    engine.start()
    try:
        for prompt in PROMPTS:
            seq = engine.generate(ids[prompt], SamplingParams(max_tokens=NEW, ignore_eos=True))
            assert seq.generated == solo[prompt], prompt
    finally:
        engine.stop()
    assert engine.drafted_tokens > engine.accepted_tokens  # refused drafts were cut


def test_a_prompts_logprobs_score_every_position_in_fresh_cells(bundle, tokenizer):
    """``echo`` with ``logprobs``: llama.cpp returns the logits of every prompt position,
    and takes no cached cells for it (they have no logits), from scratch or in parts."""
    from unbottle.core.serving.engine import load_bundle

    loaded = load_bundle(bundle, {"max_batch": 2, "threads": 1})
    ids = tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    assert_every_position_scored(loaded.backend, ids, 3, atol=1e-3)
    assert sorted(loaded.backend._free) == [0, 1]
    loaded.backend.close()


def test_a_smaller_context_ends_sequences_there_and_sizes_the_cache(bundle, solo):
    from unbottle.core.serving.engine import SamplingParams, load_bundle

    prompt = PROMPTS[2]
    loaded = load_bundle(bundle, {"context": 12, "max_batch": 2, "threads": 1})
    assert loaded.context == 12 and loaded.backend.context == 12
    engine = loaded.engine()
    engine.start()
    try:
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert 2 < len(ids) < 12 - 2
        seq = engine.generate(ids, SamplingParams(max_tokens=NEW + 4, ignore_eos=True))
    finally:
        engine.stop()
    assert seq.finish_reason == "length" and seq.generated == solo[prompt][: 12 - len(ids)]


def test_the_openai_client_gets_llama_cpps_greedy_text(bundle, solo, tokenizer):
    with live_server(bundle, {"max_batch": 4}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        (model,) = client.models.list().data
        assert model.id == "tiny-q8"
        out = client.completions.create(
            model=model.id, prompt=PROMPTS, max_tokens=NEW, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        texts = {PROMPTS[c.index]: c.text for c in out.choices}
        for prompt in PROMPTS:
            assert texts[prompt] == tokenizer.decode(solo[prompt], skip_special_tokens=True)
        streamed = client.completions.create(
            model=model.id, prompt=PROMPTS[2], max_tokens=NEW, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert "".join(chunk.choices[0].text for chunk in streamed) == texts[PROMPTS[2]]
        # The same prompt again: all but its last token come from the cells of the last.
        counted = lambda: float(  # noqa: E731
            re.search(
                r"^unbottle_prompt_tokens_cached_total (\S+)$",
                httpx.get(f"{url}/metrics").text,
                re.M,
            )[1]
        )
        before = counted()
        again = client.completions.create(
            model=model.id, prompt=PROMPTS[2], max_tokens=NEW, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert again.choices[0].text == texts[PROMPTS[2]]
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert counted() - before == again.usage.prompt_tokens - 1
        chat = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "fox"}], max_tokens=4
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
            client.completions.create(model=model.id, prompt="fox " * 70, max_tokens=1)


def test_a_bare_gguf_file_is_served_with_its_own_tokenizer_and_stop_tokens(bundle, solo, tmp_path):
    """A directory holding only a .gguf file (one from elsewhere): the tokenizer and chat
    template come from the file, and a generation ends where llama.cpp ends it (its
    end-of-generation tokens, as llama-server and the deploy stage's runner stop)."""
    import shutil

    from unbottle.core.models.llama_cpp import file_end_of_generation
    from unbottle.core.serving.engine import SamplingParams, load_bundle
    from unbottle.core.serving.grammar import compile_grammar

    (gguf,) = bundle.glob("*.gguf")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(gguf, bare)
    loaded = load_bundle(bare, {"max_batch": 2, "threads": 1})
    stops = set(file_end_of_generation(gguf))
    assert stops and loaded.eos_token_ids == stops
    ids = loaded.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    engine = loaded.engine()
    engine.start()
    try:
        seq = engine.generate(ids, SamplingParams(max_tokens=NEW, ignore_eos=True))
        # A grammar over the file's own vocabulary (llama.cpp's logits, its tokenizer).
        grammar = compile_grammar("regex", "[a-z]{2,6} [0-9]")
        shaped = engine.generate(ids, SamplingParams(max_tokens=NEW + 8, grammar=grammar))
    finally:
        engine.stop()
    assert seq.generated == solo[PROMPTS[0]]
    assert re.fullmatch("[a-z]{2,6} [0-9]", shaped.text) and shaped.finish_reason == "stop"


def test_requests_done_at_their_first_token_or_cancelled_give_their_sequences_back(bundle):
    """max_tokens 1 ends a request at prefill, before it joins the batch, and a client
    that goes away cancels its request mid-flight: either way its llama.cpp sequence must
    be cleared and freed, or max_batch such requests would take every sequence and the
    next prompt would find none."""
    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

    loaded = load_bundle(bundle, {"max_batch": 2, "threads": 1})
    engine = loaded.engine(on_step=lambda rows: time.sleep(0.002))  # so a cancel lands mid-way
    engine.start()
    try:
        ids = loaded.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
        for _ in range(5):
            seq = engine.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True))
            assert seq.finish_reason == "length" and len(seq.generated) == 1
        started = threading.Semaphore(0)
        for _ in range(3):
            endless = Sequence(
                ids, SamplingParams(max_tokens=60, ignore_eos=True), lambda *a: started.release()
            )
            engine.submit([endless])
            assert started.acquire(timeout=30)  # it is decoding
            engine.cancel([endless])
            assert endless.finish_reason is None and len(endless.generated) < 60
        longer = engine.generate(ids, SamplingParams(max_tokens=NEW, ignore_eos=True))
    finally:
        engine.stop()
    assert longer.finish_reason == "length" and len(longer.generated) == NEW
    assert sorted(loaded.backend._free) == [0, 1]


def test_a_llama_cpp_cache_larger_than_free_memory_is_refused_before_loading(
    bundle, tmp_path, capsys, monkeypatch
):
    """llama.cpp allocates max_batch x context tokens of cache at start: the tiny model's
    float16 keys and values are 2 layers x 2 KV heads x (16 + 16) x 2 bytes = 256 bytes a
    token (SmolLM2-135M's 23,040, which llama.cpp's own log gives as 180 MiB for 8,192).
    More than the free memory is refused in one line that names the way out."""
    import psutil

    from unbottle.core.serving.engine import load_bundle

    class Memory:
        available = 100 * 1024

    monkeypatch.setattr(psutil, "virtual_memory", Memory)
    assert_one_line(
        cli(["serve", str(bundle), "--max-batch", "8"], tmp_path, capsys),
        r"^error: serve: llama\.cpp's cache of max_batch 8 x context 64 tokens needs 128\.0 "
        r"KiB \(256 B a token\), and 100\.0 KiB of memory is free; lower --context or "
        r"--max-batch$",
    )
    assert load_bundle(bundle, {"max_batch": 8, "context": 32}).context == 32  # 64 KiB fits


def test_llama_cpp_objects_left_open_at_exit_go_quietly(bundle):
    """The runner and the backend free llama.cpp's memory when collected. One still alive
    when the interpreter exits is collected after the modules' globals are gone, and its
    ``__del__`` must not print a traceback then."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from unbottle.core.models import llama_cpp\n"
        "from unbottle.core.serving import engine\n"
        "bundle = Path(sys.argv[1])\n"
        "runner = llama_cpp.LlamaCppRunner(bundle, threads=1)\n"
        "ids = torch.tensor([[1, 2, 3]])\n"
        "runner.generate(ids, torch.ones_like(ids), 2, eos_token_id=None)\n"
        "backend = engine.LlamaCppBackend(bundle, 1, 2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
