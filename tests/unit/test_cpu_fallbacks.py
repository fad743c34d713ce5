"""Each CPU stand-in against numpy (MindSpore CPU backend, no model)."""

import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import mint  # noqa: E402

from worker import device  # noqa: E402
from worker.pipelines import base  # noqa: E402

base.configure(device.DeviceConfig(target="CPU", device_id=0))
RNG = np.random.default_rng(0)


def conv_reference(x, w, b, stride, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, h, width = xp.shape
    o, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (width - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, :, i, j] = np.einsum("ncij,ocij->no", patch, w)
    return out + b[None, :, None, None]


@pytest.mark.parametrize(("stride", "pad", "k"), [(1, 1, 3), (2, 0, 3), (2, 1, 3), (1, 0, 1)])
def test_conv2d_matches_numpy(stride, pad, k):
    x = RNG.standard_normal((2, 3, 9, 7)).astype(np.float32)
    w = RNG.standard_normal((5, 3, k, k)).astype(np.float32)
    b = RNG.standard_normal(5).astype(np.float32)
    expected = conv_reference(x, w, b, stride, pad)
    got = mint.nn.functional.conv2d(ms.tensor(x), ms.tensor(w), ms.tensor(b), stride, pad).asnumpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    cell = mint.nn.Conv2d(3, 5, k, stride=stride, padding=pad)
    cell.weight.set_data(ms.tensor(w))
    cell.bias.set_data(ms.tensor(b))
    np.testing.assert_allclose(cell(ms.tensor(x)).asnumpy(), expected, atol=1e-4)


def test_layer_norm_gelu_baddbmm_and_friends():
    z = RNG.standard_normal((4, 7)).astype(np.float32)
    normed = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(mint.nn.LayerNorm(7)(ms.tensor(z)).asnumpy(), normed, atol=1e-5)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(mint.nn.GELU()(ms.tensor(z)).asnumpy(), z * 0.5 * (1 + erf(z / np.sqrt(2))), atol=1e-6)
    a, c, i = (RNG.standard_normal(s).astype(np.float32) for s in ((2, 3, 4), (2, 4, 5), (2, 3, 5)))
    got = mint.baddbmm(ms.tensor(i), ms.tensor(a), ms.tensor(c), beta=0.5, alpha=2).asnumpy()
    np.testing.assert_allclose(got, 0.5 * i + 2 * a @ c, atol=1e-5)
    assert mint.full((2, 3), 1.5).asnumpy().tolist() == [[1.5] * 3] * 2
    assert mint.arange(0, 5).asnumpy().tolist() == [0, 1, 2, 3, 4]
    assert mint.nn.functional.pad(ms.tensor(np.ones((1, 2, 2), np.float32)), (1, 1)).shape == (1, 2, 4)
    rep = mint.repeat_interleave(ms.tensor(np.arange(6).reshape(2, 3)), 2, dim=0).asnumpy()
    assert rep.tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    pooled = mint.nn.functional.avg_pool2d(ms.tensor(z.reshape(1, 1, 4, 7)[..., :6].copy()), 2, 2).asnumpy()
    np.testing.assert_allclose(pooled, z.reshape(1, 1, 4, 7)[..., :6].reshape(1, 1, 2, 2, 3, 2).mean((3, 5)), atol=1e-6)
    (idx,) = (ms.tensor(np.array([5, 3, 7, 3])) == 3).nonzero(as_tuple=True)
    assert idx.asnumpy().tolist() == [1, 3]
