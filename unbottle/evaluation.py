"""What evaluation metrics share: the held-out text as tokens, and the QA task's format.

- :func:`encode_stream`: a text as one (N,) stream of token ids, an EOS after each
  document; :func:`documents`: a text split into its documents (at page breaks where it
  has any, else at blank lines).
- The question-answering task: :class:`PromptFormat` renders a question as the finetuned
  model saw it and as the server's chat endpoint renders it (``ctx.prompt_format``, the
  format the finetune stage recorded: chat template or completion); :func:`prompt` is the
  completion form; :func:`exact_match` compares a prediction with an answer after
  :func:`normalize`; :func:`read_pairs` reads question/answer, prompt/completion and
  messages records; :func:`choose_shots` draws few-shot examples (seeded, never the
  question asked) and :meth:`PromptFormat.few_shot_text` places them before it.
- :data:`MANIFEST`: the file name of a variant's manifest, which is not a weight file.
- :func:`progress_bar` and :func:`track`: a rich progress bar with an ETA for a metric's
  long loops (quiet when the output is not a terminal).

A metric receives the model as a :class:`unbottle.ModelRunner`, whatever its runtime.
:class:`TorchRunner` is the one for a model in torch; a deploy target whose bundle
unbottle's runners do not load builds its ``runner`` on it (the ``gguf`` target does).
A runner's optional ``weight_counts()`` returns :class:`WeightCounts`, which adds the
decoder's linear layers to ``parameter_counts()``.
"""

from __future__ import annotations

from unbottle.core.data.prompts import (
    PromptFormat,
    choose_shots,
    exact_match,
    few_shot_prompt,
    normalize,
    prompt,
    read_pairs,
)
from unbottle.core.models.loading import documents, encode_stream
from unbottle.core.models.runtimes import TorchRunner, WeightCounts
from unbottle.core.progress import progress_bar, track
from unbottle.core.store.artifacts import MANIFEST

__all__ = [
    "MANIFEST",
    "PromptFormat",
    "TorchRunner",
    "WeightCounts",
    "choose_shots",
    "documents",
    "encode_stream",
    "exact_match",
    "few_shot_prompt",
    "normalize",
    "progress_bar",
    "prompt",
    "read_pairs",
    "track",
]
