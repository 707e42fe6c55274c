"""Tool calls a client forces: a named function, or any of the tools ("required").

OpenAI's chat API lets a client hand the model tools (functions with a JSON schema of
their parameters) and say whether it must call one. When it must, the call's form is
known in advance, so structured outputs (:mod:`unbottle.core.serving.grammar`) make the
model write exactly that, whatever format its finetuning taught it for tool calls:

- ``tool_choice: {"type": "function", "function": {"name": F}}``: the answer is F's
  arguments, JSON that keeps to F's parameter schema;
- ``tool_choice: "required"``: a JSON array of one or more ``{"name": ..., "parameters":
  {...}}`` objects, each naming one of the tools with arguments that keep to its schema
  (vLLM's form for ``required``).

``"auto"`` (the model decides whether to call) needs a parser for the calls in the
model's own format (vLLM's ``--tool-call-parser hermes``, ``llama3_json``...), which
depends on how the model was finetuned; it is not offered.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

#: OpenAI's rule for a function's name.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A function that declares no parameters takes an empty object.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """A malformed tool or tool choice; the message names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ForcedCall:
    """What a request forces: one named function's arguments, or ("required") an array of
    calls of any of the tools."""

    function: str | None  # None: "required"
    schema: dict[str, Any]  # what the answer must keep to

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI's ``tool_calls`` of an answer, or None when it is not a complete call
        (the answer ran out of tokens)."""
        if self.function is not None:
            return [_call(self.function, text)]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        return [_call(item["name"], json.dumps(item["parameters"])) for item in items]


def call_id() -> str:
    """A new id for one tool call, in OpenAI's form."""
    return f"call_{secrets.token_hex(12)}"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def read_tools(tools: list[Any]) -> dict[str, dict[str, Any]]:
    """Each function's parameter schema by name, from OpenAI's ``tools``."""
    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            raise ToolError(where, '{"type": "function", "function": {"name", "parameters"}}')
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name", "1 to 64 of a-z, A-Z, 0-9, _ and -")
        if name in schemas:
            raise ToolError(f"{where}.function.name", f"{name!r} is named twice")
        parameters = function.get("parameters", NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise ToolError(f"{where}.function.parameters", "a JSON schema (an object)")
        schemas[name] = parameters
    return schemas


def forced_call(
    tools: list[Any] | None, tool_choice: Any, parallel: bool = True
) -> ForcedCall | None:
    """The call a request forces, None when it forces none (no tools, or ``"none"``).
    ``parallel`` false (OpenAI's ``parallel_tool_calls``) makes ``required`` one call."""
    if tool_choice not in (None, "none") and not tools:
        raise ToolError("tool_choice", "only allowed when tools are given")
    if not tools:
        return None
    schemas = read_tools(tools)  # checked even when none is forced: the template gets them
    if tool_choice == "none":
        return None
    if tool_choice is None or tool_choice == "auto":
        raise ToolError(
            "tool_choice",
            '"auto" (the default with tools) needs a parser of this model\'s own tool-call '
            'format, which this server does not have; give "required", {"type": "function", '
            '"function": {"name": ...}} or "none"',
        )
    if tool_choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, parameters in schemas.items()
        ]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not parallel:
            array["maxItems"] = 1
        return ForcedCall(None, array)
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
    function = tool_choice.get("function") if named else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ToolError(
            "tool_choice", '"none", "required" or {"type": "function", "function": {"name": ...}}'
        )
    if name not in schemas:
        raise ToolError("tool_choice", f"{name!r} is not among the tools ({', '.join(schemas)})")
    return ForcedCall(name, schemas[name])


def template_tool_calls(tool_calls: list[Any]) -> list[dict[str, Any]]:
    """An assistant turn's OpenAI ``tool_calls`` as transformers' chat templates take them:
    the arguments as an object where they are a JSON object, not a string."""
    out = []
    for call in tool_calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                function["arguments"] = parsed
        out.append({"id": call.get("id"), "type": "function", "function": function})
    return out


#: How a system turn introduces the tools to a model whose template does not.
TOOLS_PREAMBLE = (
    "You can call these tools (each a function and the JSON schema of its parameters). "
    'A call is written as JSON: {"name": ..., "parameters": {...}}.'
)


def tools_written_in(turns: list[dict[str, Any]], tools: list[Any]) -> list[dict[str, Any]]:
    """``turns`` for a chat template that ignores tools: the tools described at the end of
    the first system turn (or in one of their own, first), and each assistant turn's calls
    written as its content, in the form a call is asked in."""
    listed = "\n".join(
        json.dumps(
            {
                "name": tool["function"]["name"],
                "description": tool["function"].get("description", ""),
                "parameters": tool["function"].get("parameters", NO_PARAMETERS),
            }
        )
        for tool in tools
    )
    described = f"{TOOLS_PREAMBLE}\n{listed}"
    out = [dict(turn) for turn in turns]
    if out and out[0]["role"] in ("system", "developer"):
        out[0]["content"] = f"{out[0]['content']}\n\n{described}".lstrip()
    else:
        out.insert(0, {"role": "system", "content": described})
    for turn in out:
        calls = turn.pop("tool_calls", None)
        if calls:
            written = [
                {"name": c["function"]["name"], "parameters": c["function"].get("arguments")}
                for c in calls
            ]
            text = json.dumps(written[0] if len(written) == 1 else written)
            turn["content"] = f"{turn['content']}\n{text}".lstrip()
    return out
