"""The generic family adapter: coupling groups from the traced graph (`graph.analyse`), layer
specs for the cost models, exact pruned export, `pruned.json` and the narrowed skeleton.

A family is one `GraphAdapter` instance (see `families.py`); nothing here knows a family. The
export builds the plain torchvision class on the meta device, sets a sliced copy of every conv,
linear and batch norm the analysis recorded, and copies every other parameter and buffer
(layer norms, layer-scale parameters, ...) by name, so weights are copied exactly once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from hawada.adapters.torchvision.graph import Analysis, ConvRec, analyse
from hawada.adapters.torchvision.registry import build_skeleton, model_meta
from hawada.core.export import slice_bn, slice_conv, slice_linear
from hawada.core.gates import GateGroup
from hawada.core.layers import LayerSpec
from hawada.core.recipe import GatesSpec, Recipe

StemFn = Callable[[nn.Module], None]


def stride_one_stem(model: nn.Module) -> None:
    """`cifar` stem: the first conv runs at stride 1 (same weights shape, class unchanged)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
            return


class GraphAdapter:
    """`FamilyAdapter` for any torchvision CNN whose graph `graph.analyse` understands.

    `trace_size` is the (C, H, W) the graph is traced at (shapes only, fake tensors); `stem`
    turns a fresh model into its `cifar` variant.
    """

    def __init__(
        self,
        family: str,
        *,
        trace_size: Sequence[int] = (3, 64, 64),
        stem: StemFn = stride_one_stem,
    ) -> None:
        self.family = family
        self.trace_size = tuple(trace_size)
        self._stem = stem
        self._cache: weakref.WeakKeyDictionary[nn.Module, Analysis] = weakref.WeakKeyDictionary()

    # --- analysis -------------------------------------------------------------------------
    def analysis(self, model: nn.Module) -> Analysis:
        """The graph analysis of `model` (computed once per model object)."""
        found = self._cache.get(model)
        if found is None:
            found = analyse(model, self.trace_size)
            self._cache[model] = found
        return found

    def apply_stem(self, model: nn.Module, stem: str) -> None:
        """`cifar`: the family's small-image stem; `imagenet`: unchanged."""
        if stem == "cifar":
            self._stem(model)

    def gate_groups(self, model: nn.Module, gates_spec: GatesSpec) -> list[GateGroup]:
        """Derived groups; residual streams only when `gates_spec.prune_residual` is true."""
        return [
            GateGroup.from_channels(
                g.name,
                g.channels,
                unit_width=g.unit_width,
                modules=g.gates,
                covers=g.covers,
                round_to=gates_spec.round_to,
                min_channels=gates_spec.min_channels,
                channels_last=g.channels_last,
            )
            for g in self.analysis(model).groups
            if gates_spec.prune_residual or not g.stream
        ]

    def layers(self, model: nn.Module, input_size: Sequence[int]) -> list[LayerSpec]:
        """Every conv/linear with its groups and spatial sizes at `input_size`."""
        an = self.analysis(model)
        shapes = _io_shapes(model, input_size)
        specs = []
        for rec in an.convs:
            out_group = an.space_group(rec.out_space)
            segs = [(an.space_group(s), an.space_channels[s]) for s in rec.in_segs]
            in_group: str | None = None
            segments: tuple[tuple[str | None, int], ...] = ()
            if len(segs) == 1:
                in_group = segs[0][0]
            elif any(g is not None for g, _ in segs):
                segments = tuple(segs)
            module = model.get_submodule(rec.name)
            if isinstance(module, nn.Conv2d):
                (ih, iw), (oh, ow) = shapes[rec.name]
                specs.append(
                    LayerSpec(
                        name=rec.name,
                        kind="conv",
                        in_group=out_group if rec.tied else in_group,
                        out_group=out_group,
                        in_channels=module.in_channels,
                        out_channels=module.out_channels,
                        groups=module.groups,
                        tied_groups=rec.tied and out_group is not None,
                        kernel=_pair(module.kernel_size),
                        out_hw=(oh, ow),
                        in_hw=(ih, iw),
                        stride=_pair(module.stride),
                        padding=_pair(module.padding),
                        dilation=_pair(module.dilation),
                        bias=module.bias is not None,
                        norm=rec.norm,
                        in_segments=segments,
                    )
                )
            elif isinstance(module, nn.Linear):
                specs.append(
                    LayerSpec(
                        name=rec.name,
                        kind="linear",
                        in_group=in_group,
                        out_group=out_group,
                        in_channels=module.in_features,
                        out_channels=module.out_features,
                        groups=1,
                        tied_groups=False,
                        kernel=(1, 1),
                        out_hw=shapes[rec.name][1],
                        bias=module.bias is not None,
                        norm=rec.norm,
                        in_block=rec.in_block,
                        in_segments=segments,
                    )
                )
        return specs

    # --- export ---------------------------------------------------------------------------
    def export_pruned(self, model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
        """New plain model keeping the channels `keep` names; `model` is not modified."""
        arch, stem = model_meta(model)
        an = self.analysis(model)
        idx = _IndexMaker(an, _checked_keep(an, keep))
        new = build_skeleton(arch, _num_classes(model, an), stem)
        for rec in an.convs:
            module = model.get_submodule(rec.name)
            out_idx = idx.space(rec.out_space)
            if isinstance(module, nn.Conv2d):
                if rec.tied:
                    per_group = module.in_channels // module.groups
                    groups = None if out_idx is None else int(out_idx.numel()) // per_group
                    sliced: nn.Module = slice_conv(module, out_idx, None, groups=groups)
                else:
                    sliced = slice_conv(module, out_idx, idx.segments(rec.in_segs, 1))
            elif isinstance(module, nn.Linear):
                sliced = slice_linear(module, idx.segments(rec.in_segs, rec.in_block), out_idx)
            else:  # pragma: no cover - the analysis records convs and linears only
                raise TypeError(f"{rec.name}: {type(module).__name__}")
            new.set_submodule(rec.name, sliced)
        for norm in an.norms:
            bn = model.get_submodule(norm.name)
            if not isinstance(bn, _BatchNorm):  # pragma: no cover - recorded as batch norms
                raise TypeError(f"{norm.name}: {type(bn).__name__}")
            new.set_submodule(norm.name, slice_bn(bn, idx.segments(norm.segs, 1)))
        _copy_unset(new, model, {r.name for r in an.convs} | {n.name for n in an.norms})
        return new.train(model.training)

    def pruned_config(
        self, model: nn.Module, keep: Mapping[str, Tensor], recipe: Recipe
    ) -> dict[str, Any]:
        """`pruned.json`: output width, input width and groups of every analysed layer."""
        arch, stem = model_meta(model)
        an = self.analysis(model)
        idx = _IndexMaker(an, _checked_keep(an, keep))
        channels: dict[str, int] = {}
        in_channels: dict[str, int] = {}
        conv_groups: dict[str, int] = {}
        for rec in an.convs:
            module = model.get_submodule(rec.name)
            out = idx.width([rec.out_space], 1)
            channels[rec.name] = out
            if isinstance(module, nn.Conv2d):
                if rec.tied:
                    per_group = module.in_channels // module.groups
                    in_channels[rec.name] = out
                    conv_groups[rec.name] = out // per_group
                else:
                    in_channels[rec.name] = idx.width(rec.in_segs, 1)
                    conv_groups[rec.name] = module.groups
            else:
                in_channels[rec.name] = idx.width(rec.in_segs, rec.in_block)
        for norm in an.norms:
            channels[norm.name] = idx.width(norm.segs, 1)
        return {
            "arch": arch,
            "num_classes": _num_classes(model, an),
            "stem": stem,
            "input_size": list(recipe.model.input_size),
            "normalize": recipe.model.normalize.model_dump(),
            "channels": channels,
            "in_channels": in_channels,
            "groups": conv_groups,
        }

    def pruned_skeleton(self, config: Mapping[str, Any]) -> nn.Module:
        """Meta-device plain model with the convs, linears and norms named in `config` narrowed."""
        new = build_skeleton(config["arch"], int(config["num_classes"]), config["stem"])
        channels = _int_map(config, "channels")
        in_channels = _int_map(config, "in_channels")
        groups = _int_map(config, "groups")
        modules = dict(new.named_modules())
        unknown = (set(channels) | set(in_channels) | set(groups)) - set(modules)
        if unknown:
            raise ValueError(f"pruned config names unknown modules: {sorted(unknown)[:10]}")
        for name, out in channels.items():
            narrow = narrowed(name, modules[name], out, in_channels.get(name), groups.get(name))
            new.set_submodule(name, narrow)
        return new


def narrowed(
    name: str, old: nn.Module, out: int, cin: int | None = None, groups: int | None = None
) -> nn.Module:
    """A meta-device conv, linear or batch norm like `old` with `out` outputs (`cin` inputs and
    `groups` groups; None: as `old`), for a `pruned.json` skeleton."""
    with torch.device("meta"):
        if isinstance(old, nn.Conv2d):
            cin = old.in_channels if cin is None else cin
            g = old.groups if groups is None else groups
            if out % g or cin % g:
                raise ValueError(f"{name}: {cin}->{out} channels, groups={g}")
            return nn.Conv2d(
                cin,
                out,
                _pair(old.kernel_size),
                stride=_pair(old.stride),
                padding=_pair(old.padding),
                dilation=_pair(old.dilation),
                groups=g,
                bias=old.bias is not None,
                padding_mode=old.padding_mode,
            )
        if isinstance(old, nn.Linear):
            cin = old.in_features if cin is None else cin
            return nn.Linear(cin, out, bias=old.bias is not None)
        if isinstance(old, _BatchNorm):
            return type(old)(
                out,
                eps=old.eps,
                momentum=old.momentum,
                affine=old.affine,
                track_running_stats=old.track_running_stats,
            )
    raise ValueError(f"pruned config: {name} is a {type(old).__name__}")


class _IndexMaker:
    """Kept channel indices of spaces and of concatenated/flattened inputs."""

    def __init__(self, an: Analysis, keep: Mapping[str, Tensor]) -> None:
        self.an = an
        self.keep = keep

    def _space_keep(self, space: int) -> Tensor | None:
        group = self.an.space_group(space)
        return None if group is None else self.keep.get(group)

    def space(self, space: int) -> Tensor | None:
        """Kept channels of one space (None: all)."""
        return self._space_keep(space)

    def segments(self, segs: Sequence[int], block: int) -> Tensor | None:
        """Kept input features of segments `segs` with `block` features per channel."""
        parts = [self._space_keep(s) for s in segs]
        if all(p is None for p in parts):
            return None
        out, offset = [], 0
        for s, p in zip(segs, parts, strict=True):
            full = self.an.space_channels[s]
            out.append(offset + (torch.arange(full) if p is None else p))
            offset += full
        channels = torch.cat(out)
        if block == 1:
            return channels
        return (channels[:, None] * block + torch.arange(block)[None, :]).reshape(-1)

    def width(self, segs: Sequence[int], block: int) -> int:
        """Kept features of `segs` (full width where nothing is pruned)."""
        total = 0
        for s in segs:
            p = self._space_keep(s)
            total += self.an.space_channels[s] if p is None else int(p.numel())
        return total * block


def _checked_keep(an: Analysis, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`checked_keep` against the analysis' groups."""
    return checked_keep({g.name: g for g in an.groups}, keep)


class Unit(Protocol):
    """What `checked_keep` reads of a group: its channels and its unit width."""

    @property
    def channels(self) -> int: ...

    @property
    def unit_width(self) -> int: ...


def checked_keep(groups: Mapping[str, Unit], keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validate keep indices (known group, sorted unique in range, whole units)."""
    out: dict[str, Tensor] = {}
    for name, raw in keep.items():
        if name not in groups:
            raise ValueError(f"keep names unknown group {name!r}")
        group = groups[name]
        idx = torch.as_tensor(raw).reshape(-1).to(torch.long).cpu()
        n = idx.numel()
        if (
            n == 0
            or int(idx[0]) < 0
            or int(idx[-1]) >= group.channels
            or (n > 1 and not bool((idx[1:] > idx[:-1]).all()))
        ):
            raise ValueError(
                f"keep[{name}] must be sorted unique indices in [0, {group.channels}), non-empty"
            )
        w = group.unit_width
        if w > 1:
            blocks = idx.view(-1, w) if n % w == 0 else None
            if (
                blocks is None
                or bool((blocks[:, 0] % w).any())
                or not torch.equal(blocks - blocks[:, :1], torch.arange(w).expand_as(blocks))
            ):
                raise ValueError(f"keep[{name}] must keep whole units of {w} channels")
        out[name] = idx
    return out


def _num_classes(model: nn.Module, an: Analysis) -> int:
    """The classifier width: the last conv/linear of the graph (every torchvision CNN)."""
    last: ConvRec = an.convs[-1]
    module = model.get_submodule(last.name)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    raise TypeError(f"{last.name}: {type(module).__name__}")  # pragma: no cover


def _copy_unset(new: nn.Module, model: nn.Module, done: set[str]) -> None:
    """Copy every parameter/buffer of `new` outside the modules in `done` from `model`."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name, t in list(new.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner not in done:
            src = params[name].detach().clone()
            setattr(new.get_submodule(owner), leaf, nn.Parameter(src, t.requires_grad))
    for name, _b in list(new.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if owner not in done:
            setattr(new.get_submodule(owner), leaf, buffers[name].detach().clone())
    source = {**params, **buffers}
    meta = [
        n
        for n, t in (*new.named_parameters(), *new.named_buffers())
        if t.is_meta and not source[n].is_meta  # a meta-device source stays structure only
    ]
    if meta:  # pragma: no cover - every tensor exists in the source model
        raise RuntimeError(f"export left tensors unset: {meta[:5]}")


def _int_map(config: Mapping[str, Any], key: str) -> dict[str, int]:
    raw = config.get(key, {})
    if not isinstance(raw, Mapping):
        raise ValueError(f"pruned config: {key} must be an object")
    out: dict[str, int] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"pruned config: {key}[{k!r}] must be an integer >= 1")
        out[k] = v
    return out


def _io_shapes(
    model: nn.Module, input_size: Sequence[int]
) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Input and output H, W of every conv from one no-grad eval forward at batch 1."""
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    handles: list[RemovableHandle] = []

    def recorder(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            (ih, iw), (oh, ow) = inputs[0].shape[-2:], output.shape[-2:]
            shapes[name] = ((int(ih), int(iw)), (int(oh), int(ow)))

        return hook

    def positions(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_m: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            n = output.numel() // (output.shape[0] * output.shape[-1])
            shapes[name] = ((1, 1), (int(n), 1))  # a linear runs at every position it sees

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(recorder(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(positions(name)))
    ref = next(model.parameters())
    was_training = model.training
    try:
        model.eval()  # eval: no running-stat updates, no batch-1 BN error
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _pair(value: int | tuple[int, ...] | str) -> tuple[int, int]:
    """A conv's kernel/stride/padding/dilation as (h, w)."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"expected an (h, w) pair, got {value!r}")
    return (int(value[0]), int(value[1]))
