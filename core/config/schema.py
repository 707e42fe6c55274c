"""The schema of params.yaml: one frozen pydantic section per stage.

This checks the structure (unknown keys, types, ranges) of the file; the strategy names
in it are resolved against the installed plugins later, by
:mod:`unbottle.core.config.strategy_checks`. Loading the file and applying ``-S``
overrides is :mod:`unbottle.core.config.loading`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from unbottle.core.config.sweep import expand_sweep
from unbottle.core.contract.errors import echo, shorten
from unbottle.core.contract.kinds import STEP_KINDS


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
    # Train on this many documents drawn at random from the corpus (None: on all): the
    # trainer's memory grows with the distinct words it counts.
    sample_documents: int | None = Field(None, ge=1)


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
    # Delete the run's checkpoints once its artifact is written; false keeps them (the
    # newest keep_checkpoints), to measure the model along the run or resume from them.
    clear_checkpoints: bool = True
    # Refuse to start when the estimated memory exceeds what the device has free.
    memory_check: bool = True


class ContinuedTrainParams(TrainParams):
    """Training a pretrained ``pretrain.source`` further on ``data.train_text`` (continued,
    or domain-adaptive, pretraining): :class:`TrainParams` with defaults for a model that
    has already learnt language. A from-scratch learning rate (3e-3) would undo much of
    what it knows; 1e-4 is the order continued pretraining uses (Gururangan et al., "Don't
    Stop Pretraining", ACL 2020, trained RoBERTa further at 1e-4)."""

    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=8)
    lr: float = Field(1e-4, gt=0, le=10)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # What trains, chosen among the finetune methods (plugins/finetune.py): full (every
    # weight), lora (adapters, merged into the artifact at the end: the gradients and the
    # optimizer's state are the adapters') or partial. On SmolLM2 LoRA stored far fewer
    # facts and did not forget less (BENCHMARKS.md): it saves memory, not knowledge.
    method: StrategyRef = StrategyRef(name="full")
    # Text of other kinds the model should stay good at (the formats of data.train_text):
    # its perplexity is measured before and after training, so each run reports what it
    # cost the model elsewhere (forgetting). None: not measured.
    reference_text: Path | None = None
    # Tokens of reference_text scored each time (its opening ones).
    reference_tokens: int = Field(4096, ge=16)
    # The most reference_text's perplexity may rise (after / before): above it, the stage
    # fails and writes no model, so nothing downstream runs on one that forgot that much.
    # None: measured and reported, not limited.
    max_reference_ratio: float | None = Field(None, gt=0)
    # Text of the kinds the source was trained on, mixed back into training against
    # forgetting (replay): each row of a batch comes from it with probability
    # replay_fraction, from data.train_text otherwise. None: no replay.
    replay_text: Path | None = None
    replay_fraction: float = Field(0.25, gt=0, lt=1)

    @model_validator(mode="after")
    def _limit_has_a_text(self) -> ContinuedTrainParams:
        if self.max_reference_ratio is not None and self.reference_text is None:
            raise ValueError(
                "max_reference_ratio needs reference_text, the text whose perplexity it limits"
            )
        return self


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
    # A pretrained model to start from: the stage converts or copies it, and trains it
    # further only if `continued` says how (tokenizer, model and train are then unused).
    # None: pretrain from scratch.
    source: SourceParams | None = None
    # With a source: continued pretraining of it on data.train_text, on `objective` (a
    # causal one); None: the source is the stage's artifact as it is.
    continued: ContinuedTrainParams | None = None

    @model_validator(mode="after")
    def _continues_a_source(self) -> PretrainParams:
        if self.continued is not None and self.source is None:
            raise ValueError(
                "continued: trains a pretrained `source` further, and no source is set; "
                "set pretrain.source, or drop `continued` (pretrain.train trains from scratch)"
            )
        return self

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
    # What the windows are drawn from: the prose of data.train_text, the pairs of
    # data.qa_train rendered as finetuning rendered them (a chat model's template and
    # turns), or half of each; auto is both for a model finetuned in chat format and
    # train_text otherwise. See docs/compression.md, "Calibration data".
    source: Literal["auto", "train_text", "qa_train", "both"] = "auto"


_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
BASELINE = "finetuned"
RESERVED_NAMES = (BASELINE, "pretrained")  # rows of the evaluation that are not variants


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
            for n in (
                "memory",
                "perplexity",
                "answer_perplexity",
                "accuracy",
                "samples",
                "size",
                "speed",
                "roofline",
            )
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
