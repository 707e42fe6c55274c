"""One calibration pass over a decoder, block by block: what Wanda, SparseGPT and GPTQ share.

SparseGPT (Frantar & Alistarh, 2023) and GPTQ (Frantar et al., 2022) compress a model
*sequentially*: the calibration sequences are run to the first decoder block; each block
is compressed from statistics of what enters its Linear layers, and the block's output,
computed with the compressed weights, becomes the input of the next block, so every
block sees (and compensates for) the errors of the ones before it.

This module runs that pass once per block, in the order the data flows inside it ("true
sequential" in the GPTQ code). Which Linears share an input, and in what order a block
reaches them, comes from one table, :data:`unbottle.core.compression.mappings.ARCHITECTURES`;
for the Llama family:

    q/k/v   <- input_layernorm(x)                     statistics, then compress q, k, v
    o       <- attention(q, k, v)                     statistics, then compress o
    gate/up <- post_attention_layernorm(x + o(...))   statistics, then compress gate, up
    down    <- act(gate) * up                         statistics, then compress down

Each batch runs through the block's own ``forward`` and stops at each group until the
group is compressed (:class:`_BlockRun`), so each Linear is compressed from inputs
produced by the already-compressed layers before it, and each block costs one forward
pass per batch (not one per group, as restarting the block for each group would), which
is what keeps 128 x 512 calibration tokens on a 135M model within minutes on two CPU
cores.

With ``head=True`` (the quantizers' ``quantize_head``) the output head comes last:
its input is the final norm of the last block's outputs, computed with every block
already compressed, so the head compensates for the errors of the whole stack.

A method sees each Linear once, through a callback ``process(name, linear, stats)``: it
may rewrite ``linear.weight`` in place (prune or fake-quantize it) and keep whatever it
needs (masks, integer codes); the pass then carries on with the rewritten weights. A
method that treats output rows independently (GPTQ) may take the Linears that share an
input together instead, through ``process_together``, and stack them.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbottle.core.compression.mappings import Architecture, architecture_of
from unbottle.core.contract.errors import ConfigError
from unbottle.core.heap import return_large_frees_to_the_os

if TYPE_CHECKING:
    import torch


@dataclass
class InputStats:
    """What entered one Linear over the whole calibration set.

    ``sq_norm[j]`` is the sum over tokens of x_j^2 (Wanda's ||X_j||_2^2); ``hessian`` is
    the sum over tokens of x x^T, the (in, in) matrix that SparseGPT and GPTQ call H up to
    a factor 2/tokens (present only when asked for); ``abs_sum[j]`` is the sum over tokens
    of |x_j| (asked for with ``mean_abs=True``; AWQ's activation magnitude is
    :attr:`mean_abs`). ``feeder`` is (full name, module) of the module whose output is this
    input channel for channel, the norm or projection before the layers (see
    :mod:`unbottle.core.compression.mappings`), or None when there is none. Layers fed the
    same input share one ``InputStats``: a method must not modify it in place.
    """

    tokens: int
    sq_norm: torch.Tensor  # (in,)
    hessian: torch.Tensor | None  # (in, in)
    abs_sum: torch.Tensor | None = None  # (in,)
    feeder: tuple[str, Any] | None = None

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x_j| over the calibration tokens, per input channel (in,)."""
        if self.abs_sum is None:
            raise ValueError("this pass did not collect mean |x| (mean_abs=False)")
        return self.abs_sum / max(self.tokens, 1)

    @property
    def mean_hessian(self) -> torch.Tensor:
        """H = 2/n * sum x x^T, the Hessian of the layer's squared reconstruction error."""
        if self.hessian is None:
            raise ValueError("this pass did not collect Hessians (hessian=False)")
        return self.hessian * (2.0 / max(self.tokens, 1))


#: ``process(name, linear, stats)``: compress one Linear in place.
Process = Callable[[str, "torch.nn.Linear", InputStats], None]
#: ``process_together([(name, linear), ...], stats)``: compress, in place, the selected
#: Linears fed the same input (q/k/v, gate/up, or a single one), in one call.
ProcessTogether = Callable[[Sequence[tuple[str, "torch.nn.Linear"]], InputStats], None]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block.

    The column loops of GPTQ and SparseGPT are long chains of small operations, and
    the factorisations of narrow Hessians are small too: waking other threads for each
    costs more than it saves, and on a busy machine far more (100x for the loop, 20x for
    the factorisation, measured with 2 threads on 2 shared cores).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: Hessians at least this wide are factored on torch's threads, narrower ones on one: a
#: 1536-wide factorisation is gigaflops, and took 105 ms on two threads against 180 ms
#: on one; a 576-wide one gained 4 ms, not worth a busy machine's stalls (ad-hoc
#: timings on this repository's 2-core machine).
THREADED_FACTOR_WIDTH = 1024


def inverse_cholesky_factor(h: torch.Tensor) -> torch.Tensor | None:
    """The upper triangular U with U^T U = h^-1, or None if ``h`` is not positive definite.

    Row j of U, divided by U_jj, is the update that GPTQ and SparseGPT spread a column's
    error with once the columns before j are removed from the problem (the "Cholesky
    reformulation" of GPTQ, Frantar et al. 2022, section 3): H^-1 is never formed again.
    """
    import torch

    threads = one_thread() if h.shape[0] < THREADED_FACTOR_WIDTH else contextlib.nullcontext()
    with threads:
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            return None
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper if int(info) == 0 else None


class _Accumulator:
    def __init__(self, hessian: bool, mean_abs: bool = False) -> None:
        self.hessian = hessian
        self.mean_abs = mean_abs
        self.tokens = 0
        self.sq_norm: Any = None
        self.xtx: Any = None
        self.abs_sum: Any = None

    def add(self, x: torch.Tensor) -> None:
        import torch

        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.sq_norm is None:
            self.sq_norm = torch.zeros(x.shape[1])
            if self.hessian:
                self.xtx = torch.zeros(x.shape[1], x.shape[1])
        self.tokens += x.shape[0]
        if self.mean_abs:
            if self.abs_sum is None:
                self.abs_sum = torch.zeros(x.shape[1])
            self.abs_sum += x.abs().sum(0)
        if not self.hessian:  # with a Hessian, sum x_j^2 is its diagonal: no extra pass
            self.sq_norm += x.pow(2).sum(0)
        else:
            # X^T X is symmetric: accumulate only the blocks on and above the diagonal
            # (about 2/3 of the work for 3-4 blocks) and mirror them once in stats().
            # Blocks of ~384 columns keep each product large enough to run at full speed.
            edges = _block_edges(x.shape[1])
            for start, stop in itertools.pairwise(edges):
                self.xtx[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])

    def stats(self) -> InputStats:
        import torch

        xtx, sq_norm = self.xtx, self.sq_norm
        if xtx is not None:
            xtx = torch.triu(xtx) + torch.triu(xtx, diagonal=1).T  # (in, in), symmetric
            sq_norm = torch.diagonal(xtx).clone()
        return InputStats(tokens=self.tokens, sq_norm=sq_norm, hessian=xtx, abs_sum=self.abs_sum)


def _block_edges(width: int, block: int = 384) -> list[int]:
    """Edges of about ``width / block`` equal column blocks: [0, ..., width]."""
    parts = max(1, round(width / block))
    return [width * i // parts for i in range(parts + 1)]


class _Stop(Exception):
    """Raised by a hook to stop a forward pass once it has what it came for."""


def _block_inputs(
    model: Any, blocks: Any, calibration: Sequence[torch.Tensor], batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The hidden states and keyword arguments entering block 0, one pair per batch."""
    import torch

    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    ids = torch.cat([c.reshape(1, -1) for c in calibration])  # (N, T)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=ids[start : start + batch_size], use_cache=False)
    finally:
        handle.remove()
    return captured


_GO, _ABORT = "go", "abort"


class _Forward:
    """One batch's forward pass through a block, on a thread of its own, that stops at the
    first Linear of each hooked group until told to go on."""

    def __init__(self, run: _BlockRun, index: int, hidden: Any, kwargs: dict[str, Any]) -> None:
        self.to_worker: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.to_main: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self.group: int | None = None  # the group this forward last stopped at
        self.group_input: Any = None
        self.thread = threading.Thread(
            target=run.work, args=(self, index, hidden, kwargs), daemon=True
        )
        self.thread.start()


class _BlockRun:
    """Each batch's forward through ``block`` runs in the block's own code and stops at
    each group of ``groups``, so a group is compressed before any batch reads its output.

    The forwards take turns: the calling thread resumes one, waits until it stops again,
    then resumes the next, so exactly one runs at a time, in batch order, and each batch
    costs one forward pass per block, as it would through the model. What the table of
    :mod:`unbottle.core.compression.mappings` says about the block is all the pass knows.
    """

    def __init__(
        self,
        block: Any,
        groups: Sequence[Sequence[Any]],
        batches: Sequence[tuple[torch.Tensor, dict[str, Any]]],
    ) -> None:
        self.local = threading.local()
        self.handles = [
            module.register_forward_pre_hook(self._hook(g))
            for g, modules in enumerate(groups)
            for module in modules
        ]
        self.forwards = [
            _Forward(self, i, hidden, kwargs) for i, (hidden, kwargs) in enumerate(batches)
        ]
        self.block = block

    def work(self, forward: _Forward, index: int, hidden: Any, kwargs: dict[str, Any]) -> None:
        import torch

        self.local.forward = forward
        if forward.to_worker.get() == _ABORT:
            forward.to_main.put(("stopped", None, None))
            return
        try:
            with torch.no_grad():  # grad mode is per thread
                out = self.block(hidden, **kwargs)
            forward.to_main.put(("done", None, out[0] if isinstance(out, tuple) else out))
        except _Stop:
            forward.to_main.put(("stopped", None, None))
        except BaseException as e:  # handed to the calling thread, which raises it
            forward.to_main.put(("error", None, e))

    def _hook(self, group: int) -> Callable[[Any, tuple[Any, ...]], None]:
        def stop_here(_module: Any, args: tuple[Any, ...]) -> None:
            forward = getattr(self.local, "forward", None)
            if forward is None:
                return  # called outside the pass's forwards
            if forward.group == group:
                if args[0] is not forward.group_input:
                    raise RuntimeError(
                        f"the Linears of calibration group {group} do not share one input; "
                        "fix the block's entry in unbottle.compression.ARCHITECTURES"
                    )
                return
            forward.group, forward.group_input = group, args[0]
            forward.to_main.put(("paused", group, args[0]))
            if forward.to_worker.get() == _ABORT:
                raise _Stop

        return stop_here

    def _resume(self, forward: _Forward) -> tuple[str, Any, Any]:
        forward.to_worker.put(_GO)
        kind, group, value = forward.to_main.get()
        if kind == "error":
            raise value
        return kind, group, value

    def inputs_of(self, group: int) -> list[torch.Tensor]:
        """Run every batch to ``group``; the input each one brings to it."""
        inputs = []
        for forward in self.forwards:
            kind, reached, x = self._resume(forward)
            if kind != "paused" or reached != group:
                where = "the end of the block" if kind == "done" else f"group {reached}"
                raise RuntimeError(
                    f"the calibration pass reached {where} before group {group}; the groups "
                    "of unbottle.compression.ARCHITECTURES must follow the data flow"
                )
            inputs.append(x)
        return inputs

    def outputs(self) -> list[torch.Tensor]:
        """Run every batch to the end of the block; its output hidden states."""
        outputs = []
        for forward in self.forwards:
            kind, _, out = self._resume(forward)
            if kind != "done":
                raise RuntimeError("the calibration pass stopped in a group it did not expect")
            outputs.append(out)
        return outputs

    def close(self) -> None:
        """Stop the forwards still under way and remove the hooks."""
        for forward in self.forwards:
            if forward.thread.is_alive():
                forward.to_worker.put(_ABORT)
                forward.to_main.get()
                forward.thread.join()
        for handle in self.handles:
            handle.remove()


def _compress_block(
    block: Any,
    prefix: str,
    arch: Architecture,
    batches: list[tuple[torch.Tensor, dict[str, Any]]],
    process: ProcessTogether,
    select: Callable[[str], bool],
    statistics: dict[str, bool],
    *,
    last: bool,
) -> list[torch.Tensor]:
    """Compress one block's selected Linears in data-flow order; return its outputs (none
    for the ``last`` block, whose outputs nothing reads)."""
    from unbottle.core.compression.mappings import feeder_of

    chosen = [
        (group, [(f"{prefix}.{n}", block.get_submodule(n)) for n in group.linears])
        for group in arch.groups
    ]
    chosen = [(group, [(n, m) for n, m in linears if select(n)]) for group, linears in chosen]
    chosen = [(group, linears) for group, linears in chosen if linears]
    run = _BlockRun(block, [[m for _, m in linears] for _, linears in chosen], batches)
    try:
        for index, (group, linears) in enumerate(chosen):
            acc = _Accumulator(**statistics)
            for x in run.inputs_of(index):
                acc.add(x)
            feeder = feeder_of(block, group)
            stats = acc.stats()
            if feeder is not None:
                stats.feeder = (f"{prefix}.{group.feeder}", feeder)
            process(linears, stats)
        return [] if last else run.outputs()
    finally:
        run.close()


def calibrate_sequentially(
    model: Any,
    calibration: Sequence[torch.Tensor],
    process: Process | None = None,
    *,
    process_together: ProcessTogether | None = None,
    select: Callable[[str], bool],
    hessian: bool,
    mean_abs: bool = False,
    head: bool = False,
    batch_size: int = 8,
    desc: str = "calibrate",
) -> None:
    """Run ``calibration`` through ``model`` block by block, calling ``process`` on each
    selected Linear (by its full module name) once its input statistics are complete.

    ``calibration`` holds (1, T) token-id tensors of one length. Linears that ``select``
    rejects are left as they are; the model is modified in place. Give either
    ``process``, called once per Linear, or ``process_together``, called once per group
    of selected Linears that share their input (a method that can stack them).
    ``hessian`` and ``mean_abs`` ask for those statistics in :class:`InputStats`; the
    summed squares and the feeder are always there. Only the Linears of the groups in the
    model's :data:`~unbottle.core.compression.mappings.ARCHITECTURES` entry are reached
    (:func:`calibrated_linears` names them), and with ``head`` the output head after them
    (untie it from the embeddings first if it is to be rewritten: :func:`output_head`).
    """
    import torch

    if (process is None) == (process_together is None):
        raise TypeError("calibrate_sequentially: give exactly one of process, process_together")
    if process_together is None:
        one_by_one = process

        def process_together(group: Sequence[tuple[str, Any]], stats: InputStats) -> None:
            for name, linear in group:
                one_by_one(name, linear, stats)

    from unbottle.core.progress import progress_bar

    if not calibration:
        raise ConfigError("compress.calibration.samples: 0 calibration samples; at least 1 needed")
    arch = architecture_of(model)
    blocks = model.get_submodule(arch.blocks)
    statistics = {"hessian": hessian, "mean_abs": mean_abs}
    return_large_frees_to_the_os()
    was_training = model.training
    model.eval()
    with torch.no_grad(), progress_bar(desc, len(blocks) + head) as advance:
        batches = _block_inputs(model, blocks, calibration, batch_size)
        for index, block in enumerate(blocks):
            last = index == len(blocks) - 1 and not head
            outputs = _compress_block(
                block,
                f"{arch.blocks}.{index}",
                arch,
                batches,
                process_together,
                select,
                statistics,
                last=last,
            )
            if not last:
                batches = [(h, kw) for h, (_, kw) in zip(outputs, batches, strict=True)]
            advance()
        if head:
            _compress_head(model, arch, [h for h, _ in batches], process_together, statistics)
            advance()
    model.train(was_training)


def _compress_head(
    model: Any,
    arch: Architecture,
    last_outputs: list[torch.Tensor],
    process: ProcessTogether,
    statistics: dict[str, bool],
) -> None:
    """Compress the output head from the final norm of the last block's outputs."""
    norm = model.get_submodule(arch.final_norm)
    acc = _Accumulator(**statistics)
    for hidden in last_outputs:
        acc.add(norm(hidden))
    stats = acc.stats()
    stats.feeder = (arch.final_norm, norm)
    process([(arch.head, model.get_submodule(arch.head))], stats)


def calibrated_linears(model: Any) -> list[str]:
    """The full names of the blocks' Linears the pass reaches, in the order it reaches
    them (the output head, reached with ``head=True``, comes after them)."""
    arch = architecture_of(model)
    blocks = model.get_submodule(arch.blocks)
    return [f"{arch.blocks}.{i}.{name}" for i in range(len(blocks)) for name in arch.linears]
