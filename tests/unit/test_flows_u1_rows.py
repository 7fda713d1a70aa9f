"""The active-row fast path of the U(1) coupling layers: the context CNN evaluated only on the
rows ``start::step`` equals the full CNN restricted to those rows, on both site axes and every
offset, also on non-square and halo-padded-like (non-multiple-of-4) extents."""

from __future__ import annotations

import pytest
import torch

from hpcflow.flows.context import ContextCNN


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("start", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(8, 8), (12, 8), (11, 13)])
def test_rows_equal_full_cnn_on_those_rows(axis: int, start: int, shape: tuple[int, int]) -> None:
    """net(x, rows=(axis, start, 4)) == net(x)[rows] to 1e-12 (float64), values and gradients."""
    torch.manual_seed(0)
    net = ContextCNN(2, (5, 4), 7, 3).double()
    x = torch.randn(3, 2, *shape, dtype=torch.float64, requires_grad=True)
    sel = [slice(None)] * 4
    sel[2 + axis] = slice(start, None, 4)
    full = net(x)[tuple(sel)]
    rows = net(x, (axis, start, 4))
    assert rows.shape == full.shape
    assert torch.allclose(rows, full, atol=1e-12, rtol=0)
    w = torch.randn_like(full)
    (g_full,) = torch.autograd.grad((full * w).sum(), x)
    (g_rows,) = torch.autograd.grad((rows * w).sum(), x)
    assert torch.allclose(g_rows, g_full, atol=1e-12, rtol=0)
    assert float(g_full.abs().max()) > 0  # the gradient check is not vacuous
