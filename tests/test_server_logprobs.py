"""Log-probabilities from the server, and what they are for: lm-evaluation-harness's
``local-completions`` model scoring a served bundle.

The logprobs of generated tokens (a completion's ``logprobs``, a chat's ``logprobs`` and
``top_logprobs``), of prompt tokens (``echo``), and vLLM's tokenizer endpoints are checked
against transformers on the same weights, through the official ``openai`` client against
the real server. Then lm-eval scores a local task through the server and through its own
Hugging Face model, and the two agree.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import require_extra
from tests.test_lm_eval import CHOICE_TASK, QA_TASK
from tests.test_server import KEY, MODEL
from tests.test_server import bundle as bundle  # fixtures, shared: the served tiny model
from tests.test_server import client as client
from tests.test_server import server as server
from tests.test_server import tokenizer as tokenizer
from unbottle.core.data import prompts as task

PROMPT = task.prompt("Where does Alice live?")
TOL = 1e-4


@pytest.fixture(scope="module")
def model(bundle):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundle).eval()


def log_softmax(model, ids: list[int]):
    """(len(ids), V) log-probabilities of the token after each position."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def greedy_ids(model, ids: list[int], new: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def top(scores, k: int) -> list[tuple[int, float]]:
    values, ids = scores.topk(k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


# --------------------------------------------------------------------------- logprobs


def test_a_completions_logprobs_are_the_models_and_name_its_likeliest_tokens(
    client, model, tokenizer
):
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    new = greedy_ids(model, ids, 6)
    scores = log_softmax(model, ids + new)[len(ids) - 1 : -1]  # (6, V), one per new token
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=3, extra_body={"ignore_eos": True}
    )
    logprobs = out.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in new]
    assert logprobs.token_logprobs == pytest.approx(
        [float(s[t]) for s, t in zip(scores, new, strict=True)], abs=TOL
    )
    for s, token, named in zip(scores, new, logprobs.top_logprobs, strict=True):
        expected = {tokenizer.decode([t]): lp for t, lp in top(s, 3)}
        expected.setdefault(tokenizer.decode([token]), float(s[token]))  # OpenAI's + 1
        assert named == pytest.approx(expected, abs=TOL)
        # Greedy: the chosen token is the likeliest (lm-eval's is_greedy test).
        assert max(named.values()) == named[tokenizer.decode([token])]
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(new))
    ]
    assert out.choices[0].text == tokenizer.decode(new)


def test_echo_gives_the_prompt_and_its_tokens_logprobs_whatever_the_cache_holds(
    client, model, tokenizer
):
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    scores = log_softmax(model, ids)
    expected = [float(scores[i - 1, ids[i]]) for i in range(1, len(ids))]
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=1)
    assert plain.choices[0].logprobs is None
    # The prompt was just computed and cached: an echo with logprobs computes it again,
    # since its cached positions hold no logits.
    for _ in range(2):
        out = client.completions.create(
            model=MODEL, prompt=ids, max_tokens=1, logprobs=1, echo=True
        )
        choice = out.choices[0]
        assert choice.text == tokenizer.decode(ids) + plain.choices[0].text
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) + 1
        assert logprobs.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=TOL)
        assert out.usage.prompt_tokens_details.cached_tokens == 0
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True)
    assert (
        echoed.choices[0].text
        == PROMPT
        + client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text
    )
    assert echoed.choices[0].logprobs is None


def test_a_chats_logprobs_hold_each_tokens_bytes_and_its_likeliest_alternatives(
    client, model, tokenizer
):
    messages = [{"role": "user", "content": "Where does Alice live?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    new = greedy_ids(model, ids, 5)
    scores = log_softmax(model, ids + new)[len(ids) - 1 : -1]
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert [e.token for e in content] == [tokenizer.decode([t]) for t in new]
    assert b"".join(bytes(e.bytes) for e in content).decode() == out.choices[0].message.content
    for entry, s, token in zip(content, scores, new, strict=True):
        assert entry.logprob == pytest.approx(float(s[token]), abs=TOL)
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [
            (tokenizer.decode([t]), pytest.approx(lp, abs=TOL)) for t, lp in top(s, 2)
        ]
    without = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert without.choices[0].logprobs is None
    bare = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, logprobs=True
    )
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], []]


def test_streamed_logprobs_add_up_to_the_whole_responses(client):
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=2, echo=True
    )
    tokens, logprobs, text = [], [], ""
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=2, echo=True, stream=True
    ):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
    assert text == whole.choices[0].text
    assert tokens == whole.choices[0].logprobs.tokens
    assert logprobs == whole.choices[0].logprobs.token_logprobs

    messages = [{"role": "user", "content": "What pet does Carol have?"}]
    asked = dict(model=MODEL, messages=messages, max_tokens=8, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**asked)
    streamed = [
        entry
        for chunk in client.chat.completions.create(**asked, stream=True)
        for choice in chunk.choices
        if choice.logprobs is not None
        for entry in choice.logprobs.content
    ]
    assert streamed == whole.choices[0].logprobs.content


def test_an_engine_scores_a_prompt_computed_in_parts_and_never_from_the_prompt_cache(
    bundle, model, tokenizer
):
    """In the engine itself (no server): prompt logprobs from a prompt computed 3 tokens
    at a time, with a cached start of it held; the generated tokens' logprobs too."""
    from unbottle.core.serving.engine import SamplingParams, load_bundle

    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    new = greedy_ids(model, ids, 4)
    scores = log_softmax(model, ids + new)  # (n + 4, V)
    loaded = load_bundle(bundle, {"prefill_chunk": 3, "engine_process": False})
    engine = loaded.engine()
    engine.start()
    try:
        engine.generate(ids, SamplingParams(max_tokens=1))  # cached now
        scored = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
        seq = engine.generate(ids, scored)
    finally:
        engine.stop()
    assert seq.cached_tokens == 0 and seq.generated == new
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(ids)
    for i, (token, logprob, best) in enumerate(seq.prompt_logprobs[1:], start=1):
        assert token == ids[i]
        assert logprob == pytest.approx(float(scores[i - 1, token]), abs=TOL)
        assert [t for t, _ in best] == [t for t, _ in top(scores[i - 1], 1)]
    for i, (token, logprob, best) in enumerate(seq.logprobs):
        row = scores[len(ids) - 1 + i]
        assert token == new[i] and logprob == pytest.approx(float(row[token]), abs=TOL)
        assert [t for t, _ in best] == [t for t, _ in top(row, 2)]
        assert [lp for _, lp in best] == pytest.approx([lp for _, lp in top(row, 2)], abs=TOL)


def penalized_greedy(model, ids: list[int], new: int, frequency=0.0, presence=0.0, bias=None):
    """Greedy tokens with OpenAI's penalties on the tokens generated so far and a logit
    bias, one full forward per token (the definition, not the engine's arithmetic)."""
    generated: list[int] = []
    for _ in range(new):
        scores = log_softmax(model, ids + generated)[-1].clone()  # a shift; argmax alike
        for token in set(generated):
            scores[token] -= frequency * generated.count(token) + presence
        for token, value in (bias or {}).items():
            scores[token] += value
        generated.append(int(scores.argmax()))
    return generated


def test_penalties_and_logit_bias_change_the_tokens_as_openai_defines_them(
    client, model, tokenizer
):
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    plain = greedy_ids(model, ids, 10)
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself: something to penalize

    def served(**kw) -> str:
        extra = {"ignore_eos": True}
        return (
            client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=10, extra_body=extra, **kw
            )
            .choices[0]
            .text
        )

    for kw in ({"frequency": 1.5}, {"presence": 2.0}, {"frequency": 0.5, "presence": -0.5}):
        expected = penalized_greedy(model, ids, 10, **kw)
        assert expected != plain, kw
        got = served(
            frequency_penalty=kw.get("frequency", 0.0), presence_penalty=kw.get("presence", 0.0)
        )
        assert got == tokenizer.decode(expected), kw
    banned = {plain[0]: -100.0, plain[1]: -100.0}
    expected = penalized_greedy(model, ids, 10, bias=banned)
    assert plain[0] not in expected and plain[1] not in expected
    assert served(logit_bias={str(t): b for t, b in banned.items()}) == tokenizer.decode(expected)
    forced = tokenizer.convert_tokens_to_ids("e") if "e" in tokenizer.get_vocab() else 50
    assert served(logit_bias={str(forced): 100}) == tokenizer.decode([forced] * 10)
    # The logprobs stay the model's own, before penalties and bias.
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, logprobs=0, logit_bias={str(forced): 100}
    )
    scores = log_softmax(model, ids)[-1]
    assert out.choices[0].logprobs.token_logprobs[0] == pytest.approx(
        float(scores[forced]), abs=TOL
    )


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "A", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "A", "logprobs": -1}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ],
    ids=["over the limit", "negative", "top without logprobs", "top over 20", "chat: a number"],
)
def test_bad_logprobs_get_one_error_naming_the_parameter(server, path, body, param):
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    response = httpx.post(
        server + path,
        json={"model": MODEL, **body},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert param in error["message"]


# --------------------------------------------------------------------------- tokenizer


def test_the_tokenizer_endpoints_agree_with_the_bundles_tokenizer(server, tokenizer):
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(server + path, json=body, headers=headers)

    ids = tokenizer(PROMPT)["input_ids"]
    out = post("/tokenize", {"model": MODEL, "prompt": PROMPT}).json()
    assert out == {"count": len(ids), "max_model_len": 64, "tokens": ids}
    messages = [{"role": "user", "content": "hi"}]
    chat = post("/tokenize", {"messages": messages}).json()["tokens"]
    assert chat == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert post("/detokenize", {"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    info = httpx.get(server + "/tokenizer_info", headers=headers).json()
    assert info["eos_token"] == tokenizer.eos_token
    assert info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == 64

    assert httpx.post(server + "/tokenize", json={"prompt": "A"}).status_code == 401
    for path, body, param in [
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/tokenize", {"prompt": "A", "messages": messages}, None),
        ("/tokenize", {}, None),
        ("/tokenize", {"messages": messages, "add_special_tokens": True}, "add_special_tokens"),
        ("/tokenize", {"prompt": 5}, "prompt"),
    ]:
        response = post(path, body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param
    assert post("/tokenize", {"model": "gpt-4", "prompt": "A"}).status_code == 404


# --------------------------------------------------------------------------- lm-eval


def test_lm_eval_scores_a_served_bundle_as_it_scores_the_model_itself(
    server, bundle, tmp_path, monkeypatch
):
    """lm-eval's ``local-completions`` (the server's logprobs with ``echo``, its tokenizer
    endpoints, its generations) against lm-eval's own ``hf`` model on the same weights."""
    require_extra("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    qa = [
        ("Where does Alice live?", "Paris", "Rome"),
        ("What is the job of Bob?", "baker", "pilot"),
        ("What pet does Carol have?", "a cat", "a dog"),
        ("When was Dan born?", "1990", "1066"),
    ]
    choices = tmp_path / "choice.jsonl"
    choices.write_text(
        "".join(json.dumps({"question": q, "choices": [a, b], "label": 0}) + "\n" for q, a, b in qa)
    )
    answers = tmp_path / "qa.jsonl"
    answers.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a, _ in qa))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=choices))
    (tasks / "qa.yaml").write_text(QA_TASK.format(data=answers))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # lm-eval's API models send it as the bearer

    def evaluate(model: str, model_args: dict) -> dict:
        return simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=["people_choice", "people_qa"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )

    served = evaluate(
        "local-completions",
        {
            "base_url": f"{server}/v1/completions",
            "model": MODEL,
            "tokenizer_backend": "remote",
            "auth_token": KEY,
            "max_length": 64,
        },
    )
    # On the bundle as deployed: its generation_config.json sets no length, which
    # transformers would prefer to the max_length lm-eval's hf model passes for the task.
    own = evaluate("hf", {"pretrained": str(bundle), "max_length": 64, "device": "cpu"})

    def responses(results: dict, name: str) -> list:
        return [s["resps"] for s in sorted(results["samples"][name], key=lambda s: s["doc_id"])]

    # Each choice's log-likelihood and whether it is the greedy continuation.
    for got, want in zip(
        responses(served, "people_choice"), responses(own, "people_choice"), strict=True
    ):
        assert [r[0][0] for r in got] == pytest.approx([r[0][0] for r in want], abs=1e-3)
        assert [r[0][1] for r in got] == [r[0][1] for r in want]
    assert responses(served, "people_qa") == responses(own, "people_qa")
    for name, metric in (("people_choice", "acc,none"), ("people_qa", "exact_match,none")):
        assert served["results"][name][metric] == own["results"][name][metric]
