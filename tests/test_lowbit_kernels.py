"""The packed layer's kernels (core/models/lowbit.py): each gives the dequantized product."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unbottle.core.compression.grids import Scheme, quantize_rtn
from unbottle.core.models.lowbit import KERNELS, QuantizedLinear


def _quantized(symmetric: bool, act_order: bool, bits: int = 4, group: int | None = 32):
    torch.manual_seed(0)
    q = quantize_rtn(torch.randn(48, 128), Scheme(bits=bits, group_size=group, symmetric=symmetric))
    if act_order:
        # Groups of 32 columns in a shuffled order, as GPTQ's act order leaves them.
        order = torch.randperm(128)
        q = dataclasses.replace(q, g_idx=(torch.argsort(order) // 32).int())
    return q


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_every_kernel_computes_the_dequantized_product(symmetric, act_order):
    q = _quantized(symmetric, act_order)
    bias = torch.randn(48)
    x = torch.randn(2, 3, 128)  # (B, T, in)
    reference = x @ q.dequantize().t() + bias
    for kernel in KERNELS:
        layer = QuantizedLinear.from_quantized(q, 32, bias, kernel=kernel)
        assert torch.allclose(layer(x), reference, atol=1e-4, rtol=1e-4), kernel
        # What is saved is the packed codes, whatever the kernel.
        assert set(layer.state_dict()) == {"qweight", "scales", "bias"} | (
            set() if symmetric else {"qzeros"}
        ) | ({"g_idx"} if act_order else set())


def test_int4pack_refuses_grids_it_cannot_run_and_unknown_kernels():
    with pytest.raises(ValueError, match=r"^kernel int4pack: int4 with groups of 32, 64"):
        QuantizedLinear.from_quantized(_quantized(True, False, bits=8), 32, kernel="int4pack")
    with pytest.raises(ValueError, match=r"this layer is int4, group None$"):
        QuantizedLinear.from_quantized(_quantized(True, False, group=None), None, kernel="int4pack")
    with pytest.raises(ValueError, match=r"^kernel: 'fast'; one of dequantized, on-the-fly"):
        QuantizedLinear.from_quantized(_quantized(True, False), 32, kernel="fast")
