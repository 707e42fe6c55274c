"""Tool calls a client forces (``tool_choice``: a named function, or ``"required"``), and
conversations that carry calls and their results, through the official ``openai`` client
against the real server.

The bundle is the served tiny model given a chat template that knows tools: it lists the
tools, writes an assistant's calls as name and arguments, and a tool's result.
"""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest

from tests.serving_helpers import live_server
from tests.test_server import bundle as bundle  # a fixture, shared: the served tiny model

MODEL = "tools"
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Rome", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "maximum": 9}, "b": {"type": "integer", "maximum": 9}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "wx", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]
SCHEMAS = {"wx": WEATHER, "add": ADD}
TEMPLATE = (
    "{%- if tools -%}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "{{ '\\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}Question: {{ m.content }}{{ '\\n' }}"
    "{%- elif m.role == 'assistant' -%}Answer: "
    "{%- if m.tool_calls -%}{%- for c in m.tool_calls -%}"
    "{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "{%- endfor -%}{%- else -%}{{ m.content }}{%- endif -%}{{ eos_token }}"
    "{%- elif m.role == 'tool' -%}Result {{ m.tool_call_id }}: {{ m.content }}{{ '\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}Answer:{%- endif -%}"
)
ASK = [{"role": "user", "content": "Rome?"}]
#: An assistant turn that called wx, its arguments a JSON string as OpenAI sends them.
CALLED_WX = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "wx", "arguments": '{"city": "Rome"}'},
        }
    ],
}


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    tools_bundle = tmp_path_factory.mktemp("tools") / "bundle"
    shutil.copytree(bundle, tools_bundle)
    (tools_bundle / "chat_template.jinja").write_text(TEMPLATE)
    # Room for the tools' line and a call: the tiny Llama's rotary positions go past the
    # 64 it was configured with (its outputs there are as random as anywhere).
    config = json.loads((tools_bundle / "config.json").read_text())
    config["max_position_embeddings"] = 160
    (tools_bundle / "config.json").write_text(json.dumps(config))
    with live_server(tools_bundle, {"model_name": MODEL}) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_a_named_function_is_called_with_arguments_that_keep_to_its_schema(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "wx"}},
        max_tokens=30,
    )
    choice = out.choices[0]
    assert choice.message.content is None and choice.finish_reason == "stop"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "wx" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "wx"}},
        max_tokens=30,
        stream=True,
    )
    deltas = [c.choices[0] for c in streamed if c.choices]
    # As OpenAI streams them: the first delta names the call, the next extend its arguments.
    pieces = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert len(pieces) > 2 and pieces[0].function.name == "wx" and pieces[0].id
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in pieces[1:])
    # Greedy: the same arguments, piece by piece.
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
    assert deltas[-1].finish_reason == "stop"
    assert not any(d.delta.content for d in deltas)


def test_required_calls_one_or_more_of_the_tools_each_with_its_own_arguments(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=80,
        n=3,
        temperature=0.8,
        seed=11,
    )
    names = set()
    for choice in out.choices:
        if choice.finish_reason == "length":  # the tiny model's context ran out first
            assert choice.message.tool_calls is None
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            names.add(call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert names  # at least one choice completed its calls
    # Streamed, the calls come whole in one delta (an array's items are known once it is
    # parsed), then the finish; the same seed gives the same calls.
    asked = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80)
    whole = client.chat.completions.create(**asked, temperature=0.8, seed=3)
    streamed = client.chat.completions.create(**asked, temperature=0.8, seed=3, stream=True)
    deltas = [c.choices[0] for c in streamed if c.choices]
    (pieces,) = [d.delta.tool_calls for d in deltas if d.delta.tool_calls]
    assert [(p.function.name, p.function.arguments) for p in pieces] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
    ]
    assert deltas[-1].finish_reason == whole.choices[0].finish_reason == "tool_calls"
    # OpenAI's parallel_tool_calls false: exactly one call, every time.
    single = client.chat.completions.create(
        **asked, temperature=1.0, seed=5, n=4, parallel_tool_calls=False
    )
    completed = [c for c in single.choices if c.finish_reason != "length"]
    assert completed and all(len(c.message.tool_calls) == 1 for c in completed)


def test_a_conversation_carries_calls_and_results_to_the_template(server, bundle):
    """An assistant turn with tool_calls (content null, arguments a JSON string) and the
    tool's answer reach the template as transformers' templates take them: the arguments
    as an object."""
    from transformers import AutoTokenizer

    turns = [
        *ASK,
        CALLED_WX,
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    r = httpx.post(
        f"{server}/tokenize", json={"model": MODEL, "messages": turns, "tools": TOOLS}, timeout=30
    )
    assert r.status_code == 200, r.text
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    text = tokenizer.decode(r.json()["tokens"])
    assert text == (
        'Tools: wx add\nQuestion: Rome?\nAnswer:wx{"city": "Rome"}'
        f"{tokenizer.eos_token}Result call_1: 18C\nAnswer:"
    )
    # And a chat completion on it answers in words when no call is forced.
    reply = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": turns, "tools": TOOLS, "tool_choice": "none"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"].get("tool_calls") is None


def test_a_template_that_ignores_tools_gets_them_in_a_system_turn(bundle):
    """The served tiny model's own template (question and answer) renders no tools: the
    server writes them into a system turn, and an earlier call as its JSON, so the model
    sees what it may call and what it called."""
    from transformers import AutoTokenizer

    turns = [
        *ASK,
        CALLED_WX,
        {"role": "user", "content": "And 2 + 3?"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    with live_server(bundle, {"model_name": MODEL}) as url:
        r = httpx.post(
            f"{url}/tokenize", json={"model": MODEL, "messages": turns, "tools": TOOLS}, timeout=30
        )
        assert r.status_code == 200, r.text
        text = tokenizer.decode(r.json()["tokens"])
        plain = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": ASK}, timeout=30)
        assert tokenizer.decode(plain.json()["tokens"]) == "Question: Rome?\nAnswer:"
    system, rest = text.split("\nQuestion: Rome?\n")
    assert system.startswith("You can call these tools")
    listed = [json.loads(line) for line in system.splitlines()[1:]]
    assert [(t["name"], t["parameters"]) for t in listed] == [("wx", WEATHER), ("add", ADD)]
    assert listed[1]["description"] == "a + b"
    assert rest == (
        'Answer: {"name": "wx", "parameters": {"city": "Rome"}}'
        f"{tokenizer.eos_token}Question: And 2 + 3?\nAnswer:"
    )


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"tools": TOOLS}, "tool_choice", '"auto"'),
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "tool-call format"),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope' is not among the tools (wx, add)",
        ),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", '"required"'),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools.0", "function"),
        ({"tools": [{"type": "function"}], "tool_choice": "none"}, "tools.0", "function"),
        (
            {"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"},
            "tools.1.function.name",
            "named twice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "1 to 64",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            "its own form",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}
                ],
                "tool_choice": "required",
            },
            "tools",
            "type",
        ),
        ({"functions": [{"name": "f"}]}, "functions", "give tools and tool_choice"),
    ],
)
def test_a_bad_tool_request_gets_one_400_naming_the_field(server, body, param, says):
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert "\n" not in error["message"]


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ({"role": "user", "content": None}, "content: null only in an assistant turn"),
        ({"role": "tool", "content": "18C"}, "tool_call_id"),
    ],
)
def test_a_malformed_turn_is_refused(server, message, says):
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": [*ASK, message], "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
