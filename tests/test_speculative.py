"""Speculative decoding by prompt lookup (core/serving/speculative.py): the drafts, and
the engine's check of them, which must give the tokens plain decoding gives.

The backends' own checks (several tokens of one row in one call) are tested beside each
runtime's other tests: here torch; tests/test_onnx_bundle.py, tests/test_genai_bundle.py
and tests/test_serve_gguf.py for ONNX Runtime, genai's graph and llama.cpp.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli
from tests.serving_helpers import (
    assert_verify_matches_decode,
    deploy_target,
    finetuned_model,
    live_server,
)
from unbottle.core.data import prompts as task
from unbottle.core.serving.speculative import SpeculativeConfig, TokenHistory, draft_by_lookup

SPECULATIVE = {"num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = [
    task.prompt("Where does Alice live?"),
    task.prompt("What is the job of Bob?"),
    "Alice lives in the town. Alice lives in the",
    "blue blue blue blue",
]
NEW_TOKENS = 20


# --------------------------------------------------------------------------- drafts


def test_the_longest_run_found_earlier_drafts_what_followed_its_latest_occurrence():
    config = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    # "7 8 9" occurs at 0 (then 1 2 3) and at 5 (then 4 5 6): the latest wins.
    assert draft_by_lookup([7, 8, 9, 1, 2, 7, 8, 9, 4, 5, 6, 0, 7, 8, 9], config, 8) == [4, 5, 6]
    # The run of 3 is found nowhere earlier; "8 9" is, followed by 4.
    assert draft_by_lookup([8, 9, 4, 1, 7, 8, 9], config, 8) == [4, 1, 7]
    # Shorter runs only down to prompt_lookup_min; nothing found: no draft.
    two = SpeculativeConfig(prompt_lookup_max=3, prompt_lookup_min=2)
    assert draft_by_lookup([5, 1, 2, 3, 9, 5], two, 8) == []
    assert draft_by_lookup([5, 1, 2, 3, 9, 5], config, 8) == [1, 2, 3]
    # A draft runs into the tokens that matched: a repeating pattern continues.
    assert draft_by_lookup([1, 2, 1, 2], config, 8) == [1, 2]
    # At most `most` (room before max_tokens or the context) and num_speculative_tokens.
    assert draft_by_lookup([1, 2, 3, 4, 5, 1], config, 2) == [2, 3]
    assert draft_by_lookup([1, 2, 3, 4, 5, 1], config, 0) == []
    assert draft_by_lookup([1], config, 8) == []


def test_the_lookup_finds_what_a_scan_of_every_window_finds():
    """The lookup narrows to where the last token occurs; a plain scan is the definition."""
    import random

    config = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=1)

    def scan(tokens: list[int]) -> list[int]:
        for n in range(min(4, len(tokens) - 1), 0, -1):
            for start in range(len(tokens) - n - 1, -1, -1):  # windows before the last token
                if tokens[start : start + n] == tokens[-n:]:
                    return tokens[start + n : start + n + 4]
        return []

    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        assert draft_by_lookup(tokens, config, 8) == scan(tokens), tokens
    # A sequence's history grows with its answer: one array, converted token by token.
    history, prompt, generated = TokenHistory(), [5, 6, 7], []
    for t in range(600):
        generated.append(t % 7)
        assert history.extend(prompt, generated).tolist() == prompt + generated


def test_a_lookup_range_upside_down_is_refused():
    with pytest.raises(ValueError, match="prompt_lookup_min 4 is above prompt_lookup_max 2"):
        SpeculativeConfig(prompt_lookup_min=4, prompt_lookup_max=2)


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("speculative") / "bundle"
    deploy_target("server", {}, finetuned_model(tmp_path_factory, tiny_data), out)
    return out


@pytest.fixture(scope="module")
def prompt_ids(bundle) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle)
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def run(bundle: Path, prompts: list[list[int]], params, speculative=None, eos=None, **overrides):
    """Each prompt alone through an engine (``eos``: other end tokens than the bundle's):
    the sequences, the engine's step sizes, and its (drafted, accepted) counts."""
    from unbottle.core.serving.engine import load_bundle

    loaded = load_bundle(bundle, {"speculative": speculative, **overrides})
    steps: list[int] = []
    engine = loaded.engine(on_step=steps.append)
    engine.eos = eos or engine.eos
    engine.start()
    try:
        seqs = [engine.generate(ids, params) for ids in prompts]
    finally:
        engine.stop()
    return seqs, steps, (engine.drafted_tokens, engine.accepted_tokens)


def test_speculative_greedy_tokens_equal_plain_decoding_in_fewer_steps(bundle, prompt_ids):
    from unbottle.core.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    plain, plain_steps, counts = run(bundle, prompt_ids, params)
    assert counts == (0, 0) and len(plain_steps) == len(prompt_ids) * (NEW_TOKENS - 1)
    fast, steps, (drafted, accepted) = run(bundle, prompt_ids, params, SPECULATIVE)
    assert [s.generated for s in fast] == [s.generated for s in plain]
    assert [s.text for s in fast] == [s.text for s in plain]
    assert all(len(s.generated) == NEW_TOKENS and s.finish_reason == "length" for s in fast)
    # Each step yields its token and the draft's tokens the model chose.
    assert 0 < accepted <= drafted
    assert len(steps) == len(prompt_ids) * (NEW_TOKENS - 1) - accepted


@pytest.mark.parametrize(
    "choice",
    [
        {"temperature": 0.1, "top_p": 0.9, "seed": 3},  # the tiny model's peaked enough there
        {"presence_penalty": 0.3},
    ],
    ids=["sampled", "penalized"],
)
def test_speculation_chooses_the_tokens_plain_decoding_chooses(bundle, prompt_ids, choice):
    """One choice per token, from the scores plain decoding would use (one random draw
    each, when sampling): the same tokens, and the model's own logprobs. (The tiny
    model's plain greedy answers repeat one token, whose drafts are always right; these
    choices refuse some.)"""
    from unbottle.core.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2, **choice)
    plain, _, _ = run(bundle, prompt_ids, params)
    fast, steps, (drafted, accepted) = run(bundle, prompt_ids, params, SPECULATIVE)
    assert 0 < accepted < drafted  # drafts both kept and refused
    assert [s.generated for s in fast] == [s.generated for s in plain]
    assert len(steps) == len(prompt_ids) * (NEW_TOKENS - 1) - accepted
    for a, b in zip(fast, plain, strict=True):
        assert [t for t, _, _ in a.logprobs] == a.generated
        assert [lp for _, lp, _ in a.logprobs] == pytest.approx(
            [lp for _, lp, _ in b.logprobs], abs=1e-4
        )


def test_drafts_refused_whole_pause_drafting_for_longer_and_longer(bundle, prompt_ids, monkeypatch):
    """A refused draft costs its step more than a plain one: a sequence whose drafts keep
    being refused waits 1, 2, 4... plain steps before the next. Same tokens, fewer drafts."""
    import unbottle.core.serving.engine as engine_module
    from unbottle.core.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, presence_penalty=0.3)
    paused, _, (drafted, accepted) = run(bundle, prompt_ids, params, SPECULATIVE)
    monkeypatch.setattr(engine_module, "MOST_PAUSED_STEPS", 0)  # draft at every step
    eager, _, (drafted_eagerly, _) = run(bundle, prompt_ids, params, SPECULATIVE)
    assert [s.generated for s in paused] == [s.generated for s in eager]
    assert accepted > 0 and drafted < drafted_eagerly


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5])
def test_a_speculative_step_never_passes_max_tokens(bundle, prompt_ids, max_tokens):
    from unbottle.core.serving.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    plain, _, _ = run(bundle, prompt_ids, params)
    fast, _, _ = run(bundle, prompt_ids, params, SPECULATIVE)
    assert [s.generated for s in fast] == [s.generated for s in plain]
    assert {len(s.generated) for s in fast} == {max_tokens}


def test_stop_strings_eos_and_grammars_end_a_speculative_step_where_plain_decoding_ends(
    bundle, prompt_ids
):
    from unbottle.core.serving.engine import SamplingParams
    from unbottle.core.serving.grammar import compile_grammar

    plain_tokens, _, _ = run(bundle, prompt_ids, SamplingParams(max_tokens=NEW_TOKENS))
    # A stop string from the middle of each plain answer.
    for seq in plain_tokens:
        assert seq.text.strip(), "the tiny model answered nothing to stop in"
    stops = tuple({s.text.strip()[2:4] for s in plain_tokens})
    grammar = compile_grammar("regex", "[a-z ]{3,12}")
    # The tiny model writes no EOS: the token a penalized answer (whose drafts are partly
    # kept) writes first last stands in for one.
    penalized = SamplingParams(max_tokens=NEW_TOKENS, presence_penalty=0.3)
    answer = run(bundle, prompt_ids[:1], penalized, eos={-1})[0][0].generated
    eos = {max(set(answer), key=answer.index)}  # the token that first appears last
    for params, end in (
        (penalized, eos),
        (SamplingParams(max_tokens=NEW_TOKENS, stop=stops, ignore_eos=True), None),
        (SamplingParams(max_tokens=NEW_TOKENS, grammar=grammar), None),
    ):
        plain, _, _ = run(bundle, prompt_ids, params, eos=end)
        fast, _, (_, accepted) = run(bundle, prompt_ids, params, SPECULATIVE, eos=end)
        got = [(s.generated, s.text, s.finish_reason) for s in fast]
        assert got == [(s.generated, s.text, s.finish_reason) for s in plain]
        assert accepted > 0 and "stop" in {s.finish_reason for s in fast}


def test_under_a_grammar_the_tokens_it_forces_are_drafted_and_those_it_refuses_are_not(
    bundle, prompt_ids
):
    from transformers import AutoTokenizer

    from unbottle.core.serving.engine import SamplingParams
    from unbottle.core.serving.grammar import compile_grammar

    no_lookup = {"num_speculative_tokens": 4, "prompt_lookup_max": 64, "prompt_lookup_min": 64}
    forced = compile_grammar("regex", "Alice lives in the town of [a-z]{2,8}")
    params = SamplingParams(max_tokens=NEW_TOKENS, grammar=forced)
    plain, _, _ = run(bundle, prompt_ids, params)
    fast, steps, (drafted, accepted) = run(bundle, prompt_ids, params, no_lookup)
    assert [s.generated for s in fast] == [s.generated for s in plain]
    assert all(s.text.startswith("Alice lives in the town of") for s in fast)
    assert 0 < accepted <= drafted  # the literal, drafted by the grammar alone
    assert len(steps) == sum(len(s.generated) - 1 for s in fast) - accepted

    # A draft is cut where the grammar refuses it: a lookup in a prompt of digits drafts
    # digits, which an answer of letters never takes.
    from unbottle.core.serving.engine import Sequence, load_bundle

    tokenizer = AutoTokenizer.from_pretrained(bundle)
    digits = tokenizer("1 2 3 1 2 3 1 2", add_special_tokens=False)["input_ids"]
    loaded = load_bundle(bundle, {"speculative": SPECULATIVE})
    engine = loaded.engine()  # not started: its draft for a sequence, as a step asks it
    drafts = {}
    for pattern in (None, "[0-9 ]{1,40}", "[a-z]{8}"):
        grammar = compile_grammar("regex", pattern) if pattern else None
        seq = Sequence(digits, SamplingParams(max_tokens=NEW_TOKENS, grammar=grammar), None)
        if grammar is not None:
            seq._matcher = engine.grammars.matcher(grammar)
        drafts[pattern] = engine._draft(seq)
    assert tokenizer.decode(drafts[None]).strip().startswith("3")
    assert drafts["[0-9 ]{1,40}"] == drafts[None] and drafts["[a-z]{8}"] == []


def test_a_speculated_answer_is_kept_for_the_next_turn_as_if_decoded_plainly(bundle, prompt_ids):
    """The prompt cache keeps a finished answer's columns for a chat's next turn: after a
    speculative answer they must be the columns of the tokens it kept, not of a draft."""
    from unbottle.core.serving.engine import SamplingParams

    first = SamplingParams(max_tokens=12, ignore_eos=True)
    answers, _, _ = run(bundle, prompt_ids[2:], first, SPECULATIVE)
    follow = [
        ids + seq.generated + ids[:3] for ids, seq in zip(prompt_ids[2:], answers, strict=True)
    ]
    then = SamplingParams(max_tokens=6, ignore_eos=True)

    from unbottle.core.serving.engine import load_bundle

    loaded = load_bundle(bundle, {"speculative": SPECULATIVE})
    engine = loaded.engine()
    engine.start()
    try:
        for ids, answer, nxt in zip(prompt_ids[2:], answers, follow, strict=True):
            again = engine.generate(ids, first)  # the answer again, kept when it finishes
            assert again.generated == answer.generated
            turn = engine.generate(nxt, then)
            assert turn.cached_tokens == len(ids) + len(answer.generated) - 1
            fresh, _, _ = run(bundle, [nxt], then, prompt_cache=False)
            assert turn.generated == fresh[0].generated
    finally:
        engine.stop()


def test_only_a_lone_sequence_speculates(bundle, prompt_ids):
    """Sequences decoding together take plain steps, one token each, and get plain
    decoding's tokens; once one is left it speculates."""
    from unbottle.core.serving.engine import SamplingParams, Sequence, load_bundle

    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    plain, _, _ = run(bundle, prompt_ids, params)
    loaded = load_bundle(bundle, {"speculative": SPECULATIVE})
    steps: list[int] = []
    engine = loaded.engine(on_step=steps.append)
    done = threading.Semaphore(0)
    seqs = [
        Sequence(
            ids, SamplingParams(max_tokens=n, ignore_eos=True), lambda s, t, f: f and done.release()
        )
        for ids, n in zip(prompt_ids, [NEW_TOKENS, 4, 4, 4], strict=True)
    ]
    engine.submit(seqs)  # before the engine starts: all four are admitted together
    engine.start()
    try:
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert steps[:3] == [4, 4, 4]  # the short ones leave after their third step
    assert engine.accepted_tokens > 0 and set(steps[3:]) == {1}
    assert seqs[0].generated == plain[0].generated
    assert [s.generated for s in seqs[1:]] == [s.generated[:4] for s in plain[1:]]


def test_a_cache_that_cannot_drop_positions_does_not_speculate(bundle, caplog):
    """A recurrent model's state (llama.cpp's Mamba, RWKV, hybrids) cannot take back a
    refused draft's positions: its engine decodes plainly and says why."""
    from unbottle.core.serving.engine import Engine, load_bundle
    from unbottle.core.serving.speculative import SpeculativeConfig

    loaded = load_bundle(bundle)
    backend = loaded.backend
    assert backend.rewinds
    backend.rewinds = False  # as LlamaCppBackend says of a recurrent model
    engine = Engine(backend, loaded.tokenizer, speculative=SpeculativeConfig())
    assert engine.speculative is None
    assert "cannot drop the positions of refused drafts" in caplog.text


def test_the_torch_backends_check_gives_one_decode_step_per_token(bundle, prompt_ids):
    from unbottle.core.serving.engine import load_backend

    assert_verify_matches_decode(load_backend(bundle), prompt_ids[0], [5, 9, 11, 5], atol=1e-5)


# --------------------------------------------------------------------------- the server


def test_the_server_counts_drafted_and_accepted_tokens(bundle, prompt_ids):
    overrides = {"speculative": SPECULATIVE, "model_name": "m"}
    with live_server(bundle, overrides) as url:
        body = {"model": "m", "prompt": PROMPTS[3], "max_tokens": 12, "ignore_eos": True}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 12
        metrics = httpx.get(url + "/metrics").text
    counts = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("unbottle_spec_decode_")
    }
    drafted = counts["unbottle_spec_decode_drafted_tokens_total"]
    assert 0 < counts["unbottle_spec_decode_accepted_tokens_total"] <= drafted


def test_the_server_target_writes_speculation_into_the_bundles_serve_json(
    tmp_path, tmp_path_factory, tiny_data
):
    """``deploy: {target: server, speculative: {...}}`` ships the setting with the bundle:
    ``unbottle serve`` then speculates without a flag."""
    import json

    from unbottle.core.serving.engine import load_bundle

    out = tmp_path / "deployed"
    model = finetuned_model(tmp_path_factory, tiny_data)
    deploy_target("server", {"speculative": SPECULATIVE}, model, out)
    written = json.loads((out / "serve.json").read_text())["speculative"]
    assert written == {"method": "ngram", **SPECULATIVE}
    engine = load_bundle(out).engine()
    assert engine.speculative is not None and engine.speculative.num_speculative_tokens == 4
    assert """--speculative-config '{"method": "ngram"}'""" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("{method: ngram}", "--speculative-config: not JSON"),
        ("[3]", "--speculative-config: give a JSON object, not list"),
        ('{"method": "eagle"}', "serve: speculative.method: Input should be 'ngram'"),
        ('{"num_speculative_tokens": 0}', "serve: speculative.num_speculative_tokens:"),
        ('{"prompt_lookup_min": 5}', "prompt_lookup_min 5 is above prompt_lookup_max 3"),
        ('{"ngram": 3}', "serve: speculative.ngram: Extra inputs are not permitted"),
    ],
)
def test_a_bad_speculative_config_is_one_line_and_exit_2(bundle, tmp_path, option, message):
    result = run_cli("serve", str(bundle), "--speculative-config", option, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
