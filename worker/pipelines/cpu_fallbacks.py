"""MindSpore CPU stand-ins for the mint kernels that only exist on Ascend.

mindone's Kandinsky 2.2 path calls `mindspore.mint` ops whose PyNative kernels are Ascend-only on
MindSpore 2.10. On CPU we reroute those primitives to `mindspore.ops` equivalents that do have CPU
kernels. `apply()` is called once per process and only when the device target is CPU: the Ascend path
never sees any of this. The measurements behind it: docs/reference/mindspore-cpu.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_applied = False


def apply() -> None:
    """Patch the Ascend-only primitives in place (idempotent)."""
    global _applied
    if _applied:
        return
    import mindspore as ms
    from mindspore import mint
    from mindspore.ops.auto_generate import gen_ops_prim as prim

    for name, fn in _primitive_replacements().items():
        getattr(prim, name).__call__ = fn
    # These three are C++-bound names, not primitive instances: replace them by name.
    mint.nn.functional.gelu = _gelu
    mint.nn.functional.conv2d = _conv2d
    mint.repeat_interleave = _repeat_interleave
    # Dispatch per op synchronously: 3-6x faster on small CPUs (measured, see notes).
    ms.runtime.launch_blocking()
    _applied = True


def _primitive_replacements() -> dict[str, Callable[..., Any]]:
    """Primitive class name -> stand-in taking the primitive's own call signature."""
    table: dict[str, Callable[..., Any]] = {
        "FillScalar": _fill,
        "Arange": _arange,
        "Baddbmm": _baddbmm,
        "ConstantPadND": _pad,
        "RepeatInterleaveInt": _repeat_interleave,
        "LayerNormExt": _layer_norm,
        "Conv2DExt": _conv2d,
        "AvgPool2D": _avg_pool2d,
        "GeLU": _gelu,
        "NonZeroExt": _nonzero_tuple,
    }
    return {name: _as_method(fn) for name, fn in table.items()}


def _as_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _fill(size: Any, fill_value: Any, dtype: Any = None) -> Any:
    import mindspore as ms
    from mindspore import ops

    if dtype is None:
        dtype = ms.bool_ if isinstance(fill_value, bool) else ms.int64 if isinstance(fill_value, int) else ms.float32
    return ops.fill(dtype, tuple(size), fill_value)


def _arange(start: Any, end: Any, step: Any, dtype: Any = None) -> Any:
    import mindspore as ms
    import numpy as np

    values = np.arange(_scalar(start), _scalar(end), _scalar(step))
    out = ms.Tensor(values)
    return out.astype(dtype) if dtype is not None else out


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _baddbmm(inp: Any, b1: Any, b2: Any, beta: float = 1, alpha: float = 1) -> Any:
    from mindspore import ops

    product = ops.bmm(b1, b2)
    if beta == 0:
        return product * alpha
    return inp * beta + product * alpha


def _pad(inp: Any, padding: Any, value: float = 0.0) -> Any:
    from mindspore import ops

    return ops.pad(inp, tuple(int(p) for p in padding), mode="constant", value=float(value))


def _repeat_interleave(inp: Any, repeats: Any, dim: Any = None, output_size: Any = None) -> Any:
    from mindspore import ops

    if dim is None:
        inp, dim = inp.reshape(-1), 0
    if not isinstance(repeats, int):
        return ops.repeat_interleave(inp, repeats, dim)
    return ops.repeat_elements(inp, rep=repeats, axis=dim % inp.ndim)


def _layer_norm(inp: Any, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    from mindspore import ops

    axis = inp.ndim - len(tuple(shape))
    if weight is None:
        weight = ops.ones(tuple(shape), inp.dtype)
    if bias is None:
        bias = ops.zeros(tuple(shape), inp.dtype)
    out, mean, var = ops.LayerNorm(axis, axis, float(eps))(inp, weight, bias)
    return out, mean, ops.rsqrt(var + eps)


def _conv2d(
    inp: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1
) -> Any:
    """im2col + matmul: 10-20x faster than MindSpore's CPU Conv2D for 3x3 kernels."""
    from mindspore import ops

    if groups != 1 or isinstance(padding, str):
        return ops.conv2d(inp, weight, bias, stride, padding, dilation, groups)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = inp.shape
    o, _, kh, kw = weight.shape
    x = ops.pad(inp, (pw, pw, ph, ph)) if ph or pw else inp
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if kh == kw == 1:
        cols = x[:, :, : sh * (oh - 1) + 1 : sh, : sw * (ow - 1) + 1 : sw].reshape(n, c, oh * ow)
    else:
        patches = [
            x[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        cols = ops.stack(patches, axis=2).reshape(n, c * kh * kw, oh * ow)
    out = ops.matmul(weight.reshape(o, -1), cols).reshape(n, o, oh, ow)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def _avg_pool2d(
    inp: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Any = None,
) -> Any:
    from mindspore import ops

    kernel, step, pad = _pair(kernel_size), _pair(stride if stride else kernel_size), _pair(padding)
    if pad != (0, 0) or ceil_mode or divisor_override:
        raise NotImplementedError("CPU avg_pool2d stand-in: padding=0, ceil_mode=False, no divisor_override only")
    return ops.AvgPool(kernel_size=kernel, strides=step, pad_mode="valid")(inp)


def _nonzero_tuple(inp: Any) -> tuple[Any, ...]:
    from mindspore import ops

    indices = ops.nonzero(inp)  # (count, ndim), the NonZero kernel exists on CPU
    return tuple(indices[:, d] for d in range(inp.ndim))


def _gelu(inp: Any, *, approximate: str = "none") -> Any:
    from mindspore import ops

    if approximate == "tanh":
        return ops.gelu(inp, approximate="tanh")
    return inp * 0.5 * (1.0 + ops.erf(inp / 1.4142135623730951))
