"""One calibration pass over a decoder, block by block: what Wanda, SparseGPT and GPTQ share.

SparseGPT (Frantar & Alistarh, 2023) and GPTQ (Frantar et al., 2022) compress a model
*sequentially*: the calibration sequences are run to the first decoder block; each block
is compressed from statistics of what enters its Linear layers, and the block's output,
computed with the compressed weights, becomes the input of the next block, so every
block sees (and compensates for) the errors of the ones before it.

This module runs that pass once per block, in the order the data flows inside a Llama-
family block ("true sequential" in the GPTQ code):

    q/k/v  <- input_layernorm(x)                      statistics, then compress q, k, v
    o      <- attention(q, k, v)                      statistics, then compress o
    gate/up <- post_attention_layernorm(x + o(...))   statistics, then compress gate, up
    down   <- act(gate) * up                          statistics, then compress down

Each Linear is compressed from inputs produced by the already-compressed layers before
it, and each block costs one forward pass (not two, as running a block once to collect
statistics and again to propagate would), which is what keeps 128 x 512 calibration
tokens on a 135M model within minutes on two CPU cores.

A method sees each Linear once, through a callback ``process(name, linear, stats)``: it
may rewrite ``linear.weight`` in place (prune or fake-quantize it) and keep whatever it
needs (masks, integer codes); the pass then carries on with the rewritten weights. A
method that treats output rows independently (GPTQ) may take the Linears that share an
input together instead, through ``process_together``, and stack them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbottle.core.contract.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The Linear layers of a Llama-family block, in the order the pass reaches them.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")


@dataclass
class InputStats:
    """What entered one Linear over the whole calibration set.

    ``sq_norm[j]`` is the sum over tokens of x_j^2 (Wanda's ||X_j||_2^2); ``hessian`` is
    the sum over tokens of x x^T, the (in, in) matrix that SparseGPT and GPTQ call H up to
    a factor 2/tokens (present only when asked for). Layers fed the same input share one
    ``InputStats``: a method must not modify it in place.
    """

    tokens: int
    sq_norm: torch.Tensor  # (in,)
    hessian: torch.Tensor | None  # (in, in)

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
    def __init__(self, hessian: bool) -> None:
        self.hessian = hessian
        self.tokens = 0
        self.sq_norm: Any = None
        self.xtx: Any = None

    def add(self, x: torch.Tensor) -> None:
        import torch

        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.sq_norm is None:
            self.sq_norm = torch.zeros(x.shape[1])
            if self.hessian:
                self.xtx = torch.zeros(x.shape[1], x.shape[1])
        self.tokens += x.shape[0]
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
        return InputStats(tokens=self.tokens, sq_norm=sq_norm, hessian=xtx)


def _block_edges(width: int, block: int = 384) -> list[int]:
    """Edges of about ``width / block`` equal column blocks: [0, ..., width]."""
    parts = max(1, round(width / block))
    return [width * i // parts for i in range(parts + 1)]


def decoder_blocks(model: Any) -> Any:
    """The model's decoder blocks, checked to be Llama-family (Llama, Mistral, Qwen2, SmolLM)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    needed = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if blocks is None or not all(hasattr(blocks[0], n) for n in needed):
        raise ConfigError(
            f"layer-wise calibration supports Llama-family decoders "
            f"(model.layers[i] with {', '.join(needed)}); got {type(model).__name__}"
        )
    return blocks


class _Stop(Exception):
    """Raised by a hook to stop a forward pass once it has what it came for."""


def _block_inputs(
    model: Any, calibration: Sequence[torch.Tensor], batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The hidden states and keyword arguments entering block 0, one pair per batch."""
    import torch

    first = decoder_blocks(model)[0]
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    ids = torch.cat([c.reshape(1, -1) for c in calibration])  # (N, T)
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model.model(input_ids=ids[start : start + batch_size], use_cache=False)
    finally:
        handle.remove()
    return captured


def _attention_output_inputs(block: Any, normed: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """What the attention's output projection receives: the heads' outputs, concatenated."""
    seen: list[torch.Tensor] = []

    def grab(_module: Any, args: tuple[Any, ...]) -> None:
        seen.append(args[0])
        raise _Stop

    handle = block.self_attn.o_proj.register_forward_pre_hook(grab)
    try:
        with contextlib.suppress(_Stop):
            block.self_attn(hidden_states=normed, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def _block_linears(block: Any, prefix: str) -> dict[str, tuple[str, Any]]:
    """Short name -> (full module name, Linear) for the seven projections of a block."""
    parts = {
        "self_attn": (*ATTENTION_INPUTS, "o_proj"),
        "mlp": (*MLP_INPUTS, "down_proj"),
    }
    return {
        short: (f"{prefix}.{part}.{short}", getattr(getattr(block, part), short))
        for part, shorts in parts.items()
        for short in shorts
    }


def _compress_block(
    block: Any,
    linears: dict[str, tuple[str, Any]],
    batches: list[tuple[torch.Tensor, dict[str, Any]]],
    process: ProcessTogether,
    select: Callable[[str], bool],
    hessian: bool,
    *,
    last: bool,
) -> list[torch.Tensor]:
    """Compress one block's selected Linears in data-flow order; return its outputs (none
    for the ``last`` block, whose outputs nothing reads)."""

    def compress(shorts: Sequence[str], inputs: Sequence[torch.Tensor]) -> None:
        chosen = [s for s in shorts if select(linears[s][0])]
        if not chosen:
            return
        acc = _Accumulator(hessian)
        for x in inputs:
            acc.add(x)
        process([linears[short] for short in chosen], acc.stats())

    # Each normalised input is kept from its statistics to its use rather than computed
    # twice: a few hundred MB for 128 x 512 tokens, against seconds of recomputation.
    x = [hidden for hidden, _ in batches]  # (B, T, H) each
    normed = [block.input_layernorm(h) for h in x]
    compress(ATTENTION_INPUTS, normed)
    heads = [
        _attention_output_inputs(block, n, kwargs)
        for n, (_, kwargs) in zip(normed, batches, strict=True)
    ]  # (B, T, heads * head_dim) each
    del normed
    compress(("o_proj",), heads)
    x = [h + block.self_attn.o_proj(z) for h, z in zip(x, heads, strict=True)]
    del heads
    normed = [block.post_attention_layernorm(h) for h in x]
    compress(MLP_INPUTS, normed)
    mlp = block.mlp
    inner = [mlp.act_fn(mlp.gate_proj(m)) * mlp.up_proj(m) for m in normed]  # (B, T, FFN)
    del normed
    compress(("down_proj",), inner)
    if last:
        return []
    return [h + mlp.down_proj(u) for h, u in zip(x, inner, strict=True)]


def calibrate_sequentially(
    model: Any,
    calibration: Sequence[torch.Tensor],
    process: Process | None = None,
    *,
    process_together: ProcessTogether | None = None,
    select: Callable[[str], bool],
    hessian: bool,
    batch_size: int = 8,
    desc: str = "calibrate",
) -> None:
    """Run ``calibration`` through ``model`` block by block, calling ``process`` on each
    selected Linear (by its full module name) once its input statistics are complete.

    ``calibration`` holds (1, T) token-id tensors of one length. Linears that ``select``
    rejects are left as they are; the model is modified in place. Give either
    ``process``, called once per Linear, or ``process_together``, called once per group
    of selected Linears that share their input (a method that can stack them).
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
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    was_training = model.training
    model.eval()
    with torch.no_grad(), progress_bar(desc, len(blocks)) as advance:
        batches = _block_inputs(model, calibration, batch_size)
        for index, block in enumerate(blocks):
            linears = _block_linears(block, f"{prefix}.{index}")
            last = index == len(blocks) - 1
            outputs = _compress_block(
                block, linears, batches, process_together, select, hessian, last=last
            )
            if not last:
                batches = [(h, kw) for h, (_, kw) in zip(outputs, batches, strict=True)]
            advance()
    model.train(was_training)
