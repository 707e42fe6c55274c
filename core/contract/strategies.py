"""The interfaces that strategies implement, as ``typing.Protocol``s.

A plugin does not inherit from anything here: a class with the right attributes and
method *is* a strategy (structural typing keeps plugins decoupled from unbottle's class
hierarchy). The only thing a plugin subclasses is :class:`StrategyConfig`, so that its
options are validated the same way as the rest of params.yaml.

Heavy types (torch, transformers, accelerate) appear only in annotations, so importing
this module stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from unbottle.core.config.schema import ModelParams
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.models.runtimes import ModelRunner
    from unbottle.core.training.loop import Batches


class StrategyConfig(BaseModel):
    """Base of every strategy's options: unknown keys are an error, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a regular expression: {e}") from None
    return pattern


#: An option that is a regular expression (over module or parameter names): validated to
#: compile, so a typo is one line naming the option, e.g. ``layers: Regex = r"mlp"``.
Regex = Annotated[str, AfterValidator(_compiles)]


@runtime_checkable
class Strategy(Protocol):
    """What every strategy has: a name users write in params, and a config model."""

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]]
    #: The validated options; manifests record them.
    config: StrategyConfig

    def __init__(self, config: Any) -> None: ...


class ParallelismStrategy(Strategy, Protocol):
    def accelerator(self, *, mixed_precision: str) -> Accelerator:
        """Return the Accelerator the training loop runs through."""
        ...


@dataclass(frozen=True)
class DataSplit:
    """How a step's global batch is split: over ``size`` data-parallel groups, this
    process being in group ``rank``; ``group`` is the process group that sums over those
    groups (None: every process). Processes in one group (tensor or pipeline parallel
    peers) see the same rows."""

    size: int
    rank: int
    group: Any = None


class ModelParallelStrategy(ParallelismStrategy, Protocol):
    """A parallelism strategy that shards the model itself (FSDP, tensor, pipeline and
    their meshes). The training loop calls these instead of ``accelerator.prepare`` on
    the model; the accelerator still gives the device, autocast and the process group.

    Optional, for strategies that run the step themselves (pipeline parallelism):
    ``forward_backward(module, micro_batches, num_items) -> loss`` (the global batch's
    loss share of this data-parallel group, the same on every process of the group);
    ``gather_state(state) -> state`` (whole model or optimizer state from every
    process's part, on the main process) and ``local_state(module, state) -> state``
    (this process's part of a whole state).
    """

    def check_model(self, model: torch.nn.Module, cfg: Any, key: str) -> None:
        """Refuse, in one line naming ``key``, a model or config the strategy cannot run:
        called before any work (on a weightless model too)."""
        ...

    def data_split(self) -> DataSplit:
        """How the global batch splits over this run's processes (after ``accelerator``)."""
        ...

    def parallelize(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Return the module to train: this process's shard of ``model`` on ``device``."""
        ...

    def clip_grad_norm(self, module: torch.nn.Module, max_norm: float) -> float:
        """Clip the gradients of the whole model (all shards) to ``max_norm``."""
        ...

    def final_model(self, module: torch.nn.Module) -> PreTrainedModel:
        """The trained model, whole, as a plain module (needed on the main process)."""
        ...

    def memory_split(self, world_size: int) -> Any:
        """The per-process share, as a ``core.training.memory.Split``."""
        ...


class OptimizerStrategy(Strategy, Protocol):
    def build(
        self, parameters: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """Return an optimizer over ``parameters``."""
        ...


class FinetuneMethod(Strategy, Protocol):
    def prepare(self, model: PreTrainedModel) -> torch.nn.Module:
        """Return the module to train (the model itself, or a wrapper with adapters)."""
        ...

    def finalize(self, model: torch.nn.Module, out_dir: Path) -> PreTrainedModel:
        """Return a plain model for the stages downstream; may save extras under out_dir."""
        ...


class PretrainContext:
    """The corpus an objective trains on (or, in ``evaluate``, the held-out text), with
    the tokenizer (trained on it by the stage, or a ``pretrain.source``'s own) and the
    run's sequence length and seed.

    ``text`` is a string, or a :class:`~unbottle.core.data.corpus.Corpus` of files (what
    the pretrain stage gives): its documents are then read as they are needed and its
    token ids mapped from a file, so the corpus need not fit in memory. ``key`` is the
    params section the training settings come from (``pretrain.train``, or
    ``pretrain.continued`` for a source trained further), for error messages.
    """

    def __init__(
        self,
        text: str | Corpus,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        seed: int = 0,
        key: str = "pretrain.train",
    ) -> None:
        from unbottle.core.data.corpus import Corpus

        self.corpus = text if isinstance(text, Corpus) else Corpus.of_text(text)
        self.tokenizer, self.seq_len, self.seed, self.key = tokenizer, seq_len, seed, key
        self._token_ids: torch.Tensor | None = None

    def __repr__(self) -> str:
        where = self.corpus.path or "a string"
        return f"PretrainContext({where}, seq_len={self.seq_len}, seed={self.seed})"

    @property
    def text(self) -> str:
        """The whole corpus as one string. It is read into memory on each use: prefer
        :meth:`documents`, :meth:`token_ids` or :meth:`stream`."""
        return self.corpus.text()

    def documents(self) -> list[str]:
        """The corpus's documents (see :func:`unbottle.core.models.loading.documents`);
        ``self.corpus.documents()`` yields them one at a time instead."""
        return list(self.corpus.documents())

    def token_ids(self) -> torch.Tensor:
        """The corpus as one 1-D stream of token ids, documents each followed by EOS, in
        the narrowest unsigned integer type that holds them (``uint16`` for up to 65,536
        tokens): for a corpus of files, memory-mapped from its token file. Index it and
        convert what you take with ``.long()``."""
        if self._token_ids is None:
            self._token_ids = self.corpus.token_ids(self.tokenizer)
        return self._token_ids

    def stream(self) -> torch.Tensor:
        """:meth:`token_ids` as a LongTensor in memory (8 bytes a token)."""
        return self.token_ids().long()


class Objective(Strategy, Protocol):
    """What pretraining optimises, and the model it optimises it on.

    ``model_kind`` says what the stages downstream get: ``"causal"`` (a decoder that
    finetune, compress, evaluate and deploy take) or ``"encoder"`` (they refuse it; the
    pretrain stage reports the objective's own held-out figures instead).
    ``architectures`` lists the model architectures the objective trains; the first is
    the default of ``pretrain.model.architecture``.

    An optional method ``loss(model, batch) -> Tensor`` replaces the training loop's
    causal-LM loss with a per-micro-batch mean (see ``core/training/loop.py``).
    """

    model_kind: ClassVar[Literal["causal", "encoder"]]
    architectures: ClassVar[tuple[str, ...]]

    def build_model(
        self, cfg: ModelParams, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> PreTrainedModel:
        """Return the untrained model for ``cfg`` (``cfg.architecture`` None: the first of
        ``architectures``); may first add the special tokens it needs to ``tokenizer``."""
        ...

    def batches(self, ctx: PretrainContext) -> Batches:
        """Return the training examples of ``ctx``'s corpus for the training loop."""
        ...

    def evaluate(self, model: PreTrainedModel, ctx: PretrainContext) -> dict[str, float]:
        """Measure the trained model on the held-out corpus of ``ctx``; return named numbers
        (``{}`` for a causal model: the evaluate stage measures those)."""
        ...


@dataclass
class CompressContext:
    """What a compress step may use besides the model.

    ``calibration`` holds LongTensors of token ids of shape (1, T) drawn from the
    pipeline's own data, as ``compress.calibration.source`` says: the training text, the
    finetuning pairs rendered as finetuning rendered them, or both; ``train_ids`` is the
    whole training text as one 1-D tensor of token ids. In the stage it is memory-mapped
    from the text's token file in the narrowest unsigned type that holds the vocabulary
    (``uint16`` up to 65,536 tokens), like :meth:`PretrainContext.token_ids`: index it
    and convert the windows you take with ``.long()``. ``conversations`` is the pairs as
    finetuning rendered them, one after another (1-D), with ``conversation_starts``
    where each begins, when the source takes pairs; ``conversation_share`` is the share
    of the source that is pairs (0, 0.5 or 1). A distiller trains on
    :meth:`training_windows`, which draws from the same source. ``teacher`` is the float
    model the variant started from (the finetuned model), unchanged by the steps before:
    a distiller's teacher. Treat it as read-only. ``where`` is the step's key path in
    params (``compress.variants.g64[1]``), for error messages; empty when the step runs
    outside a compress stage.
    """

    tokenizer: PreTrainedTokenizerBase
    calibration: Sequence[torch.Tensor]
    train_ids: torch.Tensor
    seed: int = 0
    work_dir: Path | None = None
    teacher: PreTrainedModel | None = None
    where: str = ""
    conversations: torch.Tensor | None = None
    conversation_starts: Sequence[int] = ()
    conversation_share: float = 0.0

    def training_windows(
        self, count: int, seq_len: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``count`` training windows of ``seq_len`` tokens, (count, seq_len) LongTensor,
        drawn with ``generator`` from the calibration's source: the share of rows that
        source gives the pairs (rounded up, and after the prose's rows) start where a
        pair starts, as a request does; the others start anywhere in ``train_ids``.

        Distilling a chat model on its training prose alone teaches the student text it
        is never asked, as calibrating on it alone compressed for it (BENCHMARKS.md).
        """
        import math

        import torch

        from unbottle.core.data.windows import pair_windows, text_windows

        from_pairs = math.ceil(count * self.conversation_share)
        errors = {"what": self.where or "compress", "lower": "the step's seq_len"}
        rows = []
        if count > from_pairs:
            rows += text_windows(self.train_ids, count - from_pairs, seq_len, generator, **errors)
        if from_pairs:
            ids = self.conversations if self.conversations is not None else torch.zeros(0)
            starts = self.conversation_starts
            rows += pair_windows(ids, starts, from_pairs, seq_len, generator, **errors)
        return torch.stack(rows)


# Any compress strategy may also define ``check_model(self, model, where: str) -> None``
# (refuse options that cannot apply to a weightless copy of the model the step will see,
# the message starting with ``where``) and ``keeps_shape = True`` (the step changes no
# shape). The fail-fast setup calls them before loading anything (docs/plugins.md).


class Pruner(Strategy, Protocol):
    def prune(self, model: PreTrainedModel, ctx: CompressContext) -> dict[str, float]:
        """Prune ``model`` in place; return metrics (at least ``sparsity``)."""
        ...


class Quantizer(Strategy, Protocol):
    #: The format of what ``quantize`` writes ("hf", "onnx", ...); evaluation loads it.
    output_format: ClassVar[str]

    def quantize(self, model_dir: Path, out_dir: Path, ctx: CompressContext) -> dict[str, float]:
        """Read a float model in HF format from model_dir; write the quantized model."""
        ...


class Distiller(Strategy, Protocol):
    def distill(
        self, model: PreTrainedModel, ctx: CompressContext
    ) -> tuple[PreTrainedModel, dict[str, float]]:
        """Train a student made from ``model`` (the recipe's current model) to imitate
        ``ctx.teacher``; return it with metrics."""
        ...


class EvalContext:
    """The held-out material every metric may draw on.

    ``valid_text`` is given as a string or as a :class:`~unbottle.core.data.corpus.Corpus`
    of files (what the evaluate stage gives): the held-out documents are then read from
    the files as a metric needs them, so a held-out file of any size costs a metric with
    a token budget only the documents that fill it.

    - ``questions``: the held-out question/answer pairs (data.qa_test).
    - ``samples``: examples a metric keeps for ``evaluation.json``.
    - ``measured``: what the metrics before this one measured for the same model (a
      metric that builds on another's figure, like ``roofline`` on
      ``decode_tokens_per_s``, reads it).
    - ``prompt_format``: how finetuning rendered prompts (chat template or completion),
      so a metric asks ``questions`` the way the served model expects:
      ``prompt_format.prompt_text(tokenizer, pair)``. None: the completion format.
    - ``train_pairs``: the solved training pairs (data.qa_train) few-shot prompts draw
      examples from.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        valid_text: str | Corpus,
        questions: list[dict[str, str]],
        model_dir: Path,
        seed: int = 0,
        samples: dict[str, Any] | None = None,
        measured: dict[str, Any] | None = None,
        prompt_format: Any = None,
        train_pairs: list[dict[str, str]] | None = None,
    ) -> None:
        from unbottle.core.data.corpus import Corpus

        self.tokenizer = tokenizer
        self.corpus = (
            valid_text
            if isinstance(valid_text, Corpus)
            else Corpus.of_text(valid_text, "data.valid_text")
        )
        self.questions, self.model_dir, self.seed = questions, model_dir, seed
        self.samples = {} if samples is None else samples
        self.measured = {} if measured is None else measured
        self.prompt_format = prompt_format
        self.train_pairs = [] if train_pairs is None else train_pairs
        self._text: str | None = None
        # held_out_ids' memo: the ids of the opening documents, and whether that is all.
        self._ids: torch.Tensor | None = None
        self._ids_whole = False

    def __repr__(self) -> str:
        where = self.corpus.path or "a string"
        return f"EvalContext({where}, {len(self.questions)} questions, {self.model_dir})"

    @property
    def valid_text(self) -> str:
        """The whole held-out corpus as one string, each document followed by a page
        break; read into memory on first use and kept. Prefer :meth:`held_out_ids` or
        ``corpus.documents()``, which read only what they need."""
        if self._text is None:
            self._text = self.corpus.text()
        return self._text

    def held_out_ids(self, limit: int | None = None) -> torch.Tensor:
        """The held-out corpus's first ``limit`` token ids (None: all), a 1-D LongTensor
        with each document followed by EOS, as the pretrain stage tokenizes a corpus. Only
        the documents that fill ``limit`` are read and tokenized; the ids are kept for
        the model's next metric."""
        import contextlib
        import itertools

        import numpy as np
        import torch

        from unbottle.core.models.loading import ENCODE_BATCH, encode_documents

        have = self._ids
        if have is not None and (self._ids_whole or (limit is not None and len(have) >= limit)):
            return have[:limit]
        pieces, count, batch, whole = [np.empty(0, np.int64)], 0, 8, False
        with contextlib.closing(self.corpus.documents()) as docs:  # closes the file early
            while limit is None or count < limit:
                # A few documents first, more each round: a small budget tokenizes little.
                encoded = list(encode_documents(self.tokenizer, itertools.islice(docs, batch)))
                if not encoded:
                    whole = True
                    break
                pieces += encoded
                count += sum(len(ids) for ids in encoded)
                batch = min(2 * batch, ENCODE_BATCH)
        self._ids, self._ids_whole = torch.from_numpy(np.concatenate(pieces)), whole
        return self._ids[:limit]


@dataclass(frozen=True)
class ReportColumn:
    """How report.md shows one number a metric returns.

    ``label`` is the column's title; ``format`` a ``str.format`` pattern for the value
    (``"{:.3f}"``, ``"{:.1%}"``); ``direction`` says which way is better, ``"lower"`` or
    ``"higher"``, and is drawn as an arrow after the title (None: neither).
    """

    label: str
    format: str = "{:.4g}"
    direction: Literal["lower", "higher"] | None = None


class Metric(Strategy, Protocol):
    """Measures one variant.

    Three optional class attributes: ``produces``, the names ``measure`` returns, each
    mapped to ``"lower"`` or ``"higher"`` (which is better) or ``None`` (neither), so a
    quality gate on a name no configured metric produces is a config error; ``requires``,
    names an earlier metric in ``evaluate.metrics`` must produce (read from
    ``ctx.measured``), both checked before any work; and ``columns``, a
    ``{name: ReportColumn}`` mapping of the returned names that report.md shows as
    columns (the built-in metrics' columns are fixed in ``core/stages/report.py``).
    """

    def measure(self, model: ModelRunner, ctx: EvalContext) -> dict[str, float]:
        """Measure one variant; return named numbers (e.g. {"perplexity": 3.2})."""
        ...


@dataclass
class DeployContext:
    """What a deploy target knows about the variant it ships."""

    variant: str
    model_format: str
    metrics: dict[str, float]
    report_markdown: str
    manifest: dict[str, Any]
    #: A question from the user's held-out set (what the evaluation asked), for the
    #: bundle's usage example; None when the evaluation asked none.
    example_question: str | None = None
    #: How finetuning rendered prompts (``unbottle.evaluation.PromptFormat``): a usage
    #: example prompts the model the same way. None: the completion format.
    prompt_format: Any = None


class DeployTarget(Strategy, Protocol):
    """Writes the chosen variant as something people run.

    What ships is what was measured: from a format in ``ships_unchanged`` the bundle holds
    the evaluated variant as it is (the same weights, run by the same runtime), and the
    evaluate stage's row stands for it. From any other format the bundle is a new model
    (re-exported, re-quantized, re-encoded): the deploy stage measures it with the
    evaluate stage's metrics through ``runner(bundle_dir, device)`` (when the target has
    that method; else unbottle's runner for an ``hf``, ``packed`` or ``onnx`` directory),
    applies ``deploy.gates`` to that row, and calls ``write_card(bundle_dir, ctx)`` (when
    the target has it) again with that row, so the card shows what ships.
    """

    #: The model formats this target can ship.
    accepts: ClassVar[tuple[str, ...]]
    #: The formats it ships unchanged (optional; absent means none: every bundle is
    #: measured).
    ships_unchanged: ClassVar[tuple[str, ...]]

    def deploy(self, model_dir: Path, out_dir: Path, ctx: DeployContext) -> dict[str, Any]:
        """Write the deployable bundle under out_dir; return facts about it."""
        ...
