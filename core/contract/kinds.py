"""The kinds of strategy, in one table: every other place that knows the kinds reads it.

A kind is a family of interchangeable strategies (optimizers, pruners, metrics...). Each
entry says how plugins register one (its hook), what one must implement (its protocol in
:mod:`unbottle.core.contract.strategies`), how messages name one, and where params.yaml
chooses one. The hook specifications (:mod:`unbottle.core.contract.hookspecs`), the
registry's checks and messages (:mod:`unbottle.core.registry`) and the params resolution
(:func:`unbottle.core.config.strategy_checks.strategy_refs`) are derived from this table, so a new
kind is one protocol and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from unbottle.core.contract import strategies as s


@dataclass(frozen=True)
class Kind:
    """One kind of strategy."""

    #: The kind's key: in the registry, in ``unbottle plugins`` and in manifests.
    name: str
    #: How one line of an error message names a strategy of this kind.
    label: str
    #: The registration hook plugins implement: ``hook(register)``.
    hook: str
    #: The protocol a strategy of this kind implements.
    protocol: type
    #: Where params.yaml names a strategy of this kind: dotted key paths to a
    #: ``StrategyRef``, with ``[]`` after a list of them.
    params: tuple[str, ...] = ()
    #: For the kinds that are steps of a compress recipe: the step's key (``prune``).
    step: str | None = None
    #: The hook's documentation: when it is called and what a strategy does.
    doc: str = ""

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods of the protocol's work, checked when a strategy registers."""
        return tuple(
            name
            for name, value in vars(self.protocol).items()
            if callable(value) and not name.startswith("_")
        )


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "parallelism",
            "parallelism strategy",
            "register_parallelism",
            s.ParallelismStrategy,
            params=(
                "pretrain.train.parallelism",
                "pretrain.continued.parallelism",
                "finetune.train.parallelism",
            ),
            doc="""Register training-parallelism strategies (protocol ``ParallelismStrategy``).

    Called once at plugin load. A strategy builds the ``accelerate.Accelerator`` that the
    pretrain and finetune loops run through, so data, model or hybrid parallelism plug in
    without changing the loop. Chosen by ``pretrain.train.parallelism`` (or
    ``pretrain.continued.parallelism``) and ``finetune.train.parallelism`` in params.yaml.
    """,
        ),
        Kind(
            "optimizer",
            "optimizer",
            "register_optimizers",
            s.OptimizerStrategy,
            params=(
                "pretrain.train.optimizer",
                "pretrain.continued.optimizer",
                "finetune.train.optimizer",
            ),
            doc="""Register optimizers (protocol ``OptimizerStrategy``).

    A strategy turns the trainable parameters and a learning rate into a
    ``torch.optim.Optimizer``. Chosen by ``pretrain.train.optimizer`` (or
    ``pretrain.continued.optimizer``) and ``finetune.train.optimizer``.
    """,
        ),
        Kind(
            "objective",
            "pretraining objective",
            "register_objectives",
            s.Objective,
            params=("pretrain.objective",),
            doc="""Register pretraining objectives (protocol ``Objective``).

    An objective builds the model pretraining starts from (a causal decoder, an
    encoder...), turns the training text into its examples, and measures the trained model
    on held-out text. Chosen by ``pretrain.objective``.
    """,
        ),
        Kind(
            "finetune_method",
            "finetune method",
            "register_finetune_methods",
            s.FinetuneMethod,
            params=("finetune.method", "pretrain.continued.method"),
            doc="""Register finetuning methods (protocol ``FinetuneMethod``).

    A method decides which weights train (all of them, an adapter, a subset) and how the
    result is folded back into a plain model for the stages downstream. Chosen by
    ``finetune.method``, and by ``pretrain.continued.method`` for a source trained further.
    Messages name an option ``finetune.method.<option>``; for continued pretraining the
    stage renames the key.
    """,
        ),
        Kind(
            "pruning",
            "pruning strategy",
            "register_pruners",
            s.Pruner,
            step="prune",
            doc="""Register pruning strategies (protocol ``Pruner``).

    A pruner edits a float model in place (zeros in the weights, or a physically smaller
    model) and returns metrics such as the achieved sparsity. Used by a ``prune`` step of a
    compress recipe: ``compress.variants.<name>: [{prune: <strategy>, ...options}]``.
    """,
        ),
        Kind(
            "quantization",
            "quantization strategy",
            "register_quantizers",
            s.Quantizer,
            step="quantize",
            doc="""Register quantization strategies (protocol ``Quantizer``).

    A quantizer reads a float model saved in Hugging Face format and writes a model that
    stores low-bit weights, in the format named by its ``output_format``. It must be the
    last step of a recipe. Used by a ``quantize`` step of a compress recipe.
    """,
        ),
        Kind(
            "distillation",
            "distillation strategy",
            "register_distillers",
            s.Distiller,
            step="distill",
            doc="""Register knowledge-distillation strategies (protocol ``Distiller``).

    A distiller trains a student from the model that the previous recipe steps produced
    (the teacher) and returns the student. Used by a ``distill`` step of a compress recipe.
    """,
        ),
        Kind(
            "metric",
            "metric",
            "register_metrics",
            s.Metric,
            params=("evaluate.metrics[]",),
            doc="""Register evaluation metrics (protocol ``Metric``).

    A metric measures one model variant through the runtime that serves it (torch or ONNX
    Runtime) and returns named numbers. Chosen by the list ``evaluate.metrics``. Optional
    class attributes ``produces`` (name -> "lower"/"higher"/None) and ``requires`` let
    params that gate on, or build on, its names be checked before any work.
    """,
        ),
        Kind(
            "deploy_target",
            "deploy target",
            "register_deploy_targets",
            s.DeployTarget,
            params=("deploy.target",),
            doc="""Register deploy targets (protocol ``DeployTarget``).

    A target turns the chosen, evaluated variant into something people run: a bundle on
    disk, an edge package, a server. Chosen by ``deploy.target``.
    """,
        ),
    )
}

#: The compress-step keys and the kind each names: ``{"prune": "pruning", ...}``.
STEP_KINDS: dict[str, str] = {kind.step: kind.name for kind in KINDS.values() if kind.step}
