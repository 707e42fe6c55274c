"""params.yaml, validated: one pydantic section per stage.

Validation happens in two passes, both before any heavy work:

1. :func:`load_params` checks the structure (unknown keys, types, ranges) of the file
   plus any ``-S key.path=value`` overrides.
2. :func:`check_strategies` resolves every strategy name against the installed plugins
   and validates its options with the strategy's own config model.

Every failure is a :class:`ConfigError` whose message is one line naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from unbottle.core.contract.errors import ConfigError, UnknownStrategyError, echo, shorten
from unbottle.core.contract.kinds import KINDS, STEP_KINDS
from unbottle.core.store.artifacts import read_utf8


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategyRef(BaseModel):
    """A strategy chosen by name, with its options: ``{name: adamw, betas: [0.9, 0.95]}``.

    A bare string is shorthand for ``{name: <string>}``. The options are validated later by
    the strategy's own config model, once the plugins are loaded.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CompressStep(BaseModel):
    """One step of a compress recipe: ``{prune: magnitude, sparsity: 0.5}``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"a step is a mapping like {{prune: magnitude}}, not {echo(value)}")
        kinds = [k for k in STEP_KINDS if k in value]
        if len(kinds) != 1:
            raise ValueError(
                f"a step names exactly one of {', '.join(STEP_KINDS)} "
                f"(got {', '.join(kinds) or 'none'})"
            )
        if not isinstance(value[kinds[0]], str):
            raise ValueError(f"{kinds[0]}: the strategy name must be a string")
        return value

    @property
    def action(self) -> str:
        return next(k for k in STEP_KINDS if k in (self.model_extra or {}))

    @property
    def kind(self) -> str:
        return STEP_KINDS[self.action]

    @property
    def strategy(self) -> str:
        return str((self.model_extra or {})[self.action])

    @property
    def options(self) -> dict[str, Any]:
        return {k: v for k, v in (self.model_extra or {}).items() if k != self.action}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.action} {self.strategy}" + (f" ({opts})" if opts else "")


class DemoDataParams(Section):
    seed: int = 0
    people: int = Field(48, ge=4, le=5000)
    renderings: int = Field(3, ge=1, le=100)
    test_fraction: float = Field(0.2, gt=0, lt=1)


class DataParams(Section):
    train_text: Path = Path("data/corpus/train.txt")
    valid_text: Path = Path("data/corpus/valid.txt")
    qa_train: Path = Path("data/qa/train.jsonl")
    qa_test: Path = Path("data/qa/test.jsonl")
    demo: DemoDataParams = DemoDataParams()


class TokenizerParams(Section):
    vocab_size: int = Field(1024, ge=300, le=262144)


class ModelParams(Section):
    # The model family (llama, bert, ...); None: the first that pretrain.objective trains.
    architecture: str | None = None
    # Upper bounds well past the largest open models (hidden 16384, 126 layers, FFN 53248),
    # so a typo is refused here rather than building a model of a billion layers.
    hidden_size: int = Field(128, ge=8, le=1 << 16)
    layers: int = Field(4, ge=1, le=1024)
    heads: int = Field(4, ge=1, le=1024)
    intermediate_size: int = Field(344, ge=8, le=1 << 18)
    context: int = Field(128, ge=8, le=1 << 20)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelParams:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by heads ({self.heads})"
            )
        return self


class TrainParams(Section):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=8)
    lr: float = Field(3e-3, gt=0, le=10)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, ge=1)
    optimizer: StrategyRef = StrategyRef(name="adamw")
    parallelism: StrategyRef = StrategyRef(name="single")
    # The learning rate after warmup: cosine decay to min_lr_ratio * lr, linear decay to 0,
    # or constant.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # batch_size is the global batch of one optimizer step; it is split over the processes
    # and then over this many micro-batches, whose gradients add up before the step.
    grad_accum_steps: int = Field(1, ge=1)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory
    compile: bool = False  # torch.compile the model (see BENCHMARKS.md for when it wins)
    # A resumable checkpoint every N optimizer steps (0: none), keeping the newest K, under
    # checkpoint_dir (default: artifacts/.checkpoints/<stage>).
    checkpoint_every: int = Field(100, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_dir: Path | None = None
    # Refuse to start when the estimated memory exceeds what the device has free.
    memory_check: bool = True


class SourceParams(Section):
    """A pretrained model to start from instead of pretraining (core/models/sources.py).

    ``path``: a Hugging Face directory (config.json, model.safetensors, tokenizer) or a
    GGUF file, relative to the workspace; or ``package``: an installed Python package that
    ships a GGUF file (``file``, needed only when it ships several); or ``hub``: a Hugging
    Face Hub model id, read through ``huggingface_hub``'s cache at ``revision`` (a branch,
    tag or commit; ``HF_HUB_OFFLINE=1`` reads the cache only), with ``file`` naming a GGUF
    file in the repository if the model is one. A bare string is shorthand for
    ``{path: <string>}``. A path or hub id is checked when the pretrain stage resolves it;
    a package is checked here.
    """

    path: Path | None = None
    package: str | None = None
    hub: str | None = None
    revision: str | None = None
    file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_origin(self) -> SourceParams:
        from unbottle.core.models.sources import SourceError, package_file

        if sum(origin is not None for origin in (self.path, self.package, self.hub)) != 1:
            raise ValueError(
                "give exactly one of path (a GGUF file or a Hugging Face directory), "
                "package (an installed package that ships a GGUF file) or hub (a Hugging "
                "Face Hub model id)"
            )
        if self.file is not None and self.path is not None:
            raise ValueError(
                "file: names a file inside `package` or `hub`; with `path`, give the file"
            )
        if self.revision is not None and self.hub is None:
            raise ValueError("revision: pins a `hub` model; it means nothing without `hub`")
        if self.package is not None:
            try:
                package_file(self.package, self.file)
            except SourceError as e:
                raise ValueError(str(e)) from None
        return self


class PretrainParams(Section):
    tokenizer: TokenizerParams = TokenizerParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    # What pretraining optimises (a plugin kind): clm, mlm, nsp, ...
    objective: StrategyRef = StrategyRef(name="clm")
    # A pretrained model to start from: the stage then converts or copies it and trains
    # nothing (tokenizer, model, train and objective are unused). None: pretrain from scratch.
    source: SourceParams | None = None

    @model_validator(mode="after")
    def _fits_context(self) -> PretrainParams:
        if self.train.seq_len > self.model.context:
            raise ValueError(
                f"train.seq_len: {self.train.seq_len} is longer than model.context "
                f"({self.model.context})"
            )
        return self


class FinetuneParams(Section):
    method: StrategyRef = StrategyRef(name="full")
    # How pairs become prompts (core/data/prompts.py): the tokenizer's chat template (what
    # /v1/chat/completions renders), the Question:/Answer: completion form, or auto (chat
    # when the tokenizer has a chat template). A system prompt needs chat.
    format: Literal["auto", "chat", "completion"] = "auto"
    system_prompt: str | None = None
    train: TrainParams = TrainParams(steps=200, lr=1e-3, warmup_steps=10, weight_decay=0.0)


class CalibrationParams(Section):
    samples: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=8)


_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
BASELINE = "finetuned"
RESERVED_NAMES = (BASELINE, "pretrained")  # rows of the evaluation that are not variants


#: The marker of a sweep axis inside a sweep recipe: ``sparsity: {grid: [0.3, 0.5]}``.
GRID = "grid"


def _name_part(value: Any) -> str:
    """A grid value as part of a variant name: 0.5 -> 0p5, onnx-dynamic-int8 stays."""
    text = re.sub(r"[^a-z0-9_-]+", "-", str(value).lower().replace(".", "p"))
    return text.strip("-_") or "x"


def expand_sweep(prefix: str, recipe: Any) -> dict[str, list[dict[str, Any]]]:
    """The variants a sweep recipe stands for: one per point of its grid.

    A recipe is a list of steps like a variant's, in which any value (a strategy name or
    an option) may be ``{grid: [v1, v2, ...]}``. The variants are the cross product of
    the grids, named ``prefix-v1-...`` after the values of each point, in order.
    """
    import itertools

    if not (isinstance(recipe, list) and recipe and all(isinstance(s, dict) for s in recipe)):
        raise ValueError(
            f"sweep.{prefix}: a sweep is a list of steps like "
            f"[{{prune: magnitude, sparsity: {{{GRID}: [0.3, 0.5]}}}}]"
        )
    axes: list[tuple[int, str, list[Any]]] = []
    for i, step in enumerate(recipe):
        for key, value in step.items():
            if isinstance(value, dict) and GRID in value:
                values = value[GRID]
                if set(value) != {GRID} or not isinstance(values, list) or not values:
                    raise ValueError(
                        f"sweep.{prefix}[{i}].{key}: write {{{GRID}: [value, ...]}} with at "
                        "least one value"
                    )
                axes.append((i, key, values))
    variants: dict[str, list[dict[str, Any]]] = {}
    for point in itertools.product(*(values for _, _, values in axes)):
        steps = [dict(step) for step in recipe]
        for (i, key, _), value in zip(axes, point, strict=True):
            steps[i][key] = value
        name = "-".join([prefix, *map(_name_part, point)])
        if name in variants:
            raise ValueError(f"sweep.{prefix}: two grid points are both named {name!r}")
        variants[name] = steps
    return variants


class CompressParams(Section):
    calibration: CalibrationParams = CalibrationParams()
    variants: dict[str, list[CompressStep]] = Field(default_factory=dict)
    # Grids over compression settings, each expanded into variants next to `variants`
    # (see expand_sweep): `mag: [{prune: magnitude, sparsity: {grid: [0.3, 0.5]}}]`.
    sweep: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _expand_sweep(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("sweep"):
            return data
        if not isinstance(data["sweep"], dict):
            raise ValueError("sweep: a mapping of name prefix to recipe")
        variants = dict(data.get("variants") or {})
        for prefix, recipe in data["sweep"].items():
            for name, steps in expand_sweep(str(prefix), recipe).items():
                known = variants.get(name)
                if known is not None and _plain(known) != steps:
                    raise ValueError(
                        f"sweep.{prefix}: makes the variant {name!r}, which compress.variants "
                        "already defines with other steps; rename one"
                    )
                variants[name] = steps
        return {**data, "variants": variants}

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, variants: dict[str, list[CompressStep]]) -> Any:
        for name, steps in variants.items():
            if not _VARIANT_NAME.match(name) or name in RESERVED_NAMES:
                raise ValueError(
                    f"{shorten(name)}: a variant name must match [a-z0-9][a-z0-9_-]* and not be "
                    f"{' or '.join(map(repr, RESERVED_NAMES))}"
                )
            if not steps:
                raise ValueError(f"{name}: a variant needs at least one step")
            for i, step in enumerate(steps[:-1]):
                if step.action == "quantize":
                    raise ValueError(
                        f"{name}[{i + 1}]: a {steps[i + 1].action} step cannot follow a "
                        "quantize step (it needs float weights); quantize must come last"
                    )
        return variants


class EvaluateParams(Section):
    metrics: list[StrategyRef] = Field(
        default_factory=lambda: [
            StrategyRef(name=n)
            for n in ("memory", "perplexity", "accuracy", "samples", "size", "speed", "roofline")
        ]
    )
    # Sized for a real model (docs/evaluation.md); the demo's params.yaml asks for 200.
    max_questions: int = Field(100, ge=1)
    # Where torch variants run while measured (ONNX variants run in ONNX Runtime on CPU):
    # auto takes a GPU when there is one. Measure on the device that will serve them.
    device: Literal["cpu", "cuda", "auto"] = "cpu"


def _plain(steps: Any) -> Any:
    """Steps as plain mappings, whether given as dicts or as validated CompressSteps."""
    if isinstance(steps, list):
        return [s.model_dump() if isinstance(s, BaseModel) else s for s in steps]
    return steps


class GateLimit(Section):
    """A bound on one evaluation metric: ``{max: 1.5}``, ``{min: 0.2}`` or both."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> GateLimit:
        if self.min is None and self.max is None:
            raise ValueError("a gate needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class DeployParams(Section):
    target: StrategyRef = StrategyRef(name="hf")
    variant: str = BASELINE  # the variant `policy: explicit` deploys
    # explicit: `variant`; smallest: least size_bytes; fastest: most decode_tokens_per_s;
    # best: the best `quality` metric. Always among the variants that pass `gates`.
    policy: Literal["explicit", "smallest", "fastest", "best"] = "explicit"
    quality: str = "perplexity"
    # Limits on evaluation metrics, by metric name: `perplexity_ratio: {max: 1.5}`.
    gates: dict[str, GateLimit] = Field(default_factory=dict)


class Params(Section):
    seed: int = 0
    data: DataParams = DataParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    compress: CompressParams = CompressParams()
    evaluate: EvaluateParams = EvaluateParams()
    deploy: DeployParams = DeployParams()

    @model_validator(mode="after")
    def _deploy_variant_exists(self) -> Params:
        allowed = [BASELINE, *self.compress.variants]
        if self.deploy.variant not in allowed:
            raise ValueError(
                f"deploy.variant: {echo(self.deploy.variant)} is not a variant; "
                f"allowed: {', '.join(allowed)}"
            )
        return self

    def variant_names(self) -> list[str]:
        return [BASELINE, *self.compress.variants]


# --------------------------------------------------------------------------- loading


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {echo(text)} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(
            f"override {echo(text)}: the value is nested too deeply to be a param"
        ) from None
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], text: str) -> None:
    """Set ``key.path=value`` in a params tree; integer segments index lists."""
    path, value = _parse_override(text)
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {echo(text)}: {shorten(where)} is not an index of a list of "
                    f"{len(node)}"
                )
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if isinstance(child, str) and not last:
                    # `-S pretrain.train.optimizer.lr=...` on the string shorthand.
                    child = node[part] = {"name": child}
                if child is None:  # absent, or an optional section left at None
                    child = node[part] = {}
                node = child
        else:
            raise ConfigError(
                f"override {echo(text)}: {shorten(where)} goes inside a {type(node).__name__}"
            )


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(
            ("function-", "list[", "dict[")
        ):
            continue
        else:
            out += ("." if out else "") + shorten(part, 40)  # a key may be a 50 MB string
    return out


def _allowed_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def one_line(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """Render the first pydantic error as `key: value is wrong because ...`."""
    first = error.errors()[0]
    loc = [p for p in first["loc"] if not str(p).startswith(("function-", "list[", "dict["))]
    where = ".".join(filter(None, [prefix, _format_loc(loc)])) or prefix or "params"
    more = len(error.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key{hint}{tail}"
    if first["type"] == "missing":
        return f"{where}: required key is missing{tail}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("value_error", "assertion_error") or "input" not in first:
        # Validators phrase their message as "sub.key: what is wrong", relative to loc.
        head, sep, rest = message.partition(": ")
        if sep and " " not in head:
            return f"{where + '.' if loc or prefix else ''}{shorten(head)}: {rest}{tail}"
        return f"{where}: {message}{tail}"
    return f"{where}: {echo(first['input'])} is invalid: {shorten(message, 200)}{tail}"


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_params(path: Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Read params.yaml (or the defaults when ``path`` is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"params file {echo(str(path))} does not exist")
        try:
            loaded = yaml.safe_load(read_utf8(Path(path), "params file", ConfigError))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at}") from None
        except RecursionError:
            raise ConfigError(
                f"{path}: nested too deeply to be params (params are a few levels of mappings)"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    # Overrides apply to the defaults merged with the file, so `-S a.b.c=v` works for
    # keys the file leaves out (including the options of a default strategy).
    tree = _deep_merge(Params().model_dump(mode="json"), tree) if overrides else tree
    for text in overrides:
        apply_override(tree, text)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(one_line(e, Params)) from None
    except RecursionError:
        raise ConfigError("params: a value is nested too deeply to be a param") from None


def dump_params(params: Params) -> dict[str, Any]:
    """Params as plain YAML-able data (paths as strings)."""
    return params.model_dump(mode="json")


# ------------------------------------------------------------- strategy resolution


StrategyPlace = tuple[str, str, str, dict[str, Any]]  # (key path, kind, name, options)


def strategy_refs(params: Params) -> Iterator[StrategyPlace]:
    """Every strategy params name: (key path, kind, name, options).

    The places come from the table of kinds (``Kind.params`` and ``Kind.step``), in
    params.yaml's order: stage by stage, a stage's ``train`` section before its own keys,
    and a compress recipe's steps in order.
    """
    for stage in ("pretrain", "finetune", "compress", "evaluate", "deploy"):
        places = sorted(
            (path, kind.name)
            for kind in KINDS.values()
            for path in kind.params
            if path.startswith(f"{stage}.")
        )
        # Deeper keys (a stage's train section) first; then by name.
        for path, kind in sorted(places, key=lambda p: -p[0].count(".")):
            yield from _refs_at(params, path, kind)
        if stage == "compress":
            for variant, steps in params.compress.variants.items():
                for i, step in enumerate(steps):
                    where = f"compress.variants.{variant}[{i}]"
                    yield where, step.kind, step.strategy, step.options


def _refs_at(params: Params, path: str, kind: str) -> Iterator[StrategyPlace]:
    """The strategy (or, for a path ending in ``[]``, the list of them) at ``path``."""
    node: Any = params
    for part in path.removesuffix("[]").split("."):
        node = getattr(node, part)
    if path.endswith("[]"):
        base = path.removesuffix("[]")
        for i, ref in enumerate(node):
            yield f"{base}[{i}]", kind, ref.name, ref.options
    elif node is not None:
        yield path, kind, node.name, node.options


def check_strategies(params: Params, registry: Any) -> None:
    """Fail fast if a named strategy is not installed or its options are invalid."""
    for where, kind, name, options in strategy_refs(params):
        try:
            info = registry.get(kind, name)
        except UnknownStrategyError as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            info.cls.Config(**options)
        except ValidationError as e:
            raise ConfigError(one_line(e, info.cls.Config, prefix=where)) from None
    check_objective(params, registry)
    check_evaluation_plan(params, registry)


def check_objective(params: Params, registry: Any) -> None:
    """The pretraining objective fits the model params describe (or the source)."""
    cfg = params.pretrain
    objective = registry.get("objective", cfg.objective.name).cls
    if cfg.source is not None:
        if objective.model_kind != "causal":
            raise ConfigError(
                f"pretrain.objective: {cfg.objective.name} trains an {objective.model_kind} "
                "from scratch, but pretrain.source is set (a pretrained causal LM, not "
                "trained); remove pretrain.source or use a causal objective such as clm"
            )
        return
    architecture = cfg.model.architecture
    if architecture is not None and architecture not in objective.architectures:
        raise ConfigError(
            f"pretrain.model.architecture: {architecture!r} does not fit pretrain.objective "
            f"{cfg.objective.name} (it trains {objective.model_kind} models); use "
            f"{' or '.join(objective.architectures)}, or leave architecture unset"
        )


#: The stages that take the pretrained model as a causal LM.
CAUSAL_STAGES = ("finetune", "compress", "evaluate", "deploy")


def check_stages_fit(params: Params, registry: Any, stages: Sequence[str]) -> None:
    """Refuse, before any work, a stage that cannot take what pretraining makes: the
    stages after pretrain work on causal LMs, so an encoder objective stops there."""
    cfg = params.pretrain
    if cfg.source is not None:
        return
    objective = registry.get("objective", cfg.objective.name).cls
    if objective.model_kind == "causal":
        return
    for stage in stages:
        if stage in CAUSAL_STAGES:
            raise ConfigError(
                f"{stage}: works on causal LMs, and pretrain.objective {cfg.objective.name} "
                f"trains an {objective.model_kind}; run `unbottle stage pretrain` alone "
                "(it reports the encoder's held-out figures) or use pretrain.objective clm"
            )


# ------------------------------------------------------- metric names, gates and policy

#: Metrics the evaluate stage derives from others: name -> (source, which way is better).
DERIVED_METRICS: dict[str, tuple[str, str]] = {"perplexity_ratio": ("perplexity", "lower")}
#: The metric each ranking policy orders by, and which way is better.
POLICY_METRICS: dict[str, tuple[str, str]] = {
    "smallest": ("size_bytes", "lower"),
    "fastest": ("decode_tokens_per_s", "higher"),
}


def metric_outputs(params: Params, registry: Any) -> tuple[dict[str, str | None], bool]:
    """The names the configured metrics produce, with which way is better, and whether
    that list is complete (a plugin metric without a ``produces`` listing makes it not)."""
    produced: dict[str, str | None] = {}
    complete = True
    for ref in params.evaluate.metrics:
        listing = getattr(registry.get("metric", ref.name).cls, "produces", None)
        if listing is None:
            complete = False
        elif isinstance(listing, dict):
            produced.update(listing)
        else:
            produced.update(dict.fromkeys(listing))
    for name, (source, better) in DERIVED_METRICS.items():
        if source in produced:
            produced[name] = better
    return produced, complete


def check_evaluation_plan(params: Params, registry: Any) -> None:
    """Metric prerequisites, gates and the deploy policy name metrics that will exist."""
    earlier: set[str] = set()
    earlier_known = True  # False once a metric without a `produces` listing came before
    for i, ref in enumerate(params.evaluate.metrics):
        cls = registry.get("metric", ref.name).cls
        for needed in getattr(cls, "requires", ()):
            if earlier_known and needed not in earlier:
                makers = [
                    n
                    for n in registry.names("metric")
                    if needed in (getattr(registry.get("metric", n).cls, "produces", None) or ())
                ]
                hint = f"; list {' or '.join(makers)} before it" if makers else ""
                raise ConfigError(
                    f"evaluate.metrics[{i}]: {ref.name} needs {needed!r} from a metric listed "
                    f"before it{hint}"
                )
        listing = getattr(cls, "produces", None)
        earlier_known = earlier_known and listing is not None
        earlier.update(listing or ())
    produced, complete = metric_outputs(params, registry)
    names = ", ".join(sorted(produced)) or "none"
    deploy = params.deploy
    for name in deploy.gates:
        if complete and name not in produced:
            raise ConfigError(
                f"deploy.gates.{name}: no metric in evaluate.metrics produces {name!r}; "
                f"gates can use: {names}"
            )
    if deploy.policy in POLICY_METRICS:
        name = POLICY_METRICS[deploy.policy][0]
        if complete and name not in produced:
            raise ConfigError(
                f"deploy.policy: {deploy.policy!r} ranks by {name}, which no metric in "
                "evaluate.metrics produces; add the metric that does"
            )
    if deploy.policy == "best":
        if complete and deploy.quality not in produced:
            raise ConfigError(
                f"deploy.quality: no metric in evaluate.metrics produces {deploy.quality!r}; "
                f"choose one of: {names}"
            )
        if deploy.quality in produced and produced[deploy.quality] is None:
            ranked = ", ".join(sorted(k for k, v in produced.items() if v))
            raise ConfigError(
                f"deploy.quality: {deploy.quality!r} is neither better low nor high; "
                f"choose one of: {ranked}"
            )
