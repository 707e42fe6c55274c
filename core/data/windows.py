"""Windows of token ids that calibration and distillation draw: anywhere in the training
text's stream, or where a pair starts in the rendered conversations.

A pair's window starts where a request does (a chat model's first position holds its
template's opening), because a model's first positions carry activations unlike any
other (the "attention sink" of Xiao et al., 2023), and a window cut mid-sentence would
calibrate or train them on a start no request has. It runs on into the pairs after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from unbottle.core.contract.errors import DataError

if TYPE_CHECKING:
    import torch


def text_windows(
    stream: torch.Tensor,
    count: int,
    seq_len: int,
    generator: torch.Generator,
    *,
    what: str,
    lower: str,
) -> list[torch.Tensor]:
    """``count`` windows of ``seq_len`` ids (1-D LongTensors) from the 1-D ``stream`` of
    any integer type, each starting anywhere. ``what`` and ``lower`` name the setting in
    the error for a stream too short (``lower``: the length to lower)."""
    import torch

    if stream.numel() <= seq_len:
        raise DataError(
            f"{what}: the training text has {stream.numel()} tokens, fewer than one window "
            f"of {seq_len} and the token after it; lower {lower}"
        )
    starts = torch.randint(0, stream.numel() - seq_len, (count,), generator=generator)
    # The stream may be mapped in a narrow type: widen only the windows drawn.
    return [stream[s : s + seq_len].long() for s in starts.tolist()]


def pair_windows(
    ids: torch.Tensor,
    starts: Sequence[int],
    count: int,
    seq_len: int,
    generator: torch.Generator,
    *,
    what: str,
    lower: str,
) -> list[torch.Tensor]:
    """``count`` windows of ``seq_len`` ids of the conversations ``ids`` (1-D), each
    starting at one of ``starts`` (where a pair starts) that leaves room for a window."""
    import torch

    whole = [s for s in starts if s + seq_len <= ids.numel()]
    if not whole:
        raise DataError(
            f"{what}: the pairs of data.qa_train render to {ids.numel()} tokens, fewer than "
            f"one window of {seq_len}; lower {lower} or use compress.calibration.source: "
            "train_text"
        )
    chosen = torch.randint(0, len(whole), (count,), generator=generator)
    return [ids[whole[i] : whole[i] + seq_len].long() for i in chosen.tolist()]
