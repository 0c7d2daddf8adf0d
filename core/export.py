"""Family-agnostic slicing of conv / norm / linear modules for physical channel removal.

Each helper returns a new module (same class, dtype and device) holding contiguous copies of
the kept rows; the source module is never modified. New modules are created on the meta
device first so no throw-away initialisation runs for weights that are overwritten anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd


def _take(t: Tensor, dim: int, idx: Tensor | None) -> Tensor:
    """Kept slice along `dim` as a new contiguous tensor (a plain copy when idx is None)."""
    t = t.detach()
    if idx is None:
        return t.clone(memory_format=torch.contiguous_format)
    return t.index_select(dim, idx.to(device=t.device, dtype=torch.long)).contiguous()


def _take_2d(t: Tensor, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
    """Kept rows (dim 0) and columns (dim 1) in a single copy."""
    if in_idx is None:
        return _take(t, 0, out_idx)
    t = t.detach()
    cols = in_idx.to(device=t.device, dtype=torch.long)
    if out_idx is None:
        return t.index_select(1, cols).contiguous()
    rows = out_idx.to(device=t.device, dtype=torch.long)
    return t[rows[:, None], cols].contiguous()


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t)


def slice_conv(
    conv: _ConvNd, out_idx: Tensor | None, in_idx: Tensor | None, groups: int | None = None
) -> _ConvNd:
    """Copy of `conv` keeping output channels `out_idx` and input channels `in_idx`.

    `groups` sets the new group count for grouped convs whose whole groups are removed
    (`out_idx` then lists the channels of the kept groups and the per-group input dimension of
    the weight is unchanged); `in_idx` is only meaningful when the result has groups == 1.
    None keeps everything along that axis.
    """
    new_groups = conv.groups if groups is None else int(groups)
    if in_idx is not None and new_groups != 1:
        raise ValueError("in_idx slicing applies to groups == 1 convs only")
    weight = _take_2d(conv.weight, out_idx, in_idx)
    out_channels = weight.shape[0]
    in_channels = weight.shape[1] * new_groups
    if out_channels % new_groups:
        raise ValueError(f"{out_channels} output channels not divisible by groups={new_groups}")
    make: Callable[..., _ConvNd] = type(conv)  # Conv1d/2d/3d share this signature
    new = make(
        in_channels,
        out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=new_groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
        dtype=conv.weight.dtype,
    )
    new.weight = _param(weight)
    if conv.bias is not None:
        new.bias = _param(_take(conv.bias, 0, out_idx))
    return new.train(conv.training)


def slice_bn(bn: _BatchNorm, idx: Tensor | None) -> _BatchNorm:
    """Copy of a batch norm keeping channels `idx`: affine weight/bias, running stats and
    `num_batches_tracked`."""
    n = bn.num_features if idx is None else int(idx.numel())
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = type(bn)(
        n,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",
        dtype=None if ref is None else ref.dtype,
    )
    if bn.affine:
        assert bn.weight is not None and bn.bias is not None  # affine norms have both
        new.weight = _param(_take(bn.weight, 0, idx))
        new.bias = _param(_take(bn.bias, 0, idx))
    if bn.track_running_stats:
        assert bn.running_mean is not None and bn.running_var is not None
        assert bn.num_batches_tracked is not None
        new.running_mean = _take(bn.running_mean, 0, idx)
        new.running_var = _take(bn.running_var, 0, idx)
        new.num_batches_tracked = bn.num_batches_tracked.detach().clone()
    return new.train(bn.training)


def slice_linear(lin: nn.Linear, in_idx: Tensor | None, out_idx: Tensor | None = None) -> nn.Linear:
    """Copy of a linear layer keeping input features `in_idx` (and outputs `out_idx`)."""
    weight = _take_2d(lin.weight, out_idx, in_idx)
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=lin.bias is not None,
        device="meta",
        dtype=lin.weight.dtype,
    )
    new.weight = _param(weight)
    if lin.bias is not None:
        new.bias = _param(_take(lin.bias, 0, out_idx))
    return new.train(lin.training)
