"""AWQ: activation-aware weight quantization, on unbottle's public compression toolkit.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han, 2023, "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration" (arXiv:2306.00978).

A few input channels of each layer carry much larger activations than the rest, and the
weights they multiply matter most. Rounding error on weight W_ij costs |x_j| times as much
in the output, so AWQ scales input channel j of the weights up by s_j before rounding and
the activations down by the same factor: the layer computes Q(W diag(s)) (diag(s)^-1 x),
the salient weights get a relatively finer grid, and nothing is kept in higher precision.
The factor 1/s is folded into the module that produces x (the RMSNorm before q/k/v and
gate/up, v_proj before o_proj, up_proj before down_proj), so inference costs nothing extra.

Per group of Linears fed the same input (section 3.2 of the paper):

    s = s_x^alpha / sqrt(max(s_x^alpha) * min(s_x^alpha)),   s_x = mean |x| per channel
    alpha* = argmin over a grid in [0, 1) of || Q(W diag(s)) diag(s)^-1 X - W X ||^2

The output error is computed exactly from the input Hessian H = X^T X that the calibration
pass collects: ||(Q' - W) X||^2 = tr((Q' - W) H (Q' - W)^T), so the search never runs the
calibration tokens again. alpha = 0 gives s = 1, plain round-to-nearest: on the
calibration data AWQ's output error is never above RTN's. The normalisation and the grid
of 20 follow the reference implementation (llm-awq / AutoAWQ), as does the order: scales
are searched on the float model's activations, folded, then every selected Linear is
rounded to its int4 group grid (optionally with the clipping search, weighted by each input
channel's activation energy) and written in unbottle's packed format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbottle.compression import InputStats, QuantizedWeight, Scheme, quantize_rtn

if TYPE_CHECKING:
    import torch


@dataclass
class GroupScales:
    """The scales chosen for one group of Linears fed the same input."""

    linears: list[str]  # full names of the Linears the scales multiply (input channels)
    feeder: str  # full name of the module whose output channels they divide
    scales: torch.Tensor  # (in,) float32
    alpha: float
    #: Output error tr(D H D^T) of the group's quantized Linears, with these scales and
    #: with none (plain round-to-nearest), over their float output energy tr(W H W^T).
    error: float
    rtn_error: float


def candidate_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_x^alpha, clamped as the reference code does, normalised to a geometric mean
    of its extremes of 1 (so the grid of the scaled weights stays centred)."""
    s = mean_abs.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor
) -> torch.Tensor:
    """tr((Q - W) H (Q - W)^T) = sum over calibration tokens of ||(Q - W) x||^2."""
    d = (quantized - weight).float()  # (out, in)
    return ((d @ hessian) * d).sum()


def scaled_rtn(weight: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """What the layer computes with: Q(W diag(s)) diag(s)^-1, (out, in) float32."""
    return quantize_rtn(weight * scales, scheme).dequantize() / scales


def search_scales(
    weights: Sequence[torch.Tensor], stats: InputStats, scheme: Scheme, grid: int = 20
) -> tuple[torch.Tensor, float, float, float]:
    """The scales for Linears sharing one input: (scales, alpha, error, RTN's error).

    ``weights`` are the (out_i, in) matrices that will be quantized, ``stats`` their input
    statistics with ``mean_abs`` and ``hessian``. Errors are relative to the float output
    energy. Alphas are tried from 0 up; the first of equal errors wins.
    """
    import torch

    w = torch.cat([x.detach().float() for x in weights])  # (out, in)
    hessian = stats.hessian.float()
    energy = float(((w @ hessian) * w).sum()) or 1.0
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_error = 0.0
    for i in range(grid):
        alpha = i / grid
        s = candidate_scales(stats.mean_abs, alpha)
        error = float(output_error(w, scaled_rtn(w, s, scheme), hessian)) / energy
        if i == 0:
            rtn_error = error
        if best is None or error < best[0]:
            best = (error, alpha, s)
    assert best is not None
    error, alpha, s = best
    return s, alpha, error, rtn_error


def fold_scales(model: Any, group: GroupScales) -> None:
    """Multiply the group's Linears' input channels by s and divide the feeder's output
    channels by s: the model computes the same function (up to float rounding)."""
    import torch

    s = group.scales
    with torch.no_grad():
        feeder = model.get_submodule(group.feeder)
        if isinstance(feeder, torch.nn.Linear):
            feeder.weight.div_(s[:, None].to(feeder.weight.dtype))  # its output rows
        else:  # a norm: its elementwise weight
            feeder.weight.div_(s.to(feeder.weight.dtype))
        if getattr(feeder, "bias", None) is not None:
            feeder.bias.div_(s.to(feeder.bias.dtype))
        for name in group.linears:
            linear = model.get_submodule(name)
            linear.weight.mul_(s[None, :].to(linear.weight.dtype))


def awq_search(
    model: Any,
    calibration: Sequence[torch.Tensor],
    selected: set[str],
    scheme: Scheme,
    *,
    grid: int = 20,
    batch_size: int = 8,
) -> tuple[list[GroupScales], dict[str, torch.Tensor]]:
    """Search the scales of every group that has a feeder and a selected Linear, on the
    float model (its weights are not changed). Returns the groups' scales and each
    selected Linear's input-channel importance for the clipping search: its activation
    energy diag(H), in the scaled coordinates, diag(H) / s^2."""
    from unbottle.compression import calibrate_sequentially

    found: list[GroupScales] = []
    importance: dict[str, torch.Tensor] = {}

    def process(group: Sequence[tuple[str, Any]], stats: InputStats) -> None:
        chosen = [(name, linear) for name, linear in group if name in selected]
        if not chosen:
            return
        diag = stats.hessian.diagonal().float()
        if stats.feeder is None:  # nothing to fold into (o_proj under grouped-query attention)
            importance.update({name: diag for name, _ in chosen})
            return
        s, alpha, error, rtn_error = search_scales(
            [linear.weight for _, linear in chosen], stats, scheme, grid
        )
        found.append(
            GroupScales(
                # Every Linear fed by the feeder is scaled, selected or not: the feeder's
                # output is their common input.
                linears=[name for name, _ in group],
                feeder=stats.feeder[0],
                scales=s,
                alpha=alpha,
                error=error,
                rtn_error=rtn_error,
            )
        )
        importance.update({name: diag / s.square() for name, _ in chosen})

    calibrate_sequentially(
        model,
        calibration,
        process_together=process,
        select=lambda name: True,  # a feeder is shared by its whole group
        hessian=True,
        mean_abs=True,
        batch_size=batch_size,
        desc="awq: scales",
    )
    return found, importance


def awq_model(
    model: Any,
    calibration: Sequence[torch.Tensor],
    layers: Sequence[tuple[str, Any]],
    scheme: Scheme,
    *,
    grid: int = 20,
    batch_size: int = 8,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """AWQ on ``layers`` of ``model``: search the scales, fold them into the model, round
    each layer's scaled weight to ``scheme``'s grids. Returns the codes by module name and
    metrics. The model is left holding the scaled float weights; the feeders keep 1/s.

    The search rounds without clipping, as the reference code does; ``scheme``'s clipping
    search, if on, runs once on the final scaled weights, weighted per input channel by
    its activation energy.
    """
    import torch

    from unbottle.compression import weight_error

    plain = dataclasses.replace(scheme, clip_search=False)
    groups, importance = awq_search(
        model, calibration, {name for name, _ in layers}, plain, grid=grid, batch_size=batch_size
    )
    for group in groups:
        fold_scales(model, group)
    with torch.no_grad():
        quantized = {
            name: quantize_rtn(linear.weight, scheme, importance.get(name))
            for name, linear in layers
        }
        errors = [
            weight_error(linear.weight, quantized[name].dequantize()) for name, linear in layers
        ]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    return quantized, {
        "mean_weight_error": mean(errors),
        "scaled_groups": len(groups),
        "mean_alpha": mean([g.alpha for g in groups]),
        # The search's own account, on the calibration data: the scaled groups' output
        # error before clipping, and plain round-to-nearest's.
        "mean_group_output_error": mean([g.error for g in groups]),
        "mean_group_output_error_rtn": mean([g.rtn_error for g in groups]),
    }
