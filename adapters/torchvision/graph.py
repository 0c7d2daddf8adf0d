"""Coupling groups derived from a model's traced graph (family-agnostic).

The model is traced with `torch.fx` and its shapes propagated on fake tensors (no memory, no
compute). Every conv/linear output opens a *channel space*; union-find merges spaces that must
keep the same channels:

- elementwise `add` (residuals) and `mul` of two channel tensors (squeeze-excitation `x * s`);
- a depthwise conv (groups == in == out) and a grouped conv with in == out (the unit becomes a
  whole conv group) tie their output to their input;
- `cat` along the channel dim makes a *segmented* value whose segments keep their own spaces;
- `flatten` into a linear maps each channel to a block of the pooled spatial size;
- norms, activations, pooling, dropout and stochastic depth pass channels through.

Anything else (view, chunk, channel shuffle, layer norm over channels, per-channel parameters)
pins the spaces it touches: they stay at full width, which is always exact. So are the input
and every space reaching the output.

Gates sit on the norm right after a conv/linear (or on the conv/linear itself when no norm
follows), never in front of a sigmoid/hard-sigmoid. A last pass proves exactness: it follows
"removed channels are exactly zero" through the graph and pins every space whose removed
channels would reach a channel-mixing layer (dense conv, linear) non-zero (e.g. DenseNet's
pre-activation BN after a concat, or a BN without a gate in front of it).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

#: Per-channel ops with f(0) == 0: a removed (zeroed) channel stays zero through them.
_ZERO_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
#: Per-channel ops with f(0) != 0: channels pass through but a zeroed channel does not stay zero.
_NONZERO_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)


def _fn_tables() -> tuple[set[Any], set[Any]]:
    zero: set[Any] = {
        F.relu,
        torch.relu,
        F.relu6,
        F.hardtanh,
        F.silu,
        F.gelu,
        F.hardswish,
        F.mish,
        F.dropout,
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
    }
    try:  # torchvision wraps stochastic_depth as an fx leaf: per-sample scaling, zero-preserving
        from torchvision.ops import stochastic_depth

        zero.add(stochastic_depth)
    except ImportError:  # pragma: no cover - torchvision is a hard dependency of adapters
        pass
    nonzero: set[Any] = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.tanh, F.tanh}
    return zero, nonzero


_ZERO_FNS, _NONZERO_FNS = _fn_tables()
_ZERO_METHODS = {"relu", "relu_", "contiguous", "clone"}
_NONZERO_METHODS = {"sigmoid", "sigmoid_", "tanh"}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}


@dataclass(frozen=True)
class Val:
    """What the graph knows about one tensor's channels.

    `segs`: the spaces along the channel dim, in order (one unless it comes from a `cat`);
    `cdim`: which dim holds the channels; `block`: elements per channel along that dim (a
    flattened C x H x W tensor has block H * W).
    """

    segs: tuple[int, ...]
    cdim: int
    block: int = 1


@dataclass
class ConvRec:
    """A conv or linear: its input segments, the space of its output, how groups behave."""

    name: str
    kind: str  # "conv" | "linear"
    in_segs: tuple[int, ...]
    in_block: int
    out_space: int
    tied: bool  # depthwise / grouped with in == out: groups shrink with the kept channels
    node: str
    norm: str | None = None  # the batch norm right after it


@dataclass
class NormRec:
    """A batch norm and the spaces of its channels (several after a concat)."""

    name: str
    segs: tuple[int, ...]


@dataclass
class Group:
    """A derived coupling group (a prunable channel space)."""

    name: str
    space: int
    channels: int
    unit_width: int
    gates: list[str]  # modules whose output the gate multiplies
    covers: list[str]  # convs/linears/norms whose output channels the group decides
    stream: bool  # joined by a residual add
    channels_last: list[str] = field(default_factory=list)  # gates on a channels-last output


@dataclass
class Analysis:
    """The result of `analyse`: groups and what export has to slice."""

    groups: list[Group]
    convs: list[ConvRec]
    norms: list[NormRec]
    space_channels: list[int]
    group_of_space: dict[int, str] = field(default_factory=dict)
    pinned_reasons: dict[int, str] = field(default_factory=dict)

    def space_group(self, space: int) -> str | None:
        """The group name deciding `space` (None: full width)."""
        return self.group_of_space.get(space)


class _Spaces:
    """Union-find over channel spaces, with per-root channels, unit width, pinned, stream."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.channels: list[int] = []
        self.unit: list[int] = []
        self.pinned: dict[int, str] = {}
        self.stream: set[int] = set()

    def new(self, channels: int, pinned: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.channels.append(int(channels))
        self.unit.append(1)
        if pinned is not None:
            self.pinned[i] = pinned
        return i

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.channels[ra] != self.channels[rb]:
            raise ValueError(f"joined spaces differ: {self.channels[ra]} vs {self.channels[rb]}")
        self.parent[rb] = ra
        self.unit[ra] = math.lcm(self.unit[ra], self.unit[rb])
        reason = self.pinned.pop(rb, None) or self.pinned.get(ra)
        if reason is not None:
            self.pinned[ra] = reason
        if rb in self.stream:
            self.stream.add(ra)
        return ra

    def pin(self, segs: Iterable[int], reason: str) -> None:
        for s in segs:
            self.pinned.setdefault(self.find(s), reason)

    def is_pinned(self, s: int) -> bool:
        return self.find(s) in self.pinned


def trace(model: nn.Module, input_size: Sequence[int]) -> fx.GraphModule:
    """fx-trace `model` in eval mode and annotate every node with its shape (fake tensors)."""
    was_training = model.training
    model.eval()  # eval graph: no aux heads, stochastic depth as identity, batch-1 norms
    try:
        gm = fx.symbolic_trace(model)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        ref = next(iter(model.parameters()))
        with mode:
            x = torch.zeros((1, *input_size), dtype=ref.dtype, device=ref.device)
        ShapeProp(gm, fake_mode=mode).propagate(x)
    finally:
        model.train(was_training)
    return gm


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            if _shape(a) is not None:
                out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(node.args)
    visit(node.kwargs)
    return out


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The role of a node: conv, linear, norm, zero, nonzero, add, mul, cat, flatten, mean,
    permute, meta (no tensor data flows), or other."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.Conv2d):
            return "conv"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, _BatchNorm):
            return "norm"
        if isinstance(m, nn.Flatten):
            return "flatten"
        if isinstance(m, _ZERO_MODULES):
            return "zero"
        if isinstance(m, _NONZERO_MODULES):
            return "nonzero"
        return "other"
    if node.op == "call_function":
        t = node.target
        if t in _ZERO_FNS:
            return "zero"
        if t in _NONZERO_FNS:
            return "nonzero"
        if t in _ADD:
            return "add"
        if t in _MUL:
            return "mul"
        if t is torch.cat:
            return "cat"
        if t is torch.flatten:
            return "flatten"
        if t is torch.permute:
            return "permute"
        return "other"
    if node.op == "call_method":
        t = str(node.target)
        if t in ("size", "dim"):
            return "meta"
        if t in _ZERO_METHODS:
            return "zero"
        if t in _NONZERO_METHODS:
            return "nonzero"
        if t in ("add", "add_"):
            return "add"
        if t in ("mul", "mul_"):
            return "mul"
        if t in ("flatten", "mean", "permute"):
            return t
        return "other"
    return node.op  # placeholder, get_attr, output


def _norm_dims(dims: Any, ndim: int) -> list[int] | None:
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return [d % ndim for d in dims]


class _Walker:
    """One pass over the traced graph building spaces, conv/norm records and values."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.sp = _Spaces()
        self.vals: dict[fx.Node, Val] = {}
        self.kinds: dict[fx.Node, str] = {}
        self.convs: list[ConvRec] = []
        self.norms: list[NormRec] = []
        self.producer_nodes: dict[fx.Node, ConvRec] = {}

    def fresh(self, node: fx.Node, reason: str | None) -> Val | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return Val((self.sp.new(shape[1], reason),), 1)

    def pin_inputs(self, node: fx.Node, reason: str) -> None:
        for a in _tensor_args(node):
            v = self.vals.get(a)
            if v is not None:
                self.sp.pin(v.segs, reason)

    def width(self, v: Val) -> int:
        return sum(self.sp.channels[s] for s in v.segs) * v.block

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            kind = _classify(node, self.modules)
            self.kinds[node] = kind
            handler: Callable[[fx.Node], Val | None] = getattr(self, f"_on_{kind}", self._on_other)
            val = handler(node)
            if val is not None:
                self.vals[node] = val

    # --- handlers -------------------------------------------------------------------------
    def _on_placeholder(self, node: fx.Node) -> Val | None:
        return self.fresh(node, "the model input")

    def _on_get_attr(self, node: fx.Node) -> Val | None:
        return None  # parameters: handled where they are used

    def _on_meta(self, node: fx.Node) -> Val | None:
        return None

    def _on_output(self, node: fx.Node) -> Val | None:
        self.pin_inputs(node, "reaches the model output")
        return None

    def _on_other(self, node: fx.Node) -> Val | None:
        what = node.target if node.op != "call_module" else type(self.modules[str(node.target)])
        name = getattr(what, "__name__", str(what))
        reason = f"{node.op} {name} at {node.name} is not channel-wise"
        self.kinds[node] = "other"  # also when a known op meets a layout it does not handle
        self.pin_inputs(node, reason)
        args = _tensor_args(node)
        src, shape = (_shape(args[0]) if args else None), _shape(node)
        v = self.vals.get(args[0]) if args else None
        if v is not None and shape is not None and src == shape and len(shape) > v.cdim:
            # same layout in and out (e.g. a layer norm): the channels stay on the same dim
            return Val((self.sp.new(shape[v.cdim], reason),), v.cdim)
        return self.fresh(node, reason)

    def _input(self, node: fx.Node) -> Val | None:
        args = _tensor_args(node)
        return self.vals.get(args[0]) if args else None

    def _on_zero(self, node: fx.Node) -> Val | None:
        v = self._input(node)
        shape = _shape(node)
        if v is None or shape is None or len(shape) <= v.cdim:
            return self._on_other(node)
        if self.width(v) != shape[v.cdim]:  # pooling to a different layout
            return self._on_other(node)
        return v

    _on_nonzero = _on_zero

    def _on_norm(self, node: fx.Node) -> Val | None:
        v = self._input(node)
        if v is None or v.cdim != 1 or v.block != 1:
            return self._on_other(node)
        self.norms.append(NormRec(str(node.target), v.segs))
        return v

    def _on_conv(self, node: fx.Node) -> Val | None:
        conv = self.modules[str(node.target)]
        assert isinstance(conv, nn.Conv2d)
        v = self._input(node)
        if v is None or v.cdim != 1 or v.block != 1:
            return self._on_other(node)
        cin, cout, g = conv.in_channels, conv.out_channels, conv.groups
        tied = False
        if g == 1:
            out = self.sp.new(cout)
        elif cin == cout and len(v.segs) == 1:
            out = v.segs[0]  # depthwise / grouped: output channels follow input channels
            root = self.sp.find(out)
            self.sp.unit[root] = math.lcm(self.sp.unit[root], cin // g)
            tied = True
        else:
            reason = f"{node.target}: grouped conv {cin}->{cout} in {g} groups"
            self.sp.pin(v.segs, reason)
            out = self.sp.new(cout, reason)
        rec = ConvRec(str(node.target), "conv", v.segs, 1, out, tied, node.name)
        self.convs.append(rec)
        self.producer_nodes[node] = rec
        return Val((out,), 1)

    def _on_linear(self, node: fx.Node) -> Val | None:
        lin = self.modules[str(node.target)]
        assert isinstance(lin, nn.Linear)
        v = self._input(node)
        shape = _shape(node)
        if v is None or shape is None or v.cdim != len(shape) - 1:
            return self._on_other(node)
        out = self.sp.new(lin.out_features)
        rec = ConvRec(str(node.target), "linear", v.segs, v.block, out, False, node.name)
        self.convs.append(rec)
        self.producer_nodes[node] = rec
        return Val((out,), v.cdim)

    def _join(self, node: fx.Node, stream: bool) -> Val | None:
        shape = _shape(node)
        if shape is None:
            return self._on_other(node)
        vals: list[Val] = []
        for a in _tensor_args(node):
            s = _shape(a)
            v = self.vals.get(a)
            if s is None or v is None:
                # a parameter/buffer operand: fine if it does not vary per channel
                if s is not None and math.prod(s) > 1:
                    return self._on_other(node)
                continue
            if len(s) <= v.cdim or s[v.cdim] == 1:
                continue  # broadcast along channels (a per-sample scalar)
            vals.append(v)
        if not vals:
            return self._on_other(node)
        first = vals[0]
        if any(v.cdim != first.cdim or v.block != first.block for v in vals) or any(
            len(v.segs) != len(first.segs) for v in vals
        ):
            return self._on_other(node)
        roots = [tuple(self.sp.find(s) for s in v.segs) for v in vals]
        if len(first.segs) > 1 and any(r != roots[0] for r in roots):
            return self._on_other(node)  # joining concatenations segment-wise: not tracked
        if any(self.width(v) != self.width(first) for v in vals):
            return self._on_other(node)
        for v in vals[1:]:
            root = self.sp.union(first.segs[0], v.segs[0])
            if stream:
                self.sp.stream.add(root)
        return first

    def _on_add(self, node: fx.Node) -> Val | None:
        return self._join(node, stream=True)

    def _on_mul(self, node: fx.Node) -> Val | None:
        return self._join(node, stream=False)

    def _on_cat(self, node: fx.Node) -> Val | None:
        tensors = _arg(node, 0, "tensors", None)
        dim = _arg(node, 1, "dim", 0)
        shape = _shape(node)
        if not isinstance(tensors, (list, tuple)) or shape is None or not isinstance(dim, int):
            return self._on_other(node)
        vals = [self.vals.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if any(v is None for v in vals):
            return self._on_other(node)
        checked = [v for v in vals if v is not None]
        if any(v.cdim != dim % len(shape) or v.block != 1 for v in checked):
            return self._on_other(node)
        return Val(tuple(s for v in checked for s in v.segs), checked[0].cdim)

    def _on_flatten(self, node: fx.Node) -> Val | None:
        v = self._input(node)
        src = _shape(_tensor_args(node)[0]) if _tensor_args(node) else None
        if node.op == "call_module":
            flat = self.modules[str(node.target)]
            assert isinstance(flat, nn.Flatten)
            start, end = flat.start_dim, flat.end_dim
        else:
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        if v is None or src is None or not isinstance(start, int) or not isinstance(end, int):
            return self._on_other(node)
        start, end = start % len(src), end % len(src)
        if start != v.cdim or end != len(src) - 1:
            return self._on_other(node)
        return Val(v.segs, v.cdim, v.block * math.prod(src[v.cdim + 1 :]))

    def _on_mean(self, node: fx.Node) -> Val | None:
        v = self._input(node)
        src = _shape(_tensor_args(node)[0]) if _tensor_args(node) else None
        if v is None or src is None:
            return self._on_other(node)
        dims = _norm_dims(_arg(node, 1, "dim", None), len(src))
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if dims is None or v.cdim in dims or v.block != 1:
            return self._on_other(node)
        cdim = v.cdim if keepdim else v.cdim - sum(d < v.cdim for d in dims)
        return Val(v.segs, cdim)

    def _on_permute(self, node: fx.Node) -> Val | None:
        v = self._input(node)
        shape = _shape(node)
        raw = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims", None),)
        dims = list(raw[0]) if len(raw) == 1 and isinstance(raw[0], (list, tuple)) else list(raw)
        if v is None or shape is None or v.block != 1:
            return self._on_other(node)
        norm = _norm_dims(dims, len(shape))
        if norm is None or sorted(norm) != list(range(len(shape))):
            return self._on_other(node)
        return Val(v.segs, norm.index(v.cdim))


def _gate_points(w: _Walker) -> dict[fx.Node, int]:
    """Node -> space for every place a gate multiplies its output."""
    points: dict[fx.Node, int] = {}
    for node, rec in w.producer_nodes.items():
        at = node
        users = list(node.users)
        if len(users) == 1 and w.kinds.get(users[0]) == "norm":
            at = users[0]
            rec.norm = str(at.target)
        if any(w.kinds.get(u) == "nonzero" for u in at.users):
            continue  # never before a sigmoid: gate(0) would not stay 0
        points[at] = rec.out_space
    return points


def _prove_exact(w: _Walker, points: dict[fx.Node, int]) -> None:
    """Pin every space whose removed channels would reach a channel-mixing layer non-zero."""
    zero: dict[fx.Node, tuple[bool, ...]] = {}
    for node in w.gm.graph.nodes:
        v = w.vals.get(node)
        if v is None:
            continue
        kind = w.kinds[node]
        args = [a for a in _tensor_args(node) if a in w.vals]
        rec = w.producer_nodes.get(node)
        if rec is not None:
            src = args[0]
            if not rec.tied:  # a dense layer mixes its input channels
                for seg, z in zip(w.vals[src].segs, zero[src], strict=True):
                    if not z:
                        w.sp.pin([seg], f"{rec.name} reads removed channels that are not zero")
        if node in points:
            zero[node] = (True,) * len(v.segs)
        elif kind in ("zero", "flatten", "mean", "permute") and args:
            zero[node] = zero[args[0]]
        elif kind in ("add", "mul", "cat"):
            if kind == "cat":
                zero[node] = tuple(z for a in args for z in zero[a])
            else:
                mine = tuple(w.sp.find(s) for s in v.segs)
                operands = [
                    zero[a] for a in args if tuple(w.sp.find(s) for s in w.vals[a].segs) == mine
                ]
                combine = all if kind == "add" else any
                zero[node] = tuple(combine(z) for z in zip(*operands, strict=True))
        else:
            zero[node] = (False,) * len(v.segs)


def analyse(model: nn.Module, input_size: Sequence[int] = (3, 64, 64)) -> Analysis:
    """Coupling groups of `model` from its traced graph (see the module docstring)."""
    gm = trace(model, input_size)
    w = _Walker(gm)
    w.run()
    points = _gate_points(w)
    _prove_exact(w, points)
    sp = w.sp
    gated: dict[int, list[str]] = {}
    last: dict[int, list[str]] = {}
    for node, space in points.items():
        gated.setdefault(sp.find(space), []).append(str(node.target))
        shape, v = _shape(node), w.vals[node]
        if shape is not None and len(shape) > 2 and v.cdim == len(shape) - 1:
            last.setdefault(sp.find(space), []).append(str(node.target))
    covers: dict[int, list[str]] = {}
    for rec in w.convs:
        covers.setdefault(sp.find(rec.out_space), []).append(rec.name)
    for norm in w.norms:
        if len(norm.segs) == 1:
            covers.setdefault(sp.find(norm.segs[0]), []).append(norm.name)
    groups: list[Group] = []
    seen: set[int] = set()
    for rec in w.convs:  # graph order: stem first
        root = sp.find(rec.out_space)
        if root in seen or root in sp.pinned:
            continue
        seen.add(root)
        if root not in gated:
            sp.pinned[root] = "no place for an exact gate"
            continue
        name = gated[root][0]
        groups.append(
            Group(
                name=name,
                space=root,
                channels=sp.channels[root],
                unit_width=sp.unit[root],
                gates=gated[root],
                covers=_module_order(covers[root], w.modules),
                stream=root in sp.stream,
                channels_last=last.get(root, []),
            )
        )
    convs = [
        ConvRec(
            r.name,
            r.kind,
            tuple(sp.find(s) for s in r.in_segs),
            r.in_block,
            sp.find(r.out_space),
            r.tied,
            r.node,
            r.norm,
        )
        for r in w.convs
    ]
    norms = [NormRec(n.name, tuple(sp.find(s) for s in n.segs)) for n in w.norms]
    return Analysis(
        groups=groups,
        convs=convs,
        norms=norms,
        space_channels=[sp.channels[sp.find(i)] for i in range(len(sp.parent))],
        group_of_space={g.space: g.name for g in groups},
        pinned_reasons={sp.find(i): r for i, r in sp.pinned.items()},
    )


def _module_order(names: list[str], modules: dict[str, nn.Module]) -> list[str]:
    order = {n: i for i, n in enumerate(modules)}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))
