"""Structured outputs: JSON that keeps to a schema, a regex, a choice, a grammar.

Through the official ``openai`` client against the real server: OpenAI's
``response_format`` (``json_object``, ``json_schema``) and vLLM's ``structured_outputs``
(``json``, ``regex``, ``choice``, ``grammar`` in Lark or GBNF). The constrained greedy
tokens are checked against the definition: transformers' logits, masked by llguidance's
own numpy mask of a matcher fed the same tokens, then argmax.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from tests.test_server import KEY, MODEL
from tests.test_server import bundle as bundle  # fixtures, shared: the served tiny model
from tests.test_server import client as client
from tests.test_server import server as server
from tests.test_server import tokenizer as tokenizer
from unbottle.core.serving.grammar import JSON_WHITESPACE

# The tiny model's context is 64 tokens: a short prompt leaves room for the answer.
PROMPT = "Alice:"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "city": {"enum": ["Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
# Short enough for a sampled answer to fit beside a chat template in 64 tokens.
PLACE = {
    "type": "object",
    "properties": {"city": {"enum": ["Rome", "Oslo"]}, "km": {"type": "integer", "maximum": 99}},
    "required": ["city", "km"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(bundle):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundle).eval()


def constrained_greedy(model, tokenizer, ids: list[int], kind: str, spec, most: int):
    """The greedy tokens under a grammar, by the definition: every step a full forward
    pass, the disallowed logits set to minus infinity by llguidance's numpy helpers,
    argmax, until the grammar stops, EOS, or ``most`` tokens."""
    import llguidance
    import llguidance.hf
    import llguidance.numpy
    import torch

    if kind == "json":  # with the server's default whitespace between JSON's tokens
        options = {"whitespace_pattern": JSON_WHITESPACE}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, overrides=options)
    else:
        grammar = llguidance.grammar_from(kind, spec)
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar)
    mask = llguidance.numpy.allocate_token_bitmask(1, len(tokenizer))
    out: list[int] = []
    while len(out) < most and not matcher.is_stopped():
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1:].numpy().copy()
        llguidance.numpy.fill_next_token_bitmask(matcher, mask)
        llguidance.numpy.apply_token_bitmask_inplace(logits, mask)
        token = int(logits.argmax())
        out.append(token)
        assert matcher.consume_token(token)
        if token == tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("json", PERSON),
        ("regex", r"[0-9]{3}-[a-z]{2,4}"),
        ("choice", ["Paris", "Rome", "somewhere else"]),
        ("grammar", 'root ::= "a" [0-9]{2} ("z" | "zz")'),  # llama.cpp's GBNF
    ],
)
def test_constrained_greedy_tokens_are_the_masked_argmax_and_logprobs_stay_the_models(
    client, model, tokenizer, kind, spec
):
    import torch

    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    expected = constrained_greedy(model, tokenizer, ids, kind, spec, most=56)
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=56,
        logprobs=0,
        extra_body={"structured_outputs": {kind: spec}},
    )
    choice = out.choices[0]
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    # The grammar's end ends the sequence: no further step to find an EOS.
    assert choice.finish_reason == "stop"
    assert out.usage.completion_tokens == len(expected)
    # The logprobs are the model's, before the mask (as vLLM's raw logprobs).
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + expected])).logits[0]
    raw = torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1 : -1]
    assert choice.logprobs.token_logprobs == pytest.approx(
        [float(row[t]) for row, t in zip(raw, expected, strict=True)], abs=1e-4
    )
    text = choice.text
    if kind == "json":
        jsonschema.validate(json.loads(text), PERSON)
    elif kind == "regex":
        assert re.fullmatch(spec, text)
    elif kind == "choice":
        assert text in spec
    else:
        assert re.fullmatch(r"a[0-9]{2}zz?", text)


def test_a_json_schema_response_keeps_to_the_schema_in_every_sampled_choice_and_stream(client):
    messages = [{"role": "user", "content": "Alice?"}]
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE}}
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=40,
        n=3,
        temperature=0.8,
        seed=7,
        response_format=response_format,
    )
    answers = [c.message.content for c in out.choices]
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PLACE)
    assert len(set(answers)) > 1  # sampled, and still each one valid
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=40,
        temperature=0.8,
        seed=7,
        response_format=response_format,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(streamed), PLACE)


def test_json_object_gives_an_object_and_lark_grammars_are_read(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Alice?"}],
        max_tokens=40,
        response_format={"type": "json_object"},
    )
    text = out.choices[0].message.content
    # A tiny model may run out of tokens inside the object; it never leaves the grammar.
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    lark = 'start: "Alice lives in " CITY "."\nCITY: "Paris" | "Oslo"'
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=20,
        extra_body={"structured_outputs": {"grammar": lark}},
    )
    assert out.choices[0].text in ("Alice lives in Paris.", "Alice lives in Oslo.")
    compact = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=40,
        extra_body={"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}},
    )
    text = compact.choices[0].text
    assert compact.choices[0].finish_reason == "stop"
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"},
            },
            "structured_outputs",
            "not both",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "2 kinds"),
        ({"structured_outputs": {"yaml": "a"}}, "structured_outputs", "unknown key 'yaml'"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex", "unclosed group"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
        (
            {"structured_outputs": {"json": {"type": "nonsense"}}},
            "structured_outputs.json",
            "nonsense",
        ),
        ({"structured_outputs": {"json": '{"type": '}}, "structured_outputs.json", "Expecting"),
        ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar", "foo"),
        (
            {"structured_outputs": {"json": PERSON, "disable_any_whitespace": "yes"}},
            "structured_outputs.disable_any_whitespace",
            "true or false",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "minProperties": "x"},
                    },
                }
            },
            "response_format.json_schema.schema",
            "minProperties",
        ),
    ],
)
def test_a_bad_structured_output_gets_one_400_naming_the_parameter(server, body, param, says):
    for path, request in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ):
        r = httpx.post(
            server + path,
            json={"model": MODEL, "max_tokens": 4, **request, **body},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and says in error["message"], error
        assert "\n" not in error["message"]


def test_a_grammar_that_fails_in_the_engine_fails_its_sequence_alone(bundle, tokenizer):
    from unbottle.core.serving.engine import SamplingParams, load_bundle
    from unbottle.core.serving.grammar import compile_grammar

    engine = load_bundle(bundle).engine()
    engine.start()
    try:
        ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        broken = engine.generate(ids, SamplingParams(max_tokens=8, grammar='{"grammars": 3}'))
        assert broken.finish_reason == "error"
        fine = engine.generate(
            ids, SamplingParams(max_tokens=8, grammar=compile_grammar("choice", ["yes", "no"]))
        )
        assert fine.finish_reason == "stop" and fine.text in ("yes", "no")
    finally:
        engine.stop()


def test_a_gguf_files_tokenizer_is_read_as_the_bytes_it_decodes_to(bundle, tmp_path):
    """transformers' tokenizer of a GGUF file decodes byte-level pieces through a
    sequence that llguidance takes for sentencepiece's: "Ġ" would be read as two letters,
    and the mask would refuse every space. The tokenizer is given its byte-level decoder."""
    from transformers import AutoTokenizer

    from tests.test_formats import deploy
    from unbottle.core.serving.grammar import Grammars, compile_grammar

    deploy("gguf", {"type": "F16"}, bundle, tmp_path / "gguf")
    (gguf,) = (tmp_path / "gguf").glob("*.gguf")
    from_file = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "lives in the city"
    ids = from_file(text, add_special_tokens=False)["input_ids"]
    assert from_file.decode(ids) == text
    grammars = Grammars(from_file, {from_file.eos_token_id})
    matcher = grammars.matcher(compile_grammar("regex", "[a-z]+( [a-z]+)*"))
    assert matcher.consume_tokens(ids) and matcher.is_accepting()
