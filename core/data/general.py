"""General text that every Python installation carries, for continued pretraining.

Continued pretraining on a user's corpus can make a model worse at everything else
(forgetting). Measuring that (``pretrain.continued.reference_text``) and countering it
(``replay_text``) both need text of the kinds the model was trained on, besides the
user's own. A sample of the model's own training data is best; where a user has none,
the texts here are at hand offline:

- ``python-docs.txt``: English technical prose, the language reference's topics as
  ``help('if')`` shows them (``pydoc_data.topics``);
- ``python-docs-1.txt`` and ``python-docs-2.txt``: the same in two halves that share no
  paragraph, one to replay in training, the other to measure on;
- ``python-code.txt``: source code, a fixed list of standard-library modules.

They depend on the Python version (its documentation and modules change), so their
hashes are printed, and the stage records them as its inputs like any other text. The
files are byte for byte what ``bench/general_perplexity.py --write-texts`` wrote for the
runs in BENCHMARKS.md (on Python 3.11.7).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from unbottle.core.contract.errors import DataError

#: Standard-library modules of ordinary Python, read in this order (about 200 KB).
STDLIB_MODULES = ("argparse.py", "textwrap.py", "dataclasses.py", "json/decoder.py", "shlex.py")


def python_docs(half: int | None = None) -> str:
    """The language reference's topics, in key order; with ``half`` 1 or 2, the first or
    the second half of the topics only. Topics repeat each other's paragraphs, so the
    second half leaves out every paragraph the first half has."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the documentation apart
        raise DataError(
            "python-docs: this Python has no pydoc_data.topics (the documentation "
            "topics of its standard library); install the full standard library"
        ) from None
    keys = sorted(topics)
    if half is None:
        return "\n\n".join(topics[key].strip() for key in keys)
    first = [topics[key].strip() for key in keys[: len(keys) // 2]]
    if half == 1:
        return "\n\n".join(first)
    seen = {paragraph.strip() for text in first for paragraph in text.split("\n\n")}
    second = [topics[key].strip() for key in keys[len(keys) // 2 :]]
    return "\n\n".join(
        paragraph
        for text in second
        for paragraph in text.split("\n\n")
        if paragraph.strip() not in seen
    )


def python_code() -> str:
    """The source of :data:`STDLIB_MODULES`, one after another."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    try:
        return "\n\n".join((stdlib / name).read_text(encoding="utf-8") for name in STDLIB_MODULES)
    except OSError as e:
        raise DataError(f"python-code: {e.filename}: {e.strerror}") from None


def general_texts() -> dict[str, str]:
    """The files :func:`write_general_texts` writes, by name."""
    return {
        "python-docs.txt": python_docs(),
        "python-docs-1.txt": python_docs(1),
        "python-docs-2.txt": python_docs(2),
        "python-code.txt": python_code(),
    }


def write_general_texts(out_dir: Path) -> dict[str, str]:
    """Write :func:`general_texts` into ``out_dir``, each file atomically (a file of the
    same name is replaced, nothing else in the folder is touched); return {name: sha256}."""
    import hashlib

    from unbottle.core.store.artifacts import write_text_atomic

    hashes = {}
    for name, text in general_texts().items():
        write_text_atomic(Path(out_dir) / name, text)
        hashes[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hashes
