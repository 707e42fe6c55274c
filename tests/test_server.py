"""The OpenAI-compatible server: the official client, batching, bad input, load, shutdown.

A tiny model is finetuned once, deployed with the ``server`` target, and served by the
real app on uvicorn on a loopback port. Expected outputs come from transformers'
``generate`` on the same weights, one prompt at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import cli_env
from tests.serving_helpers import (
    assert_every_position_scored,
    assert_prefill_from_a_past_matches,
    deploy_target,
    finetuned_model,
    free_port,
    live_server,
)
from unbottle.core.data import prompts as task
from unbottle.core.huge_pages import TUNABLE, huge_page_environment

KEY = "test-key-123"
MODEL = "unbottle-finetuned"
QUESTIONS = [
    "Where does Alice live?",
    "What is the job of Bob?",
    "What pet does Carol have?",
    "When was Dan born?",
    "What is the favourite colour of Eve?",
    "Who lives in the town?",
]
PROMPTS = [task.prompt(q) for q in QUESTIONS] + ["Alice", "The pet of", "In 1990 a", "blue"]
LONGEST = 12


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("server-target") / "bundle"
    deploy_target("server", {}, finetuned_model(tmp_path_factory, tiny_data), out)
    return out


@pytest.fixture(scope="module")
def greedy(bundle) -> dict[str, list[int]]:
    """Each prompt's greedy continuation by transformers, alone, ignoring EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bundle).eval()
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            generated = model.generate(
                **ids,
                max_new_tokens=LONGEST,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        out[prompt] = generated[0, ids["input_ids"].shape[1] :].tolist()
    return out


@pytest.fixture(scope="module")
def tokenizer(bundle):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundle)


@pytest.fixture(scope="module")
def server(bundle) -> str:
    """The server as `unbottle serve` runs it: the engine in a child process."""
    with live_server(bundle, api_key=KEY) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- the client


def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_a_wrong_or_missing_key_is_refused_with_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.completions.create(model=MODEL, prompt="Alice", max_tokens=2)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        response = httpx.get(server + path)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server + "/health").json() == {"status": "ok"}  # no key needed


def test_completion_is_the_greedy_continuation(client, greedy, tokenizer):
    prompt = PROMPTS[0]
    reply = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text == text_of(tokenizer, greedy[prompt][:8])
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == prompt_tokens + 8
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # torch computes it whole


def test_chat_renders_the_bundles_chat_template(client, tokenizer, greedy):
    question = QUESTIONS[1]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=6,
        extra_body={"ignore_eos": True},
    )
    # One user message renders exactly as the finetuning prompt (core.task.prompt).
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text_of(tokenizer, greedy[task.prompt(question)][:6])
    assert reply.usage.prompt_tokens == len(
        tokenizer(task.prompt(question), add_special_tokens=False)["input_ids"]
    )


def test_streaming_gives_the_same_text_and_ends_with_done(client, server, greedy, tokenizer):
    prompt = PROMPTS[2]
    expected = text_of(tokenizer, greedy[prompt][:10])
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=10,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "length"

    chat = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTIONS[2]}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chat[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert content == expected
    assert chat[-1].usage.completion_tokens == 10 and chat[-1].choices == []

    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_sequences_cut_the_text_where_they_start(client, greedy, tokenizer):
    prompt = next(p for p in PROMPTS if len(text_of(tokenizer, greedy[p])) >= 6)
    full = text_of(tokenizer, greedy[prompt])
    stop = full[3:5]
    expected = full[: full.find(stop)]
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": LONGEST, "stop": [stop, "\x00never"]}
    reply = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_n_and_a_list_of_prompts_give_one_choice_each(client, greedy, tokenizer):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    assert texts == [text_of(tokenizer, greedy[p][:4]) for p in PROMPTS[:2] for _ in range(2)]
    assert reply.usage.completion_tokens == 16


def test_sampling_follows_the_seed_and_top_p(client, greedy, tokenizer):
    def sample(**kw) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt="Alice", max_tokens=12, extra_body={"ignore_eos": True}, **kw
            )
            .choices[0]
            .text
        )

    assert sample(temperature=1.5, seed=7) == sample(temperature=1.5, seed=7)
    assert sample(temperature=1.5, seed=7) != sample(temperature=1.5, seed=8)
    # A nucleus this small holds only the most likely token: greedy decoding.
    assert sample(temperature=1.0, top_p=1e-6, seed=3) == text_of(tokenizer, greedy["Alice"])


def nucleus_by_definition(logits, temperature: float, top_p: float):
    """(V,) probabilities: softmax(logits / T) cut to the smallest likeliest prefix whose
    mass reaches top_p, by a full sort, renormalized."""
    import torch

    probs = torch.softmax(logits / temperature, 0)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p
    keep[0] = True
    expected = torch.zeros_like(probs)
    expected[order[keep]] = ordered[keep] / ordered[keep].sum()
    return expected


def test_sampling_draws_from_the_tempered_nucleus_and_nothing_outside():
    import torch

    from unbottle.core.serving.engine import NUCLEUS_FIRST_K, SamplingParams, _choose

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 20_000
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8), (1.3, 0.95), (2.0, 0.5)):
        expected = nucleus_by_definition(logits, temperature, top_p)
        params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)
        generator = torch.Generator().manual_seed(0)
        drawn = torch.tensor([_choose(logits, params, generator) for _ in range(draws)])
        frequencies = torch.bincount(drawn, minlength=len(logits)) / draws
        assert (frequencies[expected == 0] == 0).all()
        # Binomial standard error at most 0.0035: 0.012 is past 3 of them.
        assert torch.allclose(frequencies, expected, atol=0.012), (temperature, top_p)
    # A flat distribution over a large vocabulary: the nucleus lies far past the first
    # NUCLEUS_FIRST_K tokens, and every draw falls in it, near its end too.
    wide = -torch.arange(20_000, dtype=torch.float32) * 1e-4
    expected = nucleus_by_definition(wide, 1.0, 0.5)
    size = int((expected > 0).sum())
    assert size > 8 * NUCLEUS_FIRST_K
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)
    generator = torch.Generator().manual_seed(1)
    drawn = [_choose(wide, params, generator) for _ in range(2_000)]
    assert max(drawn) < size and max(drawn) > 0.95 * size


# --------------------------------------------------------------------------- batching


def test_batched_greedy_tokens_equal_solo_tokens(bundle, greedy):
    """Requests that join and leave a running batch decode exactly what they decode alone."""
    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

    loaded = load_bundle(bundle)
    steps: list[int] = []
    engine = loaded.engine(on_step=steps.append)
    engine.start()
    try:
        prompt_ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        solo = [
            engine.generate(ids, SamplingParams(max_tokens=LONGEST, ignore_eos=True)).generated
            for ids in prompt_ids
        ]
        assert max(steps) == 1
        steps.clear()
        done = threading.Semaphore(0)
        lengths = [LONGEST - 2 * (i % 4) for i in range(len(PROMPTS))]  # leave at different steps
        seqs = [
            Sequence(
                ids,
                SamplingParams(max_tokens=n, ignore_eos=True),
                lambda seq, text, finish: finish and done.release(),
            )
            for ids, n in zip(prompt_ids, lengths, strict=True)
        ]
        for i, seq in enumerate(seqs):  # arrive while others are decoding
            engine.submit([seq])
            time.sleep(0.003 * (i % 3))
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert solo == [greedy[p] for p in PROMPTS]  # the engine alone is transformers' generate
    for seq, alone, n in zip(seqs, solo, lengths, strict=True):
        assert seq.generated == alone[:n]
    assert max(steps) > 1  # they really shared decode steps
    assert steps != sorted(steps)  # ...and the batch grew and shrank between steps


def test_a_prompt_reuses_the_cache_of_an_earlier_prompt_that_started_the_same_way(bundle, greedy):
    """The engine keeps each prompt's cache (up to ``prompt_cache_mb``), and a prompt that
    starts as an earlier one did computes only the rest: the same greedy tokens as
    transformers' ``generate`` from scratch, the reused count in ``cached_tokens``. Beyond
    the budget the least recently used prompt goes; off, nothing is kept."""
    from unbottle.core.serving.engine import Engine, SamplingParams, load_bundle

    loaded = load_bundle(bundle)
    encode = lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    params = SamplingParams(max_tokens=LONGEST, ignore_eos=True)

    def common(a: list[int], b: list[int]) -> int:
        return next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )

    engine = loaded.engine()
    engine.start()
    try:
        seen: list[list[int]] = []
        reused = []
        for prompt in PROMPTS:
            ids = encode(prompt)
            seq = engine.generate(ids, params)
            assert seq.generated == greedy[prompt], prompt
            reusable = max((common(ids, earlier) for earlier in seen), default=0)
            assert seq.cached_tokens == min(reusable, len(ids) - 1), prompt
            seen.append(ids)
            reused.append(seq.cached_tokens)
        assert sum(1 for n in reused if n > 0) >= 4  # the questions share their start
        again = engine.generate(seen[0], params)  # the whole prompt but its last token
        assert again.cached_tokens == len(seen[0]) - 1 and again.generated == greedy[PROMPTS[0]]
    finally:
        engine.stop()

    assert_prefill_from_a_past_matches(loaded.backend, seen[0], 4, atol=1e-5)
    assert_every_position_scored(loaded.backend, seen[0], 4, atol=1e-5)
    # A budget of one prompt's cache: a second prompt pushes the first out.
    _, cache = loaded.backend.prefill(seen[0])
    one = sum(t.nbytes for layer in cache for t in layer)
    small = Engine(loaded.backend, loaded.tokenizer, prompt_cache_bytes=one)
    off = load_bundle(bundle, {"prompt_cache": False}).engine()
    for engine in (small, off):
        engine.start()
        try:
            for prompt in (PROMPTS[0], "blue", PROMPTS[0]):
                seq = engine.generate(encode(prompt), params)
                assert seq.cached_tokens == 0 and seq.generated == greedy[prompt]
        finally:
            engine.stop()


def test_a_chats_next_turn_reuses_the_last_turns_prompt_and_answer(bundle, greedy):
    """A finished request's columns (its prompt and all its answer but the last token,
    which was never fed) are kept: a next turn that starts with them computes only the
    rest, with the tokens transformers' ``generate`` gives from scratch. The request ran
    beside another, so its columns came out of a padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

    loaded = load_bundle(bundle)
    encode = lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    engine = loaded.engine()
    engine.start()
    try:
        ids = encode(PROMPTS[0])
        beside = encode(PROMPTS[4])  # longer: the first request's row is padded
        assert len(beside) > len(ids)
        done = threading.Semaphore(0)
        turns = [
            Sequence(
                p,
                SamplingParams(max_tokens=n, ignore_eos=True),
                lambda seq, text, finish: finish and done.release(),
            )
            for p, n in ((beside, 12), (ids, 8))
        ]
        engine.submit(turns)
        for _ in turns:
            assert done.acquire(timeout=60)
        first = turns[1]
        assert first.generated == greedy[PROMPTS[0]][:8]
        # What is kept is what the held tokens compute from scratch.
        held = ids + first.generated[:-1]
        kept = engine._prompts.entries[tuple(held)]
        _, fresh = loaded.backend.prefill(held)
        for kept_layer, fresh_layer in zip(kept, fresh, strict=True):
            for a, b in zip(kept_layer, fresh_layer, strict=True):
                assert a.shape == b.shape and (a - b).abs().max() < 1e-4
        turn = ids + first.generated[:5] + encode(" blue")
        second = engine.generate(turn, SamplingParams(max_tokens=LONGEST, ignore_eos=True))
    finally:
        engine.stop()
    assert second.cached_tokens == len(ids) + 5
    model = AutoModelForCausalLM.from_pretrained(bundle).eval()
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([turn]), max_new_tokens=LONGEST, do_sample=False, eos_token_id=None,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )[0, len(turn) :].tolist()  # fmt: skip
    assert second.generated == expected


def test_a_long_prompt_is_computed_in_parts_between_the_running_rows_steps(bundle, greedy):
    """``prefill_chunk``: a prompt longer than it is computed a part per engine iteration,
    each part from the cache of the ones before, with a decode step of the running rows
    after each; its tokens, and theirs, are what each decodes alone from scratch."""
    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

    loaded = load_bundle(bundle, {"prefill_chunk": 3, "prompt_cache": False})
    encode = lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    long_prompt = PROMPTS[4]  # the longest question
    ids = encode(long_prompt)
    parts = -(-len(ids) // 3)
    assert parts >= 4 and len(encode("blue")) + parts + 8 < 64  # the tiny model's context
    waiting_steps: list[int] = []
    started = threading.Event()
    done = threading.Semaphore(0)
    late = Sequence(ids, SamplingParams(max_tokens=LONGEST, ignore_eos=True), lambda *a: None)

    def on_step(rows: int) -> None:
        if started.is_set() and not late.generated:
            waiting_steps.append(rows)

    computed: list[int] = []  # tokens each prefill call of the late prompt computed
    prefill = loaded.backend.prefill

    def counting_prefill(part, past=None, all_logits=False):
        if part == ids[: len(part)]:
            computed.append(len(part) - (past[0][0].shape[2] if past else 0))
        return prefill(part, past, all_logits)

    loaded.backend.prefill = counting_prefill
    engine = loaded.engine(on_step=on_step)
    engine.start()
    try:
        running = Sequence(  # decodes longer than the late prompt's parts take
            encode("blue"),
            SamplingParams(max_tokens=parts + 8, ignore_eos=True),
            lambda seq, text, finish: finish and done.release(),
        )
        engine.submit([running])
        deadline = time.monotonic() + 60
        while not running.generated:
            assert running.finish_reason is None and time.monotonic() < deadline
            time.sleep(0.001)
        late.sink = lambda seq, text, finish: finish and done.release()
        started.set()
        engine.submit([late])
        for _ in range(2):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert running.generated[:LONGEST] == greedy["blue"]
    assert late.generated == greedy[long_prompt]
    # The running row decoded once after each of the late prompt's parts but the last
    # (give or take the iteration it was submitted in), alone.
    assert parts - 1 <= len(waiting_steps) <= parts + 1 and set(waiting_steps) == {1}
    # Each part computed its own tokens only, after the cache of the parts before.
    assert computed == [3] * (len(ids) // 3) + ([len(ids) % 3] if len(ids) % 3 else [])


def test_the_prompt_store_keeps_the_recently_used_within_its_budget_and_count():
    import torch

    from unbottle.core.serving.engine import _PromptStore

    def cache(tokens: int) -> list[tuple[torch.Tensor, ...]]:  # one layer, 8 B a token
        return [(torch.zeros(1, 1, tokens, 1), torch.zeros(1, 1, tokens, 1))]

    store = _PromptStore(budget=8 * 100)
    store.put([1, 2, 3], cache(3))
    store.put([1, 2, 3, 4, 5], cache(5))  # the first starts this one: dropped
    assert list(store.entries) == [(1, 2, 3, 4, 5)] and store.bytes == 40
    past = store.longest([1, 2, 3, 9])
    assert past[0][0].shape == (1, 1, 3, 1)  # its start, sliced to what is shared
    assert store.longest([1, 2]) is not None and store.longest([7, 2]) is None
    store.put([7] * 96, cache(96))  # over the budget with the first: the first goes
    assert list(store.entries) == [(7,) * 96] and store.bytes == 768
    store.put([7] * 200, cache(200))  # larger than the budget: not kept
    assert list(store.entries) == [(7,) * 96]
    store = _PromptStore(budget=1 << 30)
    for i in range(_PromptStore.MOST + 6):
        store.put([i, i], cache(2))
    assert len(store.entries) == _PromptStore.MOST and (0, 0) not in store.entries
    store.longest([6, 6, 1])  # used: now the most recent
    store.put([999, 1], cache(2))
    assert (6, 6) in store.entries and (7, 7) not in store.entries


def test_a_cached_start_keeps_a_half_precision_models_dtype(bundle):
    """A bfloat16 model's cache is bfloat16: the prompt computed after a cached start
    must be written into buffers of that dtype, or attention gets float32 keys."""
    import torch

    from unbottle.core.serving.engine import load_backend

    backend = load_backend(bundle)
    backend.model.to(torch.bfloat16)
    ids = backend.model.config.vocab_size // 2 + torch.arange(20)
    assert_prefill_from_a_past_matches(backend, ids.tolist(), 8, atol=0.1)


def test_the_batch_cache_grows_by_doubling_and_keeps_its_columns():
    """A batch allocates room for its longest row (at least 256 columns), not the whole
    context (SmolLM2's 8,192 would be 377 MB a row), and a step that needs a column it
    lacks doubles it, up to the context, keeping every row's columns where they were."""
    import torch

    from unbottle.core.serving.engine import SamplingParams, Sequence, _Batch

    g = torch.Generator().manual_seed(0)
    long_kv = tuple(torch.randn(1, 2, 300, 4, generator=g) for _ in range(2))
    short_kv = tuple(torch.randn(1, 2, 5, 4, generator=g) for _ in range(2))
    for right_padded in (False, True):
        batch = _Batch(right_padded)
        for kv in (long_kv, short_kv):
            batch.add(
                Sequence([1] * kv[0].shape[2], SamplingParams(max_tokens=1), None), [kv], 1000
            )
        assert (batch.capacity, batch.width) == (512, 300)
        # Each row's own columns, copied out (what the prompt cache keeps of a row).
        for r, kv in enumerate((long_kv, short_kv)):
            assert all(torch.equal(a, b) for a, b in zip(batch.row_cache(r)[0], kv, strict=True))
        while batch.width < batch.capacity:  # steps, as the engine takes them
            batch.make_room(1000)
            batch.mask, batch.width = batch.next_mask(), batch.width + 1
        assert batch.capacity == 512
        batch.make_room(1000)
        assert batch.capacity == 1000  # the context caps the doubling
        short_at = slice(0, 5) if right_padded else slice(295, 300)
        keys, values = batch.buffers[0]
        assert torch.equal(keys[0, :, :300], long_kv[0][0])
        assert torch.equal(values[1, :, short_at], short_kv[1][0])
        assert batch.mask.sum(1).tolist() == [300 + 212, 5 + 212]


def test_serve_context_ends_sequences_and_refuses_prompts_beyond_it(bundle, greedy):
    """`context` (serve.json, `--context`) below the model's: a sequence ends there with
    "length", and a request that cannot fit is refused with the smaller limit."""
    from unbottle.core.serving.engine import SamplingParams, load_bundle

    prompt = PROMPTS[0]
    loaded = load_bundle(bundle, {"context": 40})
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert loaded.context == loaded.backend.context == 40 and len(ids) < 40 - 2
    engine = loaded.engine()
    engine.start()
    try:
        seq = engine.generate(ids, SamplingParams(max_tokens=LONGEST + 20, ignore_eos=True))
    finally:
        engine.stop()
    assert seq.finish_reason == "length" and seq.generated == greedy[prompt][: 40 - len(ids)]
    with live_server(bundle, {"context": 40, "engine_process": False}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 40 tokens"):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=20)


def test_load_400_requests_at_concurrency_16_lose_nothing(server, greedy, tokenizer):
    headers = {"Authorization": f"Bearer {KEY}"}
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + i % 9) for i in range(400)]

    async def run() -> list[tuple[int, dict]]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=60) as http:
            gate = asyncio.Semaphore(16)

            async def one(prompt: str, n: int) -> tuple[int, dict]:
                async with gate:
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "ignore_eos": True}
                    response = await http.post("/v1/completions", json=body, headers=headers)
                    return response.status_code, response.json()

            return await asyncio.gather(*(one(p, n) for p, n in jobs))

    started = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - started
    assert [status for status, _ in results] == [200] * 400
    ids = {body["id"] for _, body in results}
    assert len(ids) == 400
    for (prompt, n), (_, body) in zip(jobs, results, strict=True):
        assert body["choices"][0]["text"] == text_of(tokenizer, greedy[prompt][:n])
        assert body["usage"]["completion_tokens"] == n
    metrics = httpx.get(server + "/metrics", headers=headers).text
    ok = re.search(
        r'unbottle_requests_total\{endpoint="/v1/completions",status="200"\} (\S+)', metrics
    )
    assert ok and float(ok.group(1)) >= 400
    steps = float(re.search(r"unbottle_decode_batch_size_count (\S+)", metrics).group(1))
    rows = float(re.search(r"unbottle_decode_batch_size_sum (\S+)", metrics).group(1))
    assert rows / steps > 2, "concurrent requests should share decode steps"
    assert elapsed < 120


def test_metrics_are_prometheus_text(server):
    response = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "unbottle_requests_total",
        "unbottle_request_duration_seconds_bucket",
        "unbottle_time_to_first_token_seconds_bucket",
        "unbottle_prompt_tokens_total",
        "unbottle_generation_tokens_total",
        "unbottle_queue_depth",
        "unbottle_running_sequences",
    ):
        assert f"\n{name}" in response.text, name


# --------------------------------------------------------------------------- bad input

LONG_PROMPT = "Alice " * 100  # beyond the tiny model's 64-token context

BAD_REQUESTS = [
    ("not json", b"{not json", 400, None, "invalid_json"),
    ("a list body", b"[1, 2]", 400, None, "invalid_body"),
    ("no prompt", {"model": MODEL}, 400, "prompt", "invalid_value"),
    ("no model", {"prompt": "Alice"}, 400, "model", "invalid_value"),
    ("unknown model", {"model": "gpt-4", "prompt": "Alice"}, 404, "model", "model_not_found"),
    ("max_tokens 0", {"model": MODEL, "prompt": "Alice", "max_tokens": 0}, 400, "max_tokens", None),
    (
        "max_tokens too big",
        {"model": MODEL, "prompt": "A", "max_tokens": 65},
        400,
        "max_tokens",
        None,
    ),
    (
        "prompt + max_tokens over the context",
        {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 60},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "prompt longer than the context",
        {"model": MODEL, "prompt": LONG_PROMPT},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "max_tokens a string",
        {"model": MODEL, "prompt": "A", "max_tokens": "5"},
        400,
        "max_tokens",
        None,
    ),
    (
        "temperature above 2",
        {"model": MODEL, "prompt": "A", "temperature": 2.5},
        400,
        "temperature",
        None,
    ),
    (
        "temperature below 0",
        {"model": MODEL, "prompt": "A", "temperature": -1},
        400,
        "temperature",
        None,
    ),
    ("top_p 0", {"model": MODEL, "prompt": "A", "top_p": 0}, 400, "top_p", None),
    ("top_p above 1", {"model": MODEL, "prompt": "A", "top_p": 1.5}, 400, "top_p", None),
    ("n 0", {"model": MODEL, "prompt": "A", "n": 0}, 400, "n", None),
    ("n over the limit", {"model": MODEL, "prompt": "A", "n": 99}, 400, "n", None),
    ("five stops", {"model": MODEL, "prompt": "A", "stop": list("abcde")}, 400, "stop", None),
    ("an empty stop", {"model": MODEL, "prompt": "A", "stop": [""]}, 400, "stop", None),
    ("a numeric stop", {"model": MODEL, "prompt": "A", "stop": 3}, 400, "stop", None),
    ("an empty prompt", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ("a prompt of dicts", {"model": MODEL, "prompt": [{"a": 1}]}, 400, "prompt", None),
    ("token ids out of range", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", None),
    ("best_of 2", {"model": MODEL, "prompt": "A", "best_of": 2}, 400, "best_of", "unsupported"),
    (
        "a penalty above 2",
        {"model": MODEL, "prompt": "A", "presence_penalty": 2.5},
        400,
        "presence_penalty",
        None,
    ),
    (
        "a logit bias key not a token id",
        {"model": MODEL, "prompt": "A", "logit_bias": {"the": 5}},
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "a logit bias beyond 100",
        {"model": MODEL, "prompt": "A", "logit_bias": {"5": 101}},
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "a logit bias on 301 tokens",
        {"model": MODEL, "prompt": "A", "logit_bias": {str(i): 1 for i in range(301)}},
        400,
        "logit_bias",
        "invalid_value",
    ),
]

BAD_CHATS = [
    ("no messages", {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "a bad role",
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages.0.role",
        None,
    ),
    (
        "content a number",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages.0.content",
        None,
    ),
    (
        "a conversation longer than the context",
        {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [("/v1/completions", *case[1:]) for case in BAD_REQUESTS]
    + [("/v1/chat/completions", *case[1:]) for case in BAD_CHATS],
    ids=[case[0] for case in BAD_REQUESTS] + [f"chat: {case[0]}" for case in BAD_CHATS],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    server, path, body, status, param, code
):
    headers = {"Authorization": f"Bearer {KEY}"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server + path, content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    ok = httpx.post(
        server + "/v1/completions",
        json={"model": MODEL, "prompt": "Alice", "max_tokens": 2},
        headers=headers,
    )
    assert ok.status_code == 200


def test_error_messages_name_the_value_and_the_limit(server):
    headers = {"Authorization": f"Bearer {KEY}"}

    def message(body: dict) -> str:
        return httpx.post(server + "/v1/completions", json=body, headers=headers).json()["error"][
            "message"
        ]

    assert message({"model": MODEL, "prompt": "A", "max_tokens": 0}) == (
        "max_tokens: Input should be greater than or equal to 1 (got 0)"
    )
    assert message({"model": MODEL, "prompt": "A", "max_tokens": 100}) == (
        "max_tokens: 100 is more than this server's limit of 64"
    )
    assert re.fullmatch(
        r"This model's maximum context length is 64 tokens\. However, your prompt has \d+ "
        r"tokens, leaving no room to generate\.",
        message({"model": MODEL, "prompt": LONG_PROMPT}),
    )
    assert message({"model": "gpt-4", "prompt": "A"}) == (
        f"The model `gpt-4` does not exist; this server serves `{MODEL}`."
    )


def test_an_oversized_body_gets_413(bundle):
    with live_server(bundle, {"max_body_bytes": 4096, "engine_process": False}) as url:
        body = {"model": MODEL, "prompt": "A" * 5000}
        response = httpx.post(url + "/v1/completions", json=body)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        # Chunked, without a Content-Length: still cut off at the limit.
        chunks = (b"x" * 1024 for _ in range(8))
        response = httpx.post(url + "/v1/completions", content=chunks)
        assert response.status_code == 413
        assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "A"}).is_success


def test_a_full_queue_answers_429_and_recovers(bundle):
    with live_server(bundle, {"max_batch": 1, "max_queue": 1, "engine_process": False}) as url:
        body = {"model": MODEL, "prompt": "Alice", "max_tokens": 50, "ignore_eos": True}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                return await asyncio.gather(
                    *(http.post("/v1/completions", json=body) for _ in range(8))
                )

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        assert 1 <= statuses.count(200) <= 7
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200


# --------------------------------------------------------------------------- the CLI


def test_unbottle_serve_binds_loopback_reads_the_key_file_drains_on_sigterm_and_exits_0(
    bundle, tmp_path
):
    port = free_port()
    key_file = tmp_path / "api.key"
    key_file.write_text("file-key\n")
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unbottle",
            "serve",
            str(bundle),
            "--port",
            str(port),
            "--max-batch",
            "1",
            "--api-key-file",
            str(key_file),
            "--cors-origin",
            "http://app.example",
            "--threads",
            "3",  # a torch bundle's default is cores - 1: not 3 but on 4 cores
        ],
        env=cli_env({"COLUMNS": "200"}),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the engine process loads slowly on a busy machine
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "unbottle serve did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        if huge_page_environment({}) is not None:  # the machine can: weights on huge pages
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            assert children, "no engine process"
            for pid in [proc.pid, *map(int, children)]:  # the server, its engine process
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                tunables = [e[15:] for e in environ if e.startswith(b"GLIBC_TUNABLES=")]
                assert tunables, f"process {pid} runs without GLIBC_TUNABLES"
                assert TUNABLE.encode() in tunables[0].split(b":")
        headers = {"Authorization": "Bearer file-key"}
        assert httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"] == MODEL
        # CORS for the origin named, and for no other.
        ask = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        for origin, allowed in (("http://app.example", True), ("http://evil.example", False)):
            preflight = httpx.options(url + "/v1/completions", headers={"Origin": origin} | ask)
            assert preflight.headers.get("access-control-allow-origin") == (
                origin if allowed else None
            )

        # Six streams on one batch slot: most are still queued when SIGTERM arrives.
        body = {
            "model": MODEL,
            "prompt": "Alice",
            "max_tokens": 50,
            "stream": True,
            "ignore_eos": True,
        }
        results: list[list[str]] = [[] for _ in range(6)]
        accepted = [threading.Event() for _ in range(6)]

        def stream(i: int) -> None:
            with httpx.stream(
                "POST", url + "/v1/completions", json=body, headers=headers, timeout=60
            ) as response:
                assert response.status_code == 200
                accepted[i].set()  # the server sends the headers once the request is queued
                results[i].extend(line for line in response.iter_lines() if line)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for event in accepted:
            assert event.wait(30)
        proc.send_signal(signal.SIGTERM)
        finished_before_sigterm = sum(
            bool(lines) and lines[-1] == "data: [DONE]" for lines in results
        )
        for thread in threads:
            thread.join(60)
        # A clean drain is a success (uvicorn alone would re-raise the signal: 143).
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert finished_before_sigterm < 6
    for lines in results:  # every in-flight request finished
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    output = Path(log.name).read_text()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output
    assert f"serving {MODEL} (hf) with max_batch=1 on 3 thread(s)" in output
    assert "Application shutdown complete." in output
    with pytest.raises(httpx.TransportError):  # and then it stopped listening
        httpx.get(url + "/health")


def test_onnx_bundles_are_served_on_every_core_torch_on_all_but_one(monkeypatch):
    from unbottle.core.serving import engine

    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)
    assert [engine.default_threads(f) for f in ("genai", "onnx", "hf", "packed")] == [2, 2, 1, 1]
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 1)
    assert [engine.default_threads(f) for f in ("genai", "hf")] == [1, 1]


def test_server_target_writes_the_serve_config_and_card(bundle):
    from unbottle.core.serving.engine import read_serve_config

    config = read_serve_config(bundle)
    assert config.model_name == MODEL and config.host == "127.0.0.1"
    card = (bundle / "README.md").read_text()
    assert "unbottle serve path/to/this/bundle" in card and "| finetuned |" in card
    assert (bundle / "model.safetensors").is_file()


def test_serve_rejects_a_bad_bundle_or_flag_in_one_line(bundle, tmp_path):
    from tests.conftest import run_cli

    missing = run_cli("serve", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope'}: no such bundle directory"
    bad = run_cli("serve", str(bundle), "--max-batch", "0", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: serve: max_batch: Input should be greater than or equal to 1 (got 0)"
    )
    no_threads = run_cli("serve", str(bundle), "--threads", "0", cwd=tmp_path)
    assert no_threads.returncode == 2
    assert no_threads.stderr.strip() == (
        "error: serve: threads: Input should be greater than or equal to 1 (got 0)"
    )


def test_a_dead_engine_process_gives_503_not_a_hung_server(bundle):
    import psutil

    def engine_children() -> set[int]:
        me = psutil.Process()
        return {p.pid for p in me.children() if any("spawn_main" in part for part in p.cmdline())}

    before = engine_children()
    with live_server(bundle) as url:
        (engine_pid,) = engine_children() - before
        body = {"model": MODEL, "prompt": "Alice", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200
        psutil.Process(engine_pid).kill()
        psutil.Process(engine_pid).wait(30)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = httpx.post(url + "/v1/completions", json=body)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_down"
