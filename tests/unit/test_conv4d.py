"""4D convolution from Conv3d and the nd-generic context CNN: values, translation equivariance,
gradients, pluggable padding, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from hpcflow.flows.conv4d import Conv4d, LatticeCNN, circular_pad_nd, lattice_conv


def _naive_conv4d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Direct sum over all k^4 kernel offsets (the definition of a valid 4D convolution)."""
    k = w.shape[-1]
    out_shape = [s - k + 1 for s in x.shape[2:]]
    y = torch.zeros(x.shape[0], w.shape[0], *out_shape, dtype=x.dtype)
    for off in itertools.product(range(k), repeat=4):
        sl = tuple(slice(o, o + n) for o, n in zip(off, out_shape))
        y = y + torch.einsum("oc,nc...->no...", w[(slice(None), slice(None), *off)], x[(slice(None), slice(None), *sl)])
    return y + b.view(1, -1, 1, 1, 1, 1)


@pytest.mark.parametrize("k", [1, 3])
def test_conv4d_matches_direct_sum(k: int) -> None:
    """Conv4d (k Conv3d calls) equals the direct 4D convolution sum to rounding."""
    torch.manual_seed(0)
    conv = Conv4d(3, 2, k).double()
    x = torch.randn(2, 3, 5, 4, 6, 5, dtype=torch.float64)
    y = conv(x)
    assert y.shape == (2, 2, 5 - k + 1, 4 - k + 1, 6 - k + 1, 5 - k + 1)
    assert torch.allclose(y, _naive_conv4d(x, conv.weight, conv.bias), atol=1e-12, rtol=0)


def test_circular_pad_nd_is_periodic_and_matches_torch() -> None:
    """circular_pad_nd agrees with F.pad(circular) on 3 axes and wraps widths beyond an extent."""
    x = torch.randn(2, 3, 4, 5, 3, 2, dtype=torch.float64)
    ref = torch.nn.functional.pad(x[:, :, 0], (1, 1, 1, 1, 1, 1), mode="circular")
    assert torch.equal(circular_pad_nd(x[:, :, 0], 1, 3), ref)
    y = circular_pad_nd(x, 5, 4)  # width 5 > extents 3, 4: wraps several times
    ref = x
    for d in range(2, 6):
        n = x.shape[d]
        ref = ref[(slice(None),) * d + ([(i - 5) % n for i in range(n + 10)],)]
    assert torch.equal(y, ref)
    with pytest.raises(ValueError, match="width"):
        circular_pad_nd(x, -1, 4)


@pytest.mark.parametrize("nd", [2, 3, 4])
def test_lattice_cnn_translation_equivariant(nd: int) -> None:
    """With circular padding the CNN commutes with lattice translations (torus symmetry)."""
    torch.manual_seed(1)
    net = LatticeCNN(nd, 2, [3, 4], 5, 3).double()
    shape = (4, 3, 5, 4)[:nd]
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    y = net(x)
    assert y.shape == (2, 5, *shape)
    shifts, dims = (1, -2, 3, 1)[:nd], tuple(range(2, 2 + nd))
    assert torch.allclose(net(torch.roll(x, shifts, dims)), torch.roll(y, shifts, dims), atol=1e-12)
    assert net.reach == 3  # three 3-wide convolutions


def test_conv4d_gradcheck_and_halo_padding_swap() -> None:
    """Gradients of Conv4d pass gradcheck; a pre-exchanged (halo-padded) input with an identity
    pad_fn gives the same interior as circular padding (the swap the distributed code makes)."""
    torch.manual_seed(2)
    conv = Conv4d(2, 2, 3).double()
    x = torch.randn(1, 2, 3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: conv(t), (x,), eps=1e-6, atol=1e-7)
    net = LatticeCNN(4, 2, [3], 2, 3).double()
    y = net(x.detach())
    halo = net.reach
    xp = circular_pad_nd(x.detach(), halo, 4)  # what a halo exchange of width `reach` delivers
    net_h = LatticeCNN(4, 2, [3], 2, 3, pad_fn=lambda t, w, nd: t).double()
    net_h.load_state_dict(net.state_dict())
    # valid convolutions shrink the padded block by (k-1)/2 per layer: exactly the interior is left
    assert torch.allclose(net_h(xp), y, atol=1e-12)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        LatticeCNN(4, 1, [2], 1, 2)
    with pytest.raises(ValueError, match="hidden"):
        LatticeCNN(4, 1, [0], 1, 3)
    with pytest.raises(ValueError, match="nd=5"):
        lattice_conv(5, 1, 1, 3)
    with pytest.raises(ValueError, match="Conv4d input"):
        Conv4d(1, 1, 3)(torch.zeros(1, 1, 3, 3, 3))
