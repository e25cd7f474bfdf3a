"""Reading a network's parameters out of an ONNX graph by structure, not by initializer names.

Exporters and onnx-simplifier rename, transpose and fold weights (``torch.onnx.export`` folds each
BatchNorm into the preceding Conv and stores Linear weights transposed under anonymous names), so
names cannot be trusted. Instead the graph is walked in topological order and every node that
carries parameters becomes one :class:`ParamOp`:

* ``conv``: a ``Conv`` with a constant weight, with the ``BatchNormalization`` that alone consumes
  its output folded in (:func:`fold_batchnorm`), so folded and unfolded exports read the same;
* ``linear``: a ``MatMul`` with a constant right operand, or a ``Gemm`` with a constant ``B``,
  as an ``(in, out)`` kernel, plus the bias of a ``Gemm`` or of an ``Add`` that alone consumes a
  ``MatMul``'s output;
* ``mul`` / ``add``: an elementwise ``Mul`` / ``Add`` with exactly one constant operand (learned
  scales and offsets, but also fixed constants such as a norm's ``1/sqrt(d)``).

A converter lists the layers of its module in call order as :class:`Slot` s and :func:`match_slots`
pairs them: the n-th conv/linear op must be the n-th conv/linear slot (shape, stride, groups,
padding and bias presence checked), and each mul/add slot takes, among the elementwise ops between
its neighbouring conv/linear layers, the first or last one whose constant has the slot's shape.
Every misfit is reported in one :class:`OnnxGraphMismatchError` that names the first node that does
not fit. The ``onnx`` package only parses the file; nothing in it is executed. Constants are
followed through layout-only nodes (Identity, Transpose, Reshape, (Un)Squeeze, Slice, Cast), which
is the one piece of graph evaluation done here, in numpy.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import pathlib
import tempfile
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "OnnxGraphError",
    "OnnxGraphMismatchError",
    "OnnxGraph",
    "ParamOp",
    "Slot",
    "fold_batchnorm",
    "load_onnx",
    "match_slots",
]


class OnnxGraphError(ValueError):
    """The file is not a readable ONNX model, or holds a structure this reader does not handle."""


class OnnxGraphMismatchError(OnnxGraphError):
    """The graph's parameter-carrying nodes do not fit the module's layers."""


@dataclasses.dataclass
class ParamOp:
    kind: str  # conv | linear | mul | add
    node: str  # a description naming the node, for messages
    position: int  # index in topological order
    weight: np.ndarray  # conv (O, I/groups, kh, kw); linear (in, out); mul/add the constant operand
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1
    dilations: tuple[int, int] = (1, 1)
    folded_batchnorm: bool = False
    # conv/linear: indices (among the conv/linear ops) of the ops whose outputs reach this op's data
    # input through parameter-free nodes; -1 is the graph input. None where unknown.
    sources: frozenset[int] | None = None

    def describe(self) -> str:
        if self.kind == "conv":
            o, i, kh, kw = self.weight.shape
            extra = (f" stride {list(self.stride)}" if self.stride != (1, 1) else "") + (
                f" groups {self.groups}" if self.groups > 1 else "")
            if tuple(self.pads) != (kh // 2, kw // 2, kh // 2, kw // 2):
                extra += f" pads {list(self.pads)}"
            if tuple(self.dilations) != (1, 1):
                extra += f" dilations {list(self.dilations)}"
            return f"Conv {o}x{i}x{kh}x{kw}{extra}"
        if self.kind == "linear":
            return f"Linear {self.weight.shape[0]}->{self.weight.shape[1]}{' with bias' if self.bias is not None else ''}"
        return f"{self.kind.capitalize()} by a constant of shape {tuple(self.weight.shape)}"


@dataclasses.dataclass(frozen=True)
class Slot:
    """One parameter-carrying layer of a module, in call order.

    ``path``: the layer's NNX path; conv slots fill ``path.kernel`` (HWIO) and ``path.bias``,
    linear slots ``path.kernel`` (in, out) (and ``path.bias`` with ``bias``), mul/add slots the
    single parameter ``path`` itself. ``shape``: conv (O, I/groups, kh, kw) as ONNX stores it;
    linear (in, out); mul/add the parameter's shape.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    stride: int = 1
    groups: int = 1
    bias: bool = False  # linear only; a conv always gets one (its folded BatchNorm's, or zeros)
    pick: str = "last"  # mul/add: "first" or "last" matching elementwise op in its interval
    # conv/linear: paths of the conv/linear slots whose outputs reach this layer's input through
    # parameter-free operations ("input": the network input). None: not checked.
    inputs: frozenset[str] | None = None

    def describe(self) -> str:
        if self.kind == "conv":
            o, i, kh, kw = self.shape
            extra = (f" stride {[self.stride] * 2}" if self.stride != 1 else "") + (
                f" groups {self.groups}" if self.groups > 1 else "")
            return f"{self.path} (Conv {o}x{i}x{kh}x{kw}{extra})"
        if self.kind == "linear":
            return f"{self.path} (Linear {self.shape[0]}->{self.shape[1]}{' with bias' if self.bias else ''})"
        return f"{self.path} ({self.kind.capitalize()} by a learned {self.shape})"


def fold_batchnorm(weight, bias, scale, offset, mean, var, eps):
    """Conv(W, b) -> BatchNorm(scale, offset, mean, var, eps) as one Conv(W', b'):
    ``W' = W * s``, ``b' = (b - mean) * s + offset`` with ``s = scale / sqrt(var + eps)`` per output
    channel; computed in float64 so folding adds no rounding beyond the final cast to float32 (or
    the weight's dtype if wider)."""
    s = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    w = np.asarray(weight, np.float64) * s.reshape((-1,) + (1,) * (np.ndim(weight) - 1))
    b = 0.0 if bias is None else np.asarray(bias, np.float64)
    b = (b - np.asarray(mean, np.float64)) * s + np.asarray(offset, np.float64)
    dtype = np.promote_types(np.asarray(weight).dtype, np.float32)
    return w.astype(dtype), b.astype(dtype)


# ------------------------------------------------------------------------------------------------
# Reading


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node, position: int) -> str:
    name = f" {node.name!r}" if node.name else ""
    return f"node #{position} {node.op_type}{name} (output {node.output[0]!r})"


def _topological(nodes: Sequence, source: str) -> list:
    """Kahn's algorithm, ties broken by file order: a sorted graph (as the ONNX spec requires)
    comes back unchanged, an unsorted one in a valid order."""
    produced = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps = [set() for _ in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for inp in n.input:
            j = produced.get(inp)
            if j is not None and j != i and j not in deps[i]:
                deps[i].add(j)
                users[j].append(i)
    indegree = [len(d) for d in deps]
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            indegree[u] -= 1
            if indegree[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise OnnxGraphError(f"{source}: the graph has a cycle, it is not a valid ONNX model")
    return order


def _fold_layout(op: str, values: list, attrs: dict) -> np.ndarray | None:
    """The output of a layout-only node whose inputs are all constants, or None for other nodes."""
    x = values[0]
    if op == "Identity":
        return x
    if op == "Cast":
        import onnx

        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op == "Reshape":
        shape = [int(s) for s in values[1]]
        shape = [x.shape[i] if s == 0 and not attrs.get("allowzero") else s for i, s in enumerate(shape)]
        return np.reshape(x, shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = attrs.get("axes", values[1] if len(values) > 1 else None)
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in axes))
        out = x
        ndim = x.ndim + len(axes)
        for a in sorted(int(a) % ndim for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Slice":
        if len(values) > 1:
            starts, ends = values[1], values[2]
            axes = values[3] if len(values) > 3 and values[3] is not None else range(len(starts))
            steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
        else:
            starts, ends = attrs["starts"], attrs["ends"]
            axes, steps = attrs.get("axes", range(len(starts))), [1] * len(starts)
        index = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            index[int(a)] = slice(int(s), int(e), int(st))
        return x[tuple(index)]
    return None


_LAYOUT_OPS = ("Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Slice")


class OnnxGraph:
    """The parameter-carrying operations of one ONNX model, in topological order.

    ``ops``: the :class:`ParamOp` s; ``input_shapes``: the graph inputs' shapes (None for a
    dynamic dimension); ``pool_kernels``: kernel sizes of the MaxPool nodes in order (the SPP
    blocks'); ``num_nodes``: the node count. :meth:`from_model` reads them from a parsed model.
    """

    def __init__(self, source: str, ops: list[ParamOp], input_shapes: dict[str, tuple], pool_kernels: tuple[int, ...],
                 num_nodes: int):
        self.source, self.ops, self.input_shapes = source, ops, input_shapes
        self.pool_kernels, self.num_nodes = tuple(pool_kernels), num_nodes

    @classmethod
    def from_model(cls, model, source: str) -> "OnnxGraph":
        return _GraphReader(model, source).graph()


class _GraphReader:
    def __init__(self, model, source: str):
        from onnx import numpy_helper

        self.source = source
        graph = model.graph
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_shapes = {
            i.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim)
            for i in graph.input
            if i.name not in self.constants
        }
        self.nodes = _topological(list(graph.node), source)
        users: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for inp in n.input:
                users.setdefault(inp, []).append(i)
        for i, n in enumerate(self.nodes):
            if n.op_type == "Constant":
                a = _attrs(n)
                if "value" in a:
                    self.constants[n.output[0]] = numpy_helper.to_array(a["value"])
                elif "value_float" in a or "value_int" in a:
                    self.constants[n.output[0]] = np.asarray(a.get("value_float", a.get("value_int")))
            elif n.op_type in _LAYOUT_OPS and n.input and all((not x) or x in self.constants for x in n.input):
                values = [self.constants.get(x) if x else None for x in n.input]
                out = _fold_layout(n.op_type, values, _attrs(n))
                if out is not None:
                    self.constants[n.output[0]] = out
        self.absorbed: dict[int, int] = {}  # node index of a folded BatchNorm / bias Add -> its Conv / MatMul
        self.ops = self._param_ops(users)
        self._trace_sources()

    def _trace_sources(self) -> None:
        """Sets each conv/linear op's ``sources``. Shapes are metadata, not data: what a ``Shape``
        node feeds (dynamic reshapes) carries no source."""
        strict_ops = [op for op in self.ops if op.kind in ("conv", "linear")]
        index = {op.position: k for k, op in enumerate(strict_ops)}
        index.update({j: index[i] for j, i in self.absorbed.items() if i in index})
        src: dict[str, frozenset[int]] = {name: frozenset({-1}) for name in self.input_shapes}
        empty: frozenset[int] = frozenset()
        for i, n in enumerate(self.nodes):
            if i in index:
                if i not in self.absorbed:
                    strict_ops[index[i]].sources = src.get(n.input[0], empty)
                out = frozenset({index[i]})
            elif n.op_type in ("Shape", "Size"):
                out = empty
            else:
                out = empty.union(*(src.get(x, empty) for x in n.input if x))
            for o in n.output:
                src[o] = out

    def graph(self) -> OnnxGraph:
        pools = tuple(int(_attrs(n)["kernel_shape"][0]) for n in self.nodes if n.op_type == "MaxPool")
        return OnnxGraph(self.source, self.ops, self.input_shapes, pools, len(self.nodes))

    def _const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def _only_user(self, users, output: str, op_type: str):
        u = users.get(output, [])
        if len(u) == 1 and self.nodes[u[0]].op_type == op_type:
            return u[0]
        return None

    def _param_ops(self, users) -> list[ParamOp]:
        ops: list[ParamOp] = []
        absorbed = self.absorbed
        for i, n in enumerate(self.nodes):
            if i in absorbed:
                continue
            label = _node_label(n, i)
            t = n.op_type
            if t == "Conv":
                ops.append(self._conv(i, n, label, users, absorbed))
            elif t == "BatchNormalization":
                raise OnnxGraphError(f"{self.source}: {label} does not directly follow a Conv; only Conv->BatchNorm is folded")
            elif t in ("MatMul", "Gemm"):
                op = self._linear(i, n, label, users, absorbed)
                if op is not None:
                    ops.append(op)
            elif t in ("Mul", "Add") and len(n.input) == 2:
                a, b = self._const(n.input[0]), self._const(n.input[1])
                if (a is None) != (b is None):
                    ops.append(ParamOp(t.lower(), label, i, np.asarray(a if a is not None else b)))
        return ops

    def _conv(self, i, n, label, users, absorbed) -> ParamOp:
        w, b = self._const(n.input[1]), (self._const(n.input[2]) if len(n.input) > 2 else None)
        if w is None or (len(n.input) > 2 and n.input[2] and b is None):
            raise OnnxGraphError(f"{self.source}: {label}: its weight/bias is computed, not a stored constant")
        a = _attrs(n)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise OnnxGraphError(f"{self.source}: {label}: auto_pad {a['auto_pad']!r} is not supported")
        if w.ndim != 4:
            raise OnnxGraphError(f"{self.source}: {label}: a {w.ndim - 2}-D convolution, expected 2-D")
        op = ParamOp("conv", label, i, w, b, stride=tuple(a.get("strides", (1, 1))), pads=tuple(a.get("pads", (0,) * 4)),
                     groups=int(a.get("group", 1)), dilations=tuple(a.get("dilations", (1, 1))))
        j = self._only_user(users, n.output[0], "BatchNormalization")
        if j is not None:
            bn = self.nodes[j]
            params = [self._const(x) for x in bn.input[1:5]]
            if any(p is None for p in params):
                raise OnnxGraphError(f"{self.source}: {_node_label(bn, j)}: its statistics are not stored constants")
            eps = _attrs(bn).get("epsilon", 1e-5)
            op.weight, op.bias = fold_batchnorm(w, b, *params, eps)
            op.folded_batchnorm = True
            absorbed[j] = i
        return op

    def _linear(self, i, n, label, users, absorbed) -> ParamOp | None:
        a = _attrs(n)
        if n.op_type == "Gemm":
            w = self._const(n.input[1])
            if w is None:
                return None
            if a.get("transA", 0):
                raise OnnxGraphError(f"{self.source}: {label}: Gemm with transA is not supported")
            alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
            w = w.T if a.get("transB", 0) else w
            w = w if alpha == 1.0 else (w * alpha).astype(w.dtype)
            c = self._const(n.input[2]) if len(n.input) > 2 else None
            bias = None if c is None else np.broadcast_to(c if beta == 1.0 else c * beta, (w.shape[1],)).copy()
            return ParamOp("linear", label, i, w, bias)
        left, w = self._const(n.input[0]), self._const(n.input[1])
        if w is None or left is not None:
            if left is not None and w is None:
                raise OnnxGraphError(f"{self.source}: {label}: a constant left operand (x @ W expected)")
            return None  # an activation-activation product (attention), no parameters
        if w.ndim != 2:
            raise OnnxGraphError(f"{self.source}: {label}: a constant operand of shape {w.shape}, expected 2-D")
        bias = None
        j = self._only_user(users, n.output[0], "Add")
        if j is not None:
            add = self.nodes[j]
            other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
            c = self._const(other)
            if c is not None and c.size == w.shape[1] and c.shape[-1:] == (w.shape[1],):
                bias = c.reshape(-1)
                absorbed[j] = i
        return ParamOp("linear", label, i, w, bias)


def load_onnx(path: str | os.PathLike, what: str) -> OnnxGraph:
    """Parses an ONNX file (weights in external ``.onnx.data`` files included) into an :class:`OnnxGraph`.
    A URL (``gs://``) is downloaded first, with its ``.data`` sibling if there is one."""
    from anim_jax import storage

    if storage.is_url(path):
        storage.check_bucket(path, what)
        if not storage.as_path(path).is_file():
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
        with tempfile.TemporaryDirectory(prefix="anim-jax-onnx-") as tmp:
            local = os.path.join(tmp, storage.as_path(path).name)
            storage.download(path, local)
            if storage.as_path(f"{path}.data").is_file():  # onnx reads external weights beside the model
                storage.download(f"{path}.data", local + ".data")
            try:
                graph = load_onnx(local, what)
            except OnnxGraphError as e:  # name the URL, not the temporary download
                raise OnnxGraphError(str(e).replace(repr(local), repr(str(path)))) from None
        graph.source = f"{what} {str(path)!r}"
        return graph
    path = pathlib.Path(path)
    source = f"{what} {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as e:  # a runtime dependency; say so instead of a bare ImportError
        raise OnnxGraphError(f"reading {source} needs the 'onnx' package ({e})") from None
    try:
        model = onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise OnnxGraphError(f"{source} is not a readable ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not model.graph.node:
        raise OnnxGraphError(f"{source} is not a readable ONNX model: its graph has no nodes")
    return OnnxGraph.from_model(model, source)


# ------------------------------------------------------------------------------------------------
# Matching


def _conv_misfit(slot: Slot, op: ParamOp) -> str | None:
    if op.kind != "conv":
        return f"expected {slot.describe()}, found {op.describe()}"
    k = slot.shape[2]
    if (tuple(op.weight.shape) != slot.shape or op.stride != (slot.stride, slot.stride) or op.groups != slot.groups
            or tuple(op.pads) != (k // 2,) * 4 or tuple(op.dilations) != (1, 1)):
        # describe() names pads and dilations only where they differ from same-size padding, no dilation
        return f"expected {slot.describe()}, found {op.describe()}"
    return None


def _linear_misfit(slot: Slot, op: ParamOp) -> str | None:
    if op.kind != "linear":
        return f"expected {slot.describe()}, found {op.describe()}"
    if tuple(op.weight.shape) != slot.shape or (op.bias is not None) != slot.bias:
        return f"expected {slot.describe()}, found {op.describe()}"
    return None


def _squeezed(shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def match_slots(graph: OnnxGraph, slots: Sequence[Slot]) -> dict[str, np.ndarray]:
    """Pairs ``slots`` with ``graph``'s operations; returns ``{nnx path: array}`` in our layout
    (conv kernels HWIO, linear kernels (in, out)), or raises one OnnxGraphMismatchError listing
    every misfit, missing layer and unexpected node, led by the first node that does not fit."""
    strict_ops = [op for op in graph.ops if op.kind in ("conv", "linear")]
    strict_slots = [s for s in slots if s.kind in ("conv", "linear")]
    problems: list[str] = []
    first: str | None = None
    out: dict[str, np.ndarray] = {}

    for slot, op in zip(strict_slots, strict_ops):
        misfit = _conv_misfit(slot, op) if slot.kind == "conv" else _linear_misfit(slot, op)
        if misfit:
            problems.append(f"{op.node}: {misfit}")
            first = first or op.node
            continue
        if slot.kind == "conv":
            out[f"{slot.path}.kernel"] = np.transpose(op.weight, (2, 3, 1, 0))
            bias = op.bias if op.bias is not None else np.zeros(op.weight.shape[0], op.weight.dtype)
            out[f"{slot.path}.bias"] = np.asarray(bias).reshape(-1)
        else:
            out[f"{slot.path}.kernel"] = op.weight
            if slot.bias:
                out[f"{slot.path}.bias"] = op.bias
    if not problems and len(strict_ops) == len(strict_slots):
        # Same-shaped sibling layers (a CSP layer's two 1x1 branches, a head's class and box convs)
        # would swap silently if an exporter or simplifier emitted them in another order: check that
        # each layer reads from the layers the module feeds it from.
        path_of = {k: s.path for k, s in enumerate(strict_slots)}
        for slot, op in zip(strict_slots, strict_ops):
            if slot.inputs is None or op.sources is None:
                continue
            got = frozenset("input" if k == -1 else path_of[k] for k in op.sources)
            if got != slot.inputs:
                problems.append(f"{op.node}: matched to {slot.path}, which reads {sorted(slot.inputs)}, but the node "
                                f"reads {sorted(got)} (the graph's branches come in another order than the module's)")
                first = first or op.node
    missing = [s.describe() for s in strict_slots[len(strict_ops):]]
    unexpected = [f"{op.node}: {op.describe()}" for op in strict_ops[len(strict_slots):]]
    if unexpected:
        first = first or strict_ops[len(strict_slots)].node

    # Elementwise slots take ops between the conv/linear ops matched to their neighbours.
    claimed: set[int] = set()
    strict_index = -1
    for k, slot in enumerate(slots):
        if slot.kind in ("conv", "linear"):
            strict_index += 1
            continue
        lo = strict_ops[strict_index].position if 0 <= strict_index < len(strict_ops) else -1
        hi = strict_ops[strict_index + 1].position if strict_index + 1 < len(strict_ops) else graph.num_nodes
        candidates = [
            op for op in graph.ops
            if op.kind == slot.kind and lo < op.position < hi and op.position not in claimed
            and _squeezed(op.weight.shape) == _squeezed(slot.shape)
        ]
        if not candidates:
            missing.append(f"{slot.describe()} between graph nodes #{lo} and #{hi}")
            continue
        op = candidates[0] if slot.pick == "first" else candidates[-1]
        claimed.add(op.position)
        out[slot.path] = np.asarray(op.weight).reshape(slot.shape)

    if problems or missing or unexpected:
        lines = [f"{graph.source} does not fit the module"
                 + (f"; the first node that does not fit is {first}" if first else "") + ":"]
        for title, items in (("misfit", problems), ("missing", missing), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title}: " + "; ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
        raise OnnxGraphMismatchError("\n".join(lines))
    return out
