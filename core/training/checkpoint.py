"""Step checkpoints of a training run, written atomically and verified before a resume.

A checkpoint is a directory ``step-000120/`` holding everything a run needs to continue as
if it had never stopped:

- ``model.safetensors``: the trainable parameters (frozen ones are rebuilt from the
  run's inputs, which the run key pins);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state, tensors keyed by
  parameter name, the rest (step counts, hyper-parameters of each group) as JSON;
- ``trainer.json``: the step, the loss curve so far, the scheduler's and the gradient
  scaler's state;
- ``rng-rank<R>.safetensors`` + ``rng-rank<R>.json``: each process's random states
  (torch CPU and CUDA, Python, NumPy) and the data generator's, which fixes the data order;
- ``manifest.json``, written last: the run key, the step and the sha256 of every file.

Nothing is pickled: loading needs no ``torch.load``. The files go into a hidden
``.step-000120.partial/`` directory that is renamed into place once every process has
written its part and the manifest is complete, so a crash (even ``kill -9``) leaves either
a whole checkpoint or none. A checkpoint whose files do not match its manifest (truncated,
corrupt) is skipped with a warning and the one before it is used.

Checkpoints live under ``<root>/<run key>/``: the key hashes the training config and the
run's inputs, so a run never resumes from a checkpoint of a different config or data.
With several processes the directory must be on a filesystem that all of them see.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.store.artifacts import sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger("unbottle.checkpoint")

#: The folder beside a workspace's artifacts that holds its runs' checkpoints by default
#: (``train.checkpoint_dir`` unset): ``artifacts/.checkpoints/<stage>/<run key>/``.
FOLDER = ".checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class Restored:
    """What a verified checkpoint holds, ready to be put back into the run."""

    step: int
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_json: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """The checkpoints of one run (one run key), newest ``keep`` kept."""

    def __init__(
        self, root: Path, run_key: str, *, every: int, keep: int, keep_last: bool = False
    ) -> None:
        self.run_key = run_key
        self.dir = Path(root) / run_key[:16]
        self.every = every
        self.keep = keep
        #: Checkpoint the last step too: for a run whose result a check after training may
        #: refuse, so that a rerun which passes it resumes there instead of training again.
        self.keep_last = keep_last

    def due(self, step: int, total: int) -> bool:
        """Whether to checkpoint after ``step`` (1-based) of ``total``; the last needs none
        unless ``keep_last`` (the artifact written from it replaces its checkpoints)."""
        if self.every <= 0:
            return False
        return self.keep_last if step == total else step % self.every == 0

    # ----------------------------------------------------------------------- writing

    def partial_dir(self, step: int) -> Path:
        return self.dir / f".step-{step:06d}.partial"

    def final_dir(self, step: int) -> Path:
        return self.dir / f"step-{step:06d}"

    def begin(self, step: int) -> Path:
        """Main process: an empty directory to write the checkpoint of ``step`` into."""
        tmp = self.partial_dir(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def write_main(
        self,
        tmp: Path,
        *,
        step: int,
        model: dict[str, torch.Tensor],
        optimizer: dict[str, Any],
        trainer: dict[str, Any],
    ) -> None:
        """Main process: the model, optimizer and trainer state of the run."""
        from safetensors.torch import save_file

        save_file(_contiguous(model), str(tmp / "model.safetensors"))
        tensors, meta = flatten_optimizer_state(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
        _write_json(tmp / "trainer.json", {"step": step, **trainer})

    @staticmethod
    def write_rank(tmp: Path, rank: int, generator: torch.Generator | None) -> None:
        """Every process: its own random states (and the data generator's)."""
        from safetensors.torch import save_file

        tensors, meta = capture_rng(generator)
        save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
        _write_json(tmp / f"rng-rank{rank}.json", meta)

    def commit(self, tmp: Path, step: int, world_size: int) -> Path:
        """Main process, once every process has written: manifest, rename, rotate."""
        files = {}
        for path in sorted(tmp.iterdir()):
            _fsync(path)
            files[path.name] = sha256_file(path)
        manifest = {
            "format": FORMAT,
            "run_key": self.run_key,
            "step": step,
            "world_size": world_size,
            "files": files,
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        final = self.final_dir(step)
        if final.exists():  # left by an earlier attempt that got this far: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.dir)
        self._rotate()
        return final

    def _rotate(self) -> None:
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.final_dir(old), ignore_errors=True)
        for stale in self.dir.glob(".step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)

    def clear(self) -> None:
        """Remove this run's checkpoints (once its artifact is safely written)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        parent = self.dir.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()

    # ----------------------------------------------------------------------- reading

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first (not yet verified)."""
        if not self.dir.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.dir.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def verify(self, step: int) -> str | None:
        """None if the checkpoint of ``step`` is whole, else what is wrong with it."""
        path = self.final_dir(step)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{MANIFEST} is missing or unreadable"
        if manifest.get("format") != FORMAT or manifest.get("run_key") != self.run_key:
            return "it belongs to another run"
        if manifest.get("step") != step:
            return f"its manifest names step {manifest.get('step')}"
        for name, digest in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if sha256_file(file) != digest:
                return f"{name} does not match its sha256"
        return None

    def latest_valid(self) -> int | None:
        """The newest checkpoint whose files match its manifest; corrupt ones are skipped."""
        for step in reversed(self.steps()):
            problem = self.verify(step)
            if problem is None:
                return step
            log.warning(
                "checkpoint %s is unusable (%s); skipping it", self.final_dir(step), problem
            )
        return None

    def load(self, step: int, rank: int) -> Restored:
        from safetensors.torch import load_file

        path = self.final_dir(step)
        rng_file = path / f"rng-rank{rank}.safetensors"
        if not rng_file.is_file():
            from unbottle.core.contract.errors import ConfigError

            raise ConfigError(
                f"checkpoint {path} has no random state for process {rank}: every process "
                "must see the checkpoint directory (train.checkpoint_dir on a shared filesystem)"
            )
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        optimizer = unflatten_optimizer_state(load_file(path / "optimizer.safetensors"), meta)
        return Restored(
            step=step,
            path=path,
            model=load_file(path / "model.safetensors"),
            optimizer=optimizer,
            trainer=json.loads((path / "trainer.json").read_text(encoding="utf-8")),
            rng_tensors=load_file(rng_file),
            rng_json=json.loads((path / f"rng-rank{rank}.json").read_text(encoding="utf-8")),
        )


# ------------------------------------------------------------------ optimizer state


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a (parameter-name keyed) optimizer state dict into tensors and JSON.

    ``{"state": {name: {key: value}}, "param_groups": [...]}`` becomes tensors named
    ``name/key`` and a JSON document with every non-tensor value (ints, floats, None,
    tuples as lists) and the param groups.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(name), {})[key] = value
    groups = []
    for group in state["param_groups"]:
        clean = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                tensors[f"param_groups/{len(groups)}/{key}"] = value.detach().cpu().contiguous()
            else:
                clean[key] = value
        groups.append(clean)
    return tensors, {"scalars": scalars, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    groups = [dict(g) for g in meta["param_groups"]]
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition("/")
        if owner.startswith("param_groups/"):
            groups[int(owner.split("/")[1])][leaf] = value
        else:
            state.setdefault(owner, {})[leaf] = value
    for owner, entries in meta["scalars"].items():
        state.setdefault(owner, {}).update(entries)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- RNG states


def capture_rng(generator: torch.Generator | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """This process's random states: tensors for safetensors, the rest as JSON."""
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    if generator is not None:
        tensors["data_generator"] = generator.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(restored: Restored, generator: torch.Generator | None) -> None:
    import numpy as np
    import torch

    tensors, meta = restored.rng_tensors, restored.rng_json
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if generator is not None:
        generator.set_state(tensors["data_generator"])
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- files


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and tensors that share storage (tied weights): copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry) to disk, so a rename never outruns its data."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
