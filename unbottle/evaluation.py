"""What evaluation metrics share: the held-out text as tokens, and the QA task's format.

- :func:`encode_stream`: a text as one (N,) stream of token ids with an EOS between
  documents; :func:`documents`: a text split into its documents.
- The question-answering task: :func:`prompt` formats a question as the finetuned model
  saw it, :func:`exact_match` compares a prediction with an answer after
  :func:`normalize`.
- :data:`MANIFEST`: the file name of a variant's manifest, which is not a weight file.

A metric receives the model as a :class:`unbottle.ModelRunner`, whatever its runtime.
"""

from __future__ import annotations

from unbottle.core.data.prompts import exact_match, normalize, prompt
from unbottle.core.models.loading import documents, encode_stream
from unbottle.core.store.artifacts import MANIFEST

__all__ = ["MANIFEST", "documents", "encode_stream", "exact_match", "normalize", "prompt"]
