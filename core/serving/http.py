"""An OpenAI-compatible HTTP server over :class:`unbottle.core.serving.engine.Engine`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both stream as server-sent events ending with ``data: [DONE]``), vLLM's ``POST
/tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, ``GET /health`` and ``GET
/metrics`` (Prometheus text format).

Secure by default: it binds 127.0.0.1 unless told otherwise; with an API key every
endpoint but ``/health`` needs ``Authorization: Bearer <key>``; bodies are size-limited
and validated, and every refusal is a 4xx with OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``); a bounded queue answers 429
instead of growing; on SIGINT/SIGTERM uvicorn stops accepting, lets in-flight requests
finish (up to ``shutdown_timeout_s``), then the engine cancels what is left.

Slow or hostile clients are bounded: a request's headers and body must arrive within
``header_timeout_s`` and ``body_timeout_s``, at most ``max_connections`` connections are
open, JSON bodies nest at most ``MAX_JSON_DEPTH`` levels, and a client that leaves cancels
its request. Tokenizing runs in a thread (the tokenizer releases the interpreter lock), so
a large prompt does not hold up ``/health``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from unbottle.core.contract.errors import ConfigError
from unbottle.core.serving.engine import (
    Engine,
    EngineProcess,
    Event,
    LoadedBundle,
    QueueFull,
    SamplingParams,
    Sequence,
    TokenLogprob,
    default_threads,
)
from unbottle.core.serving.grammar import (
    JSON_WHITESPACE,
    KINDS,
    GrammarError,
    Grammars,
    compile_grammar,
)
from unbottle.core.serving.tools import (
    ForcedCall,
    ToolError,
    call_id,
    forced_call,
    read_tools,
    template_tool_calls,
    tools_written_in,
)

log = logging.getLogger("unbottle.server")

#: OpenAI's own limits on stop sequences.
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/health",
    "/metrics",
)
#: OpenAI's bounds on a ``logit_bias`` value, and on how many tokens it names.
MAX_LOGIT_BIAS = 100
MAX_LOGIT_BIAS_TOKENS = 300
#: OpenAI's limit on a chat request's ``top_logprobs``.
MAX_TOP_LOGPROBS = 20
#: A log-probability JSON cannot hold (-inf) is sent as this, as vLLM does.
LOWEST_LOGPROB = -9999.0
#: The deepest nesting of arrays and objects a request body may have (OpenAI's requests
#: need fewer than ten); checked before parsing, which would recurse once per level.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: A lone surrogate, written as a JSON escape or as raw (CESU-style) bytes.
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, self.type, self.param, self.code, self.headers
        )


def error_body(message: str, type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status, headers=headers)


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; types are strict, so
    # "max_tokens": "5" is a 400, not a silent 5.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Any = None
    # Seeds are 64-bit, as in vLLM (the engine's generator takes 64 bits).
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    user: str | None = None
    # vLLM's extension: keep generating past EOS (benchmarks use it for fixed lengths).
    ignore_eos: bool = False
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs (a JSON
    # schema, a regex, a choice, a grammar); the completions endpoint takes both, as vLLM's.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None


ParsedT = TypeVar("ParsedT", bound=BaseModel)


class CompletionBody(_Body):
    prompt: Any
    #: The log-probabilities of each token and of this many likeliest ones at its place.
    logprobs: int | None = Field(None, ge=0)
    #: The prompt before the completion (with ``logprobs``, the prompt tokens' too).
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None
    name: str | None = None
    #: An assistant turn's calls, and a tool turn's answer to one of them.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: null only in an assistant turn with tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool turn names the call it answers (tool_call_id)")
        return self

    @field_validator("content", mode="wrap")
    @classmethod
    def _one_error(cls, value: Any, handler: Any) -> Any:
        # A union reports one error per member; one sentence says it better.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("a string or a list of {type: text, text: ...} parts") from None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def turn(self) -> dict[str, Any]:
        """The message as transformers' chat templates take it."""
        turn: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = template_tool_calls(self.tool_calls)
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        return turn


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Tools, with a call forced (core/serving/tools.py); the older functions are refused.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    function_call: Any = None


class TokenizeBody(BaseModel):
    """vLLM's ``/tokenize``: a prompt, or a conversation through the chat template."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    tools: list[Any] | None = None  # for the chat template, with messages


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int]


#: vLLM's ``structured_outputs`` keys: one kind (grammar.KINDS) and how JSON may space.
STRUCTURED_OUTPUT_KEYS = (*KINDS, "disable_any_whitespace", "whitespace_pattern")


def _structured_output(
    response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None
) -> tuple[str, Any, str, str] | None:
    """(kind, spec, JSON's whitespace pattern, the parameter that asked) of a request's
    structured output, or None for free text. Names the parameter of any mistake."""
    free_text = response_format is None or response_format.get("type") == "text"
    if structured_outputs is not None and not free_text:
        raise APIError(
            400,
            "response_format and structured_outputs: give one, not both",
            param="structured_outputs",
            code="invalid_value",
        )
    if not free_text:
        assert response_format is not None
        kind = response_format.get("type")
        if kind == "json_object":
            return "json_object", None, JSON_WHITESPACE, "response_format"
        schema = (response_format.get("json_schema") or {}) if kind == "json_schema" else None
        if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
            raise APIError(
                400,
                "response_format: {type: text}, {type: json_object}, or {type: json_schema, "
                "json_schema: {name, schema: {...}}} "
                f"(got {json.dumps(response_format)[:80]})",
                param="response_format",
                code="invalid_value",
            )
        return "json", schema["schema"], JSON_WHITESPACE, "response_format.json_schema.schema"
    if structured_outputs is None:
        return None
    unknown = sorted(set(structured_outputs) - set(STRUCTURED_OUTPUT_KEYS))
    asked = [k for k in KINDS if structured_outputs.get(k) not in (None, False)]
    if unknown or len(asked) != 1:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"{len(asked)} kinds given"
        raise APIError(
            400,
            f"structured_outputs: {problem}; give one of {', '.join(KINDS)} (and, for JSON, "
            "disable_any_whitespace or whitespace_pattern)",
            param="structured_outputs",
            code="invalid_value",
        )
    no_whitespace = structured_outputs.get("disable_any_whitespace", False)
    pattern = structured_outputs.get("whitespace_pattern")
    for name, value, allowed, ok in (
        ("disable_any_whitespace", no_whitespace, "true or false", isinstance(no_whitespace, bool)),
        (
            "whitespace_pattern",
            pattern,
            "a regular expression",
            pattern is None or (isinstance(pattern, str) and pattern != ""),
        ),
    ):
        if not ok:
            raise APIError(
                400,
                f"structured_outputs.{name}: {allowed} (got {json.dumps(value)[:40]})",
                param=f"structured_outputs.{name}",
                code="invalid_value",
            )
    if no_whitespace and pattern is not None:
        raise APIError(
            400,
            "structured_outputs: disable_any_whitespace and whitespace_pattern: give one",
            param="structured_outputs.whitespace_pattern",
            code="invalid_value",
        )
    kind = asked[0]
    whitespace = "" if no_whitespace else pattern or JSON_WHITESPACE
    return kind, structured_outputs[kind], whitespace, f"structured_outputs.{kind}"


# --------------------------------------------------------------------------- the app


class Metrics:
    """Prometheus metrics of one server (its own registry, so tests can run several)."""

    def __init__(self, engine_ref: dict[str, Engine | EngineProcess]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "unbottle_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "unbottle_request_duration_seconds",
            "Time from request to the end of the response",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.ttft = Histogram(
            "unbottle_time_to_first_token_seconds",
            "Time from request to its first generated text",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "unbottle_prompt_tokens", "Prompt tokens of completed requests", registry=r
        )
        self.prompt_tokens_cached = Counter(
            "unbottle_prompt_tokens_cached",
            "Prompt tokens of completed requests found in the cache, not computed again",
            registry=r,
        )
        self.generated_tokens = Counter(
            "unbottle_generation_tokens", "Tokens generated", registry=r
        )
        self.batch_size = Histogram(
            "unbottle_decode_batch_size",
            "Sequences per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.cancelled = Counter(
            "unbottle_requests_cancelled",
            "Generation requests cancelled before they finished (the client left)",
            registry=r,
        )
        queue = Gauge("unbottle_queue_depth", "Sequences waiting for a batch slot", registry=r)
        running = Gauge("unbottle_running_sequences", "Sequences in the decode batch", registry=r)
        queue.set_function(lambda: engine_ref["engine"].queue_depth if engine_ref else 0)
        running.set_function(lambda: engine_ref["engine"].running if engine_ref else 0)
        r.register(_SpeculationCounts(engine_ref))


class _SpeculationCounts:
    """Speculative decoding's drafted and accepted tokens, read off the engine's own
    counts when scraped (vLLM's ``spec_decode_num_draft_tokens`` and
    ``spec_decode_num_accepted_tokens``)."""

    def __init__(self, engine_ref: dict[str, Engine | EngineProcess]) -> None:
        self.engine_ref = engine_ref

    def collect(self) -> Iterator[CounterMetricFamily]:
        engine = self.engine_ref.get("engine")
        drafted, accepted = (engine.drafted_tokens, engine.accepted_tokens) if engine else (0, 0)
        for name, what, count in (
            ("drafted", "drafted", drafted),
            ("accepted", "drafted that the model chose", accepted),
        ):
            yield CounterMetricFamily(
                f"unbottle_spec_decode_{name}_tokens",
                f"Tokens speculative decoding {what}",
                value=count,
            )


def create_app(bundle: LoadedBundle, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app for one loaded bundle; the engine runs while the app lives."""
    config = bundle.config
    engine_ref: dict[str, Engine | EngineProcess] = {}
    metrics = Metrics(engine_ref)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def deliver(events: list[Event]) -> None:  # in the event loop
            for seq, text, finish in events:
                seq.sink(seq, text, finish)

        make = bundle.engine_process if config.engine_process else bundle.engine
        engine = make(
            on_step=metrics.batch_size.observe,
            on_events=lambda events: loop.call_soon_threadsafe(deliver, events),
        )
        engine.start()
        engine_ref["engine"] = engine
        speculative = config.speculative
        log.info(
            "serving %s (%s) with max_batch=%d on %d thread(s)%s",
            bundle.model_name,
            bundle.format,
            config.max_batch,
            config.threads or default_threads(bundle.format),
            f", speculative decoding by prompt lookup ({speculative.num_speculative_tokens} tokens)"
            if speculative
            else "",
        )
        # What is loaded now lives as long as the server. A full collection would walk it
        # all (450,000 objects with torch and transformers: 0.18 s here, the GIL held),
        # and the first requests' allocations trigger one, so every connection would
        # wait. Frozen, a collection walks only what requests made. Thawed after, for a
        # process that embeds the server.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            # uvicorn has already waited for (or cancelled) in-flight requests.
            engine.stop()

    app = FastAPI(
        title="unbottle", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(
        Guard,
        api_key=api_key,
        max_body_bytes=config.max_body_bytes,
        body_timeout_s=config.body_timeout_s,
        metrics=metrics,
    )
    if config.cors_origins:  # outermost, so a browser's preflight needs no key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    service = _Service(bundle, engine_ref, metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message, code=code)

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = engine_ref.get("engine")
        if engine is None or not engine.alive:
            return error_response(503, "the engine is not running", "server_error")
        stalled = engine.stalled_for()
        if stalled > config.stall_timeout_s:
            return error_response(
                503, f"the engine has made no progress for {stalled:.0f} s", "server_error"
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [service.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        service.check_model(model_id, param=None)
        return JSONResponse(service.model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.complete(await _parse(request, CompletionBody), request.receive)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await service.chat(await _parse(request, ChatBody), request.receive)

    # vLLM's tokenizer endpoints, which lm-evaluation-harness's ``local-completions`` model
    # uses (its remote tokenizer) when the server has them: no tokenizer needed client-side.
    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        return JSONResponse(await service.tokenize(await _parse(request, TokenizeBody)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        return JSONResponse(await service.detokenize(await _parse(request, DetokenizeBody)))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(service.tokenizer_info())

    return app


async def _parse(request: Request, model: type[ParsedT]) -> ParsedT:
    """The JSON body as ``model``, whatever the Content-Type (curl -d sends a form type)."""
    body = await request.body()
    if _nests_deeper(body, MAX_JSON_DEPTH):
        raise APIError(
            400,
            f"The JSON body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
            code="invalid_json",
        )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(
            400, f"We could not parse the JSON body of your request: {e}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
    if _SURROGATE_BYTES.search(body):
        _refuse_surrogates(data, [])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()[0]) from None


def _nests_deeper(body: bytes, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest more than ``limit`` deep.

    Strings are blanked out, the rest kept to its brackets, and innermost pairs removed
    one level per pass (each pass is one C-speed ``bytes.replace``): no recursion, at most
    ``limit + 1`` passes, and no work at all for a body with fewer brackets than the limit.
    Brackets never closed count too: the parser recurses into them before it fails.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(_BRACKETS, _NOT_BRACKETS)
    levels = 0
    while levels <= limit:
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            break
        brackets, levels = shorter, levels + 1
    return levels + brackets.count(b"[") > limit


def _refuse_surrogates(value: Any, path: list[str]) -> None:
    """400 for the first string holding a lone surrogate (not Unicode; tokenizers fail)."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            param = ".".join(path) or None
            raise APIError(
                400,
                f"{param or 'body'}: contains a lone surrogate (U+{ord(found.group()):04X}), "
                "which is not valid Unicode",
                param=param,
                code="invalid_value",
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(key, path)
            _refuse_surrogates(item, [*path, key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_surrogates(item, [*path, str(i)])


def _validation_error(err: Any) -> APIError:
    """One pydantic error as OpenAI reports a bad parameter: the field, what is wrong, the value."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if not loc:
        return APIError(400, f"The request body is invalid: {err['msg']}", code="invalid_body")
    got = "" if err.get("type") == "missing" else f" (got {json.dumps(err.get('input'))[:80]})"
    return APIError(400, f"{param}: {err['msg']}{got}", param=param, code="invalid_value")


class _Service:
    """What the endpoints do: validate, tokenize, queue, and shape OpenAI responses."""

    def __init__(
        self, bundle: LoadedBundle, engine_ref: dict[str, Engine | EngineProcess], metrics: Metrics
    ):
        self.bundle = bundle
        self.config = bundle.config
        self.tokenizer = bundle.tokenizer
        self.context = bundle.context
        self.max_tokens_limit = min(self.config.max_tokens or self.context, self.context)
        self.engine_ref = engine_ref
        self.metrics = metrics
        self.grammars = Grammars(self.tokenizer, bundle.eos_token_ids)
        self._reads_tools: bool | None = None  # see _template_reads_tools
        self.created = int(time.time())
        self.max_sequences = self.config.max_queue + self.config.max_batch
        # A token covers at most this many characters of text, so a longer text cannot fit
        # the context whatever it holds: refuse it without tokenizing. Whitespace is not
        # counted (a pre-tokenizer or a chat template may drop it), and without a
        # normalizer only (one may shrink the text: NFC); with one, everything is tokenized.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self.chars_per_token = (
            max(len(token) for token in self.tokenizer.get_vocab())
            if backend is not None and backend.normalizer is None
            else None
        )
        self.token_names = TokenNames(self.tokenizer)

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.bundle.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "unbottle",
            "max_model_len": self.context,
        }

    def check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.bundle.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves "
                f"`{self.bundle.model_name}`.",
                param=param,
                code="model_not_found",
            )

    # -- validation ----------------------------------------------------------------------

    def _common(self, body: _Body) -> None:
        self.check_model(body.model)
        if body.n > self.config.max_n:
            raise APIError(
                400,
                f"n: {body.n} is more than this server's limit of {self.config.max_n}",
                param="n",
                code="invalid_value",
            )
        unsupported: dict[str, bool] = {}
        if isinstance(body, CompletionBody):
            unsupported.update(suffix=bool(body.suffix), best_of=body.best_of not in (None, 1))
        # The likeliest tokens asked for at each position: a completion's logprobs, a chat's
        # top_logprobs.
        name = "logprobs" if isinstance(body, CompletionBody) else "top_logprobs"
        top = getattr(body, name)
        if top is not None and top > self.config.max_logprobs:
            raise APIError(
                400,
                f"{name}: {top} is more than this server's limit of {self.config.max_logprobs}",
                param=name,
                code="invalid_value",
            )
        if isinstance(body, ChatBody) and body.top_logprobs is not None and not body.logprobs:
            raise APIError(
                400,
                "top_logprobs: only allowed when logprobs is true",
                param="top_logprobs",
                code="invalid_value",
            )
        if isinstance(body, ChatBody):
            calling = {
                "functions": bool(body.functions),
                "function_call": body.function_call not in (None, "none", "auto"),
            }
            for name, used in calling.items():
                if used:
                    raise APIError(
                        400,
                        f"{name}: not supported by this server (give tools and tool_choice)",
                        param=name,
                        code="unsupported",
                    )
        for name, used in unsupported.items():
            if used:
                raise APIError(
                    400, f"{name}: not supported by this server", param=name, code="unsupported"
                )
        if body.stream_options is not None and not body.stream:
            raise APIError(
                400,
                "stream_options: only allowed when stream is true",
                param="stream_options",
                code="invalid_value",
            )

    def _stops(self, stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_SEQUENCES
            or any(len(s) > MAX_STOP_LENGTH for s in stops)
        ):
            raise APIError(
                400,
                f"stop: a non-empty string or a list of up to {MAX_STOP_SEQUENCES} non-empty "
                f"strings of at most {MAX_STOP_LENGTH} characters",
                param="stop",
                code="invalid_value",
            )
        return tuple(stops)

    def _prompt_items(self, prompt: Any) -> list[Any]:
        """A completion prompt, in any of OpenAI's four shapes, as a list of strings or id lists."""

        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x
            )

        if isinstance(prompt, str):
            texts: list[Any] = [prompt]
        elif is_ids(prompt) and prompt:
            texts = [prompt]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, str) or (is_ids(p) and p) for p in prompt)
        ):
            texts = prompt
        else:
            raise APIError(
                400,
                "prompt: a string, a list of strings, a list of token ids, or a list of lists "
                "of token ids",
                param="prompt",
                code="invalid_value",
            )
        return texts

    def _check_size(self, sequences: int, texts: list[str], param: str) -> None:
        """Refuse, before any tokenizing, what cannot be served whatever its tokens."""
        if sequences > self.max_sequences:
            raise APIError(
                400,
                f"this request asks for {sequences} sequences (prompts x n); the server holds "
                f"at most {self.max_sequences}",
                param="n",
                code="invalid_value",
            )
        if self.chars_per_token is None:
            return
        most = self.context * self.chars_per_token
        if max(map(len, texts), default=0) <= most:  # the common case: nothing to count
            return
        longest = max(sum(map(len, t.split())) for t in texts)  # besides whitespace
        if longest > most:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, your "
                f"{param} has {longest} characters besides whitespace, more than "
                f"{self.context} tokens of at most {self.chars_per_token} characters can hold.",
                param=param,
                code="context_length_exceeded",
            )

    def _tokenize(self, items: list[Any]) -> list[list[int]]:
        """Token ids of each prompt item (runs in a thread: the tokenizer drops the GIL)."""
        vocab = len(self.tokenizer)
        strings = [item for item in items if isinstance(item, str)]
        encoded = iter(
            self.tokenizer(strings, add_special_tokens=False)["input_ids"] if strings else []
        )
        prompts = []
        for item in items:
            if isinstance(item, str):
                ids = next(encoded)
            else:
                ids = item
                if any(t < 0 or t >= vocab for t in ids):
                    raise APIError(
                        400,
                        f"prompt: token ids must be in [0, {vocab})",
                        param="prompt",
                        code="invalid_value",
                    )
            if not ids:
                raise APIError(
                    400, "prompt: the prompt is empty", param="prompt", code="invalid_value"
                )
            prompts.append(ids)
        return prompts

    def _max_tokens(
        self, asked: int | None, default: int, prompts: list[list[int]], prompt_param: str
    ) -> int:
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, your "
                f"prompt has {longest} tokens, leaving no room to generate.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if asked is not None and asked > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens: {asked} is more than this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )
        if asked is not None and longest + asked > self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {longest + asked} tokens ({longest} in the prompt, {asked} for the "
                "completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return (
            asked
            if asked is not None
            else min(default, self.max_tokens_limit, self.context - longest)
        )

    def _logit_bias(self, bias: dict[str, Any] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``logit_bias``: token ids (as JSON keys, strings) to a bias in
        [-100, 100]."""
        vocab = len(self.tokenizer)
        if bias is not None and len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise APIError(
                400,
                f"logit_bias: {len(bias)} tokens; at most {MAX_LOGIT_BIAS_TOKENS}",
                param="logit_bias",
                code="invalid_value",
            )
        pairs = []
        for key, value in (bias or {}).items():
            token = int(key) if re.fullmatch(r"\d{1,9}", key) else -1
            if not 0 <= token < vocab:
                raise APIError(
                    400,
                    f"logit_bias: keys are token ids in [0, {vocab}) (got {key[:40]!r})",
                    param="logit_bias",
                    code="invalid_value",
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS
            ):
                raise APIError(
                    400,
                    f"logit_bias: values are numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}] "
                    f"(got {json.dumps(value)[:40]} for {key})",
                    param="logit_bias",
                    code="invalid_value",
                )
            pairs.append((token, float(value)))
        return tuple(pairs)

    async def _grammar_off_loop(self, body: _Body, forced: ForcedCall | None = None) -> str | None:
        """``_grammar`` in a thread, for the requests that ask for a form; the rest, most
        of them, skip the thread's hop."""
        if body.response_format is None and body.structured_outputs is None and forced is None:
            return None
        return await asyncio.to_thread(self._grammar, body, forced)

    def _grammar(self, body: _Body, forced: ForcedCall | None = None) -> str | None:
        """The request's structured output, or the form of the tool call it forces, as a
        compiled and checked grammar (None: free text). Builds llguidance's tokenizer on
        first use: call it in a thread."""
        asked = _structured_output(body.response_format, body.structured_outputs)
        if forced is not None:
            if asked is not None:
                raise APIError(
                    400,
                    "tool_choice: a forced tool call has its own form; give no "
                    "response_format or structured_outputs with it",
                    param="tool_choice",
                    code="invalid_value",
                )
            # Compact, as OpenAI writes arguments: a program reads them, and every space
            # would be a token more to decode.
            asked = ("json", forced.schema, "", "tools")
        if asked is None:
            return None
        kind, spec, whitespace, param = asked
        try:
            grammar = compile_grammar(kind, spec, whitespace=whitespace)
            self.grammars.check(grammar)
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
        return grammar

    def _sampling(self, body: _Body, max_tokens: int, grammar: str | None = None) -> SamplingParams:
        if isinstance(body, CompletionBody):
            logprobs = body.logprobs
            prompt_logprobs = logprobs if body.echo else None
        else:
            assert isinstance(body, ChatBody)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_logprobs = None
        return SamplingParams(
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logit_bias=self._logit_bias(body.logit_bias),
            max_tokens=max_tokens,
            temperature=(
                body.temperature
                if body.temperature is not None
                else self.bundle.default_temperature
            ),
            top_p=body.top_p if body.top_p is not None else self.bundle.default_top_p,
            stop=self._stops(body.stop),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            grammar=grammar,
        )

    # -- endpoints -----------------------------------------------------------------------

    async def complete(self, body: CompletionBody, receive: Receive) -> Response:
        self._common(body)
        items = self._prompt_items(body.prompt)
        self._check_size(len(items) * body.n, [i for i in items if isinstance(i, str)], "prompt")
        prompts = await asyncio.to_thread(self._tokenize, items)
        max_tokens = self._max_tokens(
            body.max_tokens, self.config.default_max_tokens, prompts, "prompt"
        )
        grammar = await self._grammar_off_loop(body)
        params = self._sampling(body, max_tokens, grammar)
        echoes = None
        if body.echo:  # the prompt as given, or its ids' text
            echoes = [
                item if isinstance(item, str) else self.tokenizer.decode(item) for item in items
            ]
        return await self._run(
            prompts,
            params,
            body,
            receive,
            kind="text_completion",
            id_prefix="cmpl-",
            echoes=echoes,
        )

    async def chat(self, body: ChatBody, receive: Receive) -> Response:
        self._common(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(
                400,
                "max_tokens and max_completion_tokens: give one, not both",
                param="max_completion_tokens",
                code="invalid_value",
            )
        try:
            forced = forced_call(body.tools, body.tool_choice, body.parallel_tool_calls)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        ids = await self._chat_ids(body.messages, sequences=body.n, tools=body.tools)
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = self._max_tokens(asked, self.context, [ids], "messages")
        grammar = await self._grammar_off_loop(body, forced)
        params = self._sampling(body, max_tokens, grammar)
        return await self._run(
            [ids],
            params,
            body,
            receive,
            kind="chat.completion",
            id_prefix="chatcmpl-",
            forced=forced,
        )

    async def _chat_ids(
        self,
        messages: list[Message],
        sequences: int = 1,
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
    ) -> list[int]:
        """A conversation's token ids through the chat template (in a thread), which is
        given the tools too: a template that knows them describes them to the model. One
        that ignores them (SmolLM2's) gets them written into a system turn, and earlier
        calls as their JSON, so that the model sees what it may call and what it did."""
        turns = [m.turn() for m in messages]
        # The template only adds text, so the contents alone bound the prompt from below.
        self._check_size(sequences, ["".join(m["content"] for m in turns)], "messages")
        render = functools.partial(
            self.tokenizer.apply_chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
        )
        if tools and not await asyncio.to_thread(self._template_reads_tools):
            turns, tools = tools_written_in(turns, tools), None
        try:
            ids = await asyncio.to_thread(render, turns, tools=tools or None)
        except Exception as e:  # the template itself refused the conversation
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        if hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _template_reads_tools(self) -> bool:
        """Whether the chat template renders ``tools`` at all (a probe, rendered with and
        without one tool; the answer is kept)."""
        if self._reads_tools is None:
            probe = [{"role": "user", "content": "?"}]
            tool = {"type": "function", "function": {"name": "probe", "parameters": {}}}
            render = functools.partial(self.tokenizer.apply_chat_template, tokenize=False)
            try:
                self._reads_tools = render(probe, tools=[tool]) != render(probe)
            except Exception:  # a template that refuses tools reads them, in its way
                self._reads_tools = True
        return self._reads_tools

    async def tokenize(self, body: TokenizeBody) -> dict[str, Any]:
        if body.model is not None:
            self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(
                400, "tokenize: give a prompt or messages, one of them", code="invalid_value"
            )
        if body.messages is not None:
            if body.add_special_tokens:
                raise APIError(
                    400,
                    "add_special_tokens: with messages the chat template places the special "
                    "tokens; leave it out or false",
                    param="add_special_tokens",
                    code="invalid_value",
                )
            if body.tools:
                try:
                    read_tools(body.tools)
                except ToolError as e:
                    raise APIError(400, str(e), param=e.param, code="invalid_value") from None
            ids = await self._chat_ids(
                body.messages, add_generation_prompt=body.add_generation_prompt, tools=body.tools
            )
        else:
            prompt = body.prompt
            assert prompt is not None
            self._check_size(1, [prompt], "prompt")
            special = body.add_special_tokens is not False
            encoded = await asyncio.to_thread(self.tokenizer, prompt, add_special_tokens=special)
            ids = list(encoded["input_ids"])
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    async def detokenize(self, body: DetokenizeBody) -> dict[str, Any]:
        if body.model is not None:
            self.check_model(body.model)
        vocab = len(self.tokenizer)
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(
                400,
                f"tokens: token ids must be in [0, {vocab})",
                param="tokens",
                code="invalid_value",
            )
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, body.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        """What a client needs to tokenize as the server does (vLLM's ``/tokenizer_info``)."""
        t = self.tokenizer
        return {
            "tokenizer_class": type(t).__name__,
            "eos_token": t.eos_token,
            "bos_token": t.bos_token,
            "pad_token": t.pad_token,
            "unk_token": t.unk_token,
            "chat_template": t.chat_template if isinstance(t.chat_template, str) else None,
            "model_max_length": self.context,
        }

    async def _run(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        body: _Body,
        receive: Receive,
        *,
        kind: str,
        id_prefix: str,
        echoes: list[str] | None = None,
        forced: ForcedCall | None = None,
    ) -> Response:
        engine = self.engine_ref["engine"]
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(seq: Sequence, text: str, finish: str | None) -> None:  # in the event loop
            events.put_nowait((seq, text, finish))

        seqs = [
            Sequence(prompt, params, sink, index=i * body.n + j)
            for i, prompt in enumerate(prompts)
            for j in range(body.n)
        ]
        if not engine.alive:
            raise APIError(
                503, "The model engine is not running.", type="server_error", code="engine_down"
            )
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise APIError(
                429,
                f"The server is busy: {e}. Retry later.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        call = _Call(
            id=f"{id_prefix}{uuid.uuid4().hex}",
            kind=kind,
            model=self.bundle.model_name,
            seqs=seqs,
            events=events,
            engine=engine,
            metrics=self.metrics,
            started=time.perf_counter(),
            prompt_tokens=sum(len(p) for p in prompts),
            choices=body.n,
            names=self.token_names if params.logprobs is not None else None,
            echoes={s.index: echoes[s.index // body.n] for s in seqs} if echoes else {},
            forced=forced,
        )
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                call.stream(include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await call.collect(receive)


class _Call:
    """One HTTP request's sequences, read back from the engine."""

    def __init__(
        self,
        *,
        id,
        kind,
        model,
        seqs,
        events,
        engine,
        metrics,
        started,
        prompt_tokens,
        choices,
        names=None,
        echoes=None,
        forced=None,
    ) -> None:
        #: The tool call the request forces: each choice's text is its calls.
        self.forced: ForcedCall | None = forced
        #: Names the tokens of logprobs; None when the request asked for none.
        self.names: TokenNames | None = names
        #: The prompt text each choice starts with (``echo``), by choice index.
        self.echoes: dict[int, str] = echoes or {}
        #: Per choice: generated tokens whose logprobs went out, and the characters sent.
        self.logprobs_sent: dict[int, int] = {}
        self.chars_sent: dict[int, int] = {}
        self.prompt_tokens = prompt_tokens
        self.choices = choices  # sequences per prompt, in a row
        self.id, self.kind, self.model = id, kind, model
        self.seqs: list[Sequence] = seqs
        self.events: asyncio.Queue = events
        self.engine: Engine | EngineProcess = engine
        self.metrics: Metrics = metrics
        self.started = started
        self.created = int(time.time())
        self.first_token_seen = False

    async def _next(self) -> tuple[Sequence, str, str | None]:
        seq, text, finish = await self.events.get()
        if not self.first_token_seen:
            self.first_token_seen = True
            self.metrics.ttft.observe(time.perf_counter() - self.started)
        return seq, text, finish

    def _usage(self) -> dict[str, Any]:
        prompt = self.prompt_tokens
        completion = sum(len(s.generated) for s in self.seqs)
        # A prompt counts once however many choices it has; each choice was prefilled on
        # its own, and the first one's count stands for the prompt, as its tokens do.
        cached = sum(s.cached_tokens for s in self.seqs[:: self.choices])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _account(self) -> None:
        usage = self._usage()
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.prompt_tokens_cached.inc(usage["prompt_tokens_details"]["cached_tokens"])
        self.metrics.generated_tokens.inc(usage["completion_tokens"])

    def _failed(self) -> APIError | None:
        reasons = {s.finish_reason for s in self.seqs}
        if "abort" in reasons:
            return APIError(
                503,
                "The server is shutting down; the request was cancelled.",
                type="server_error",
                code="shutting_down",
            )
        if "error" in reasons:
            return APIError(
                500, "The model failed while generating.", type="server_error", code="engine_error"
            )
        return None

    async def collect(self, receive: Receive) -> Response:
        texts = {s.index: "" for s in self.seqs}

        async def gather() -> None:
            pending = len(self.seqs)
            while pending:
                seq, text, finish = await self._next()
                texts[seq.index] += text
                pending -= finish is not None

        async def client_left() -> None:
            # Nothing else reads this request's messages: the next one is its disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass

        gathering = asyncio.ensure_future(gather())
        watching = asyncio.ensure_future(client_left())
        try:
            await asyncio.wait({gathering, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            left = not gathering.done()  # the client left, or the server cancelled the task
            if left:
                gathering.cancel()
                self.engine.cancel(self.seqs)
                self.metrics.cancelled.inc()
        if left:
            return Response(status_code=499)  # nginx's "client closed request"; never sent
        gathering.result()
        failed = self._failed()
        if failed is not None:
            return failed.response()
        self._account()
        choices = []
        for s in sorted(self.seqs, key=lambda s: s.index):
            reason = s.finish_reason
            text, logprobs = self._piece(s, texts[s.index])
            if self.kind == "chat.completion":
                message, reason = self._message(text, reason)
                choices.append(
                    {
                        "index": s.index,
                        "message": {"role": "assistant", **message},
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    }
                )
            else:
                choices.append(
                    {"index": s.index, "text": text, "logprobs": logprobs, "finish_reason": reason}
                )
        return JSONResponse(
            {
                "id": self.id,
                "object": self.kind,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "usage": self._usage(),
            }
        )

    def _message(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A chat choice's message fields and finish reason: its text, or the tool calls
        the request forced. As OpenAI has it, a call of any tool ("required") finishes
        with ``tool_calls``, a named function's with ``stop``."""
        calls = self.forced.calls(text) if self.forced is not None else None
        if calls is None:
            return {"content": text}, reason
        if self.forced is not None and self.forced.function is None and reason == "stop":
            reason = "tool_calls"
        return {"content": None, "tool_calls": calls}, reason

    def _chunk(self, choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        payload: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def _choice(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        first: bool = False,
        logprobs: dict[str, Any] | None = None,
    ) -> dict:
        if self.kind == "chat.completion":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None and self.forced is not None and self.forced.function is not None:
                # A named function's arguments stream as they come, as OpenAI's do: the
                # first delta names the call, the next ones extend its arguments.
                call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
                if first:
                    call.update(id=call_id(), type="function")
                    call["function"]["name"] = self.forced.function
                delta["tool_calls"] = [call]
            elif text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def _text_chunk(self, seq: Sequence, text: str) -> str:
        """A chunk of a choice's new text and its tokens' logprobs; "" if it has neither."""
        text, logprobs = self._piece(seq, text)
        if not text and not (logprobs and _has_tokens(logprobs)):
            return ""
        return self._chunk([self._choice(seq.index, text, None, False, logprobs)])

    def _piece(self, seq: Sequence, text: str) -> tuple[str, dict[str, Any] | None]:
        """The next piece of a choice: ``text`` after the echoed prompt if none went out
        yet, and the logprobs of the tokens not reported before (None if not asked)."""
        index = seq.index
        first = index not in self.chars_sent
        if first:
            text = self.echoes.get(index, "") + text
        offset = self.chars_sent.get(index, 0)
        self.chars_sent[index] = offset + len(text)
        if self.names is None:
            return text, None
        done = self.logprobs_sent.get(index, 0)
        entries = seq.logprobs[done:]  # the engine appends as it goes; this is a snapshot
        self.logprobs_sent[index] = done + len(entries)
        if self.kind == "chat.completion":
            return text, {"content": [self._chat_entry(*e) for e in entries], "refusal": None}
        pairs = [(entry[0], entry) for entry in entries]
        if first and index in self.echoes and seq.prompt_logprobs:
            pairs[:0] = zip(seq.prompt, seq.prompt_logprobs, strict=True)
        return text, self._completion_logprobs(pairs, offset)

    def _completion_logprobs(
        self, pairs: list[tuple[int, TokenLogprob | None]], offset: int
    ) -> dict[str, Any]:
        """A legacy completion's logprobs: each token's text, logprob, the likeliest tokens
        with the chosen one among them (up to ``logprobs`` + 1, as OpenAI has it), and
        where its text starts; a prompt's first token has no logprob (None)."""
        assert self.names is not None
        tokens, chosen, tops, offsets = [], [], [], []
        for token, entry in pairs:
            name = self.names.text(token)
            tokens.append(name)
            offsets.append(offset)
            offset += len(name)
            if entry is None:
                chosen.append(None)
                tops.append(None)
                continue
            _, logprob, best = entry
            top = {self.names.text(t): _finite(lp) for t, lp in best}
            top.setdefault(name, _finite(logprob))
            chosen.append(_finite(logprob))
            tops.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": chosen,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _chat_entry(
        self, token: int, logprob: float, best: tuple[tuple[int, float], ...]
    ) -> dict[str, Any]:
        assert self.names is not None
        names = self.names
        return {
            "token": names.text(token),
            "logprob": _finite(logprob),
            "bytes": names.bytes(token),
            "top_logprobs": [
                {"token": names.text(t), "logprob": _finite(lp), "bytes": names.bytes(t)}
                for t, lp in best
            ],
        }

    def _calls_chunk(self, seq: Sequence, text: str, finish: str) -> str:
        """The calls of ``tool_choice: required``, whole, then the finish: OpenAI's
        streamed ``tool_calls`` deltas, each call in one piece (the array's items are known
        only once it is parsed)."""
        text, logprobs = self._piece(seq, text)
        message, reason = self._message(text, finish)
        delta: dict[str, Any] = {"content": message["content"]}
        if "tool_calls" in message:
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        choice = {"index": seq.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        return self._chunk([choice]) + self._chunk([self._choice(seq.index, None, reason)])

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        pending = len(self.seqs)
        whole: dict[int, str] = {}  # required calls' text so far, by choice
        buffered = self.forced is not None and self.forced.function is None
        try:
            if self.kind == "chat.completion":  # the role first, as OpenAI sends it
                yield self._chunk([self._choice(s.index, "", None, True) for s in self.seqs])
            while pending:
                # Everything that is ready goes out in one write: text of one choice that
                # arrived in several events is merged, so a slow client or a busy loop
                # gets fewer, larger chunks instead of falling behind.
                ready = [await self._next()]
                while not self.events.empty():
                    ready.append(self.events.get_nowait())
                out: list[str] = []
                texts: dict[int, str] = {}
                by_index: dict[int, Sequence] = {}
                for seq, text, finish in ready:
                    pending -= finish is not None
                    texts[seq.index] = texts.get(seq.index, "") + text
                    by_index[seq.index] = seq
                    if finish in ("abort", "error"):
                        failed = self._failed()
                        assert failed is not None
                        body = error_body(failed.message, failed.type, None, failed.code)
                        out.append(f"data: {json.dumps(body)}\n\n")
                    elif finish is not None and buffered:
                        # The calls go out whole at the end, with all their logprobs.
                        calls = whole.pop(seq.index, "") + texts.pop(seq.index)
                        out.append(self._calls_chunk(seq, calls, finish))
                    elif finish is not None:
                        # The rest of its text, and the logprobs of tokens without text
                        # (EOS), before the finish.
                        out.append(self._text_chunk(seq, texts.pop(seq.index)))
                        out.append(self._chunk([self._choice(seq.index, None, finish)]))
                for index, merged in texts.items():
                    if buffered:
                        whole[index] = whole.get(index, "") + merged
                    elif merged:
                        out.append(self._text_chunk(by_index[index], merged))
                if out:
                    yield "".join(out)
            self._account()
            tail = self._chunk([], self._usage()) if include_usage else ""
            yield tail + "data: [DONE]\n\n"
        finally:
            if pending:  # the client left (or the server cancelled the stream)
                self.engine.cancel(self.seqs)
                self.metrics.cancelled.inc()


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def _has_tokens(logprobs: dict[str, Any]) -> bool:
    return bool(logprobs.get("content") or logprobs.get("tokens"))


class TokenNames:
    """Each token's text and bytes, as OpenAI's logprobs name tokens (kept once computed).

    A byte-level BPE token (GPT-2's alphabet) or a byte-fallback token (``<0xE2>``) may
    hold part of a character: its bytes are the raw bytes, and its text, which has no
    characters of its own, is ``bytes:\\xe2\\x80`` as OpenAI writes it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(getattr(backend, "decoder", None)).__name__
        self._byte_level: dict[str, int] | None = None
        if decoder == "ByteLevel":
            from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

            self._byte_level = {char: byte for byte, char in bytes_to_unicode().items()}
        self._names: dict[int, tuple[str, list[int]]] = {}

    def _name(self, token: int) -> tuple[str, list[int]]:
        named = self._names.get(token)
        if named is not None:
            return named
        text = self.tokenizer.decode([token])
        raw = text.encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if self._byte_level is not None and all(c in self._byte_level for c in piece):
                raw = bytes(self._byte_level[c] for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                raw = bytes([int(piece[3:5], 16)])
        if "\ufffd" in text and raw.decode("utf-8", errors="replace") != text:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        named = self._names[token] = (text, list(raw))
        return named

    def text(self, token: int) -> str:
        return self._name(token)[0]

    def bytes(self, token: int) -> list[int]:
        return self._name(token)[1]


class Guard:
    """ASGI middleware in front of every route: API key, body size and time limits, metrics.

    It runs before FastAPI parses anything, so an unauthenticated, oversized or dribbled
    request costs the server no JSON parsing, and every response (errors included) is
    counted. The ``Bearer`` scheme is matched in any case, as RFC 7235 says schemes are.
    """

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        max_body_bytes: int,
        body_timeout_s: float,
        metrics: Metrics,
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        started = time.perf_counter()
        status = {"code": 500}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.metrics.requests.labels(endpoint, str(status["code"])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

        refusal = self._check_headers(scope)
        if refusal is not None:
            await refusal(scope, receive, send_counted)
            return
        body = b""
        if scope["method"] in ("POST", "PUT", "PATCH"):
            more = True
            deadline = time.monotonic() + self.body_timeout_s
            while more:
                try:
                    message = await asyncio.wait_for(receive(), deadline - time.monotonic())
                except TimeoutError:
                    await self._too_slow()(scope, receive, send_counted)
                    return
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    await self._too_large()(scope, receive, send_counted)
                    return
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_counted)

    def _check_headers(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = (
                    "Incorrect API key provided."
                    if auth
                    else "You didn't provide an API key: send it as `Authorization: Bearer KEY`."
                )
                return error_response(
                    401,
                    message,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "Content-Length is not a number", code="invalid_body")
            if int(length) > self.max_body_bytes:
                return self._too_large()
        return None

    def _too_slow(self) -> JSONResponse:
        return error_response(
            408,
            f"The request body did not arrive within {self.body_timeout_s:g} s.",
            code="request_timeout",
            headers={"Connection": "close"},  # uvicorn closes the connection after it
        )

    def _too_large(self) -> JSONResponse:
        return error_response(
            413,
            f"The request body is larger than this server's limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
        )


def _json_error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for use below ASGI."""
    body = json.dumps(error_body(message, "server_error", None, code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(base: type, *, header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol ``base`` with a deadline on request headers and a cap on
    open connections.

    uvicorn times out idle keep-alive connections but not a client that opens a connection
    and sends its headers a byte at a time (slowloris); the ASGI app only sees a request
    once its headers are complete, so this deadline lives in the protocol. The deadline
    runs from the connection opening, or from the first byte of a later request on it.
    """

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._refused = False
            self._in_request = False
            self._header_timer: asyncio.TimerHandle | None = None
            app = self.app

            async def headers_arrived(scope, receive, send) -> None:
                self._in_request = True
                self._disarm()
                await app(scope, receive, send)

            self.app = headers_arrived

        def connection_made(self, transport) -> None:
            if len(self.connections) >= max_connections:
                self._refused = True
                message = f"The server has {max_connections} connections open, its limit."
                transport.write(_json_error_bytes(503, "Service Unavailable", message, "busy"))
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._in_request and self._header_timer is None:
                self._arm()  # a new request on a kept-alive connection
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._in_request = False
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if not self._refused:
                super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._in_request or self.transport.is_closing():
                return
            message = f"The request headers did not arrive within {header_timeout_s:g} s."
            self.transport.write(
                _json_error_bytes(408, "Request Timeout", message, "request_timeout")
            )
            self.transport.close()

    return GuardedProtocol


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond this machine without a key, unless told to (as Jupyter does)."""
    if api_key or insecure_no_auth or is_loopback(host):
        return
    raise ConfigError(
        f"serve: host {host} without an API key would let anyone who can reach the port "
        "use the model; give --api-key-file or UNBOTTLE_API_KEY, or --insecure-no-auth"
    )


def build_server(
    bundle: LoadedBundle,
    *,
    api_key: str | None = None,
    insecure_no_auth: bool = False,
    log_level: str = "info",
) -> uvicorn.Server:
    """The uvicorn server for a loaded bundle, with every limit of its serve config."""

    config = bundle.config
    check_exposure(config.host, api_key, insecure_no_auth)
    if not api_key and not is_loopback(config.host):
        log.warning(
            "serving on %s without an API key (--insecure-no-auth): anyone who can reach "
            "this port can use the model",
            config.host,
        )
    protocol = guarded_protocol(
        AutoHTTPProtocol,
        header_timeout_s=config.header_timeout_s,
        max_connections=config.max_connections,
    )
    return _Server(
        uvicorn.Config(
            create_app(bundle, api_key=api_key),
            host=config.host,
            port=config.port,
            http=protocol,
            timeout_graceful_shutdown=config.shutdown_timeout_s,
            log_level=log_level,
            access_log=False,
            server_header=False,
            lifespan="on",
        )
    )


class _Server(uvicorn.Server):
    """uvicorn's server, but a stop on SIGTERM or SIGINT is a success: uvicorn re-raises
    the signal once it has shut down, so the process would die by it (exit status 143)
    however well the drain went."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(
    bundle: LoadedBundle, *, api_key: str | None = None, insecure_no_auth: bool = False
) -> None:
    """Run the server in the foreground until SIGINT or SIGTERM; return once it drained."""
    build_server(bundle, api_key=api_key, insecure_no_auth=insecure_no_auth).run()
