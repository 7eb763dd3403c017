"""Getting a model ready for ORT's quantizer, and reading what kind of model it is.

Models compactor did not export must work too: an old opset is upgraded (per-channel
quantization needs opset >= 13, and ORT's quantizer would otherwise write an invalid
model), and when ORT's symbolic shape inference gives up, plain ONNX shape inference is used
and the record says so.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compactor.errors import DataError, PassError
from compactor.quantization.modes import QuantMode

log = logging.getLogger(__name__)

MIN_OPSET = 13
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def first_line(e: BaseException, limit: int = 300) -> str:
    """The error's type and first line (ORT's messages can run for pages)."""
    from compactor.exporting import first_line as line

    text = line(e, limit)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def ensure_opset(src: Path, dst: Path, record: dict[str, Any]) -> Path:
    """Per-channel quantization needs opset >= 13; older models are upgraded first."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               MIN_OPSET)
    if got >= MIN_OPSET:
        return src
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter raises many types
        raise PassError(
            f"quantize: the model is at opset {got}, and upgrading it to {MIN_OPSET} failed: "
            f"{first_line(e)}",
            f"re-export the model at opset {MIN_OPSET} or later",
        ) from e
    onnx.save(converted, str(dst))
    record["opset_upgraded"] = {"from": got, "to": MIN_OPSET}
    return dst


def preprocess(src: Path, dst: Path, record: dict[str, Any]) -> Path:
    """ORT's ``quant_pre_process``: shape inference and graph optimization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compactor.exporting import quiet

    from .candidates import ort_quiet

    # ORT's symbolic shape inference writes its partial model into the current folder when
    # it gives up: keep that litter in the work folder.
    with _cwd(dst.parent):
        try:
            with quiet(), ort_quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
            record["preprocess"] = "symbolic shape inference + optimization"
            return dst
        except Exception as e:  # noqa: BLE001 - ORT's shape inference raises many types
            reason = first_line(e, 200)
            log.info("symbolic shape inference failed (%s); using ONNX shape inference",
                     reason)
        try:
            with quiet(), ort_quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            record["preprocess"] = "ONNX shape inference + optimization"
            record["symbolic_shape_inference"] = f"gave up: {reason}"
            record.setdefault("warnings", []).append(
                "ONNX Runtime's symbolic shape inference gave up on this model; used plain "
                "ONNX shape inference"
            )
            return dst
        except Exception as e:  # noqa: BLE001 - ORT's pre-processing raises many types; recorded
            record["preprocess"] = "skipped"
            record.setdefault("warnings", []).append(
                f"pre-processing failed and was skipped: {first_line(e, 200)}")
            return src


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def match_nodes(model, globs: Sequence[str], key: str, record: dict[str, Any]) -> list[str]:
    """Names of the nodes matching any glob; a glob matching nothing is a warning."""
    if not globs:
        return []
    names = [n.name for n in model.graph.node]
    matched = sorted({n for n in names for g in globs if fnmatch.fnmatchcase(n, g)})
    unused = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if unused:
        record.setdefault("warnings", []).append(
            f"{key} patterns matched no node: {', '.join(unused)}")
    return matched


def gemm_to_matmul(src: Path, dst: Path, record: dict[str, Any]) -> Path:
    """Gemm with a constant weight → MatMul (+ Add for the bias), same node name.

    ORT's dynamic quantization quantizes MatMul but not Gemm, and exporters and simplifiers
    (onnxsim) often turn a Linear layer into Gemm: without this, those layers stay float."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    nodes, changed = [], 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        beta = float(attrs.get("beta", 1.0))
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or len(inits[n.input[1]].dims) != 2
                or (bias is not None and beta != 1.0 and bias not in inits)):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        w = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
        w_name = f"{n.input[1]}_as_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        mm_out = f"{n.output[0]}_matmul" if bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mm_out], name=n.name))
        if bias:
            if beta != 1.0:
                b = numpy_helper.to_array(inits[bias]).astype(np.float32) * np.float32(beta)
                bias = f"{bias}_beta"
                model.graph.initializer.append(numpy_helper.from_array(b, bias))
            nodes.append(helper.make_node("Add", [mm_out, bias], [n.output[0]],
                                          name=f"{n.name}/bias"))
        changed += 1
    if not changed:
        return src
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return _save_rewritten(model, dst, record, "gemm_as_matmul", changed)


def gemm_bias_as_vector(src: Path, dst: Path, record: dict[str, Any]) -> Path:
    """A Gemm's constant bias of shape ``[1, N]`` (or ``[1]``, ``[]``, ``[1, 1]``) as the
    vector ``[N]`` it broadcasts to: the same sums.

    ORT's optimizer fuses a MatMul and an Add of a ``[1, N]`` row (as tf2onnx and jax2tf
    write a Dense layer) into such a Gemm, and ORT's static quantizer then fails on it with
    per-channel weights: its int32 bias check reads ``bias[i]`` as a number and gets a row
    ("The truth value of an array with more than one element is ambiguous"; magika's model
    did this). A vector bias quantizes per channel as it should."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    added: dict[str, str] = {}
    changed = 0
    for n in model.graph.node:
        if (n.op_type != "Gemm" or len(n.input) < 3 or n.input[2] not in inits
                or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w_dims = inits[n.input[1]].dims
        cols = int(w_dims[0] if attrs.get("transB", 0) else w_dims[1])
        dims = list(inits[n.input[2]].dims)
        if dims == [cols] or len(dims) > 2 or (len(dims) == 2 and dims[0] != 1) or (
                math.prod(dims) not in (1, cols)):
            continue  # already a vector, or a bias with rows of its own
        name = n.input[2]
        if name not in added:
            b = numpy_helper.to_array(inits[name]).reshape(-1)
            vec = np.ascontiguousarray(np.broadcast_to(b, (cols,)))
            added[name] = f"{name}_as_vector"
            model.graph.initializer.append(numpy_helper.from_array(vec, added[name]))
        n.input[2] = added[name]
        changed += 1
    if not changed:
        return src
    return _save_rewritten(model, dst, record, "gemm_bias_as_vector", changed)


def _save_rewritten(model, dst: Path, record: dict[str, Any], key: str, changed: int) -> Path:
    """Save a rewritten graph without the initializers nothing reads any more (read by a
    node of any graph, subgraphs included, or named as a graph input or output), and record
    how many nodes the rewrite changed under ``key``."""
    import onnx

    from compactor.measure.macs import all_graphs

    used = {i for g in all_graphs(model.graph) for node in g.node for i in node.input}
    used |= {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(dst))
    record[key] = changed
    return dst


# --------------------------------------------------------------------------- fusion


def fuse_transformer(src: Path, dst: Path, feeds: Sequence[dict], record: dict[str, Any]
                     ) -> Path | None:
    """ONNX Runtime's transformer fusions (``onnxruntime.transformers``): attention blocks
    into one ``Attention`` op, Add + LayerNorm into ``SkipLayerNormalization``, bias + GELU
    into ``BiasGelu``. Dynamic int8 then quantizes a whole attention block as ``QAttention``
    instead of three MatMuls around float glue; on this repository's 2-core host that made
    all-MiniLM-L6-v2's int8 model 1.95× faster than fp32 where plain dynamic int8 was 1.5×.

    Returns ``dst`` when something fused and the fused model's outputs match ``src`` on
    ``feeds`` (float, before any int8); None otherwise. ``record["transformer_fusion"]``
    says what happened either way. The fused ops are ONNX Runtime contrib ops: the model
    then needs ONNX Runtime, which every compactor profile uses."""
    info: dict[str, Any] = {"applied": False}
    record["transformer_fusion"] = info
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:
        info["reason"] = f"onnxruntime.transformers is not available: {e}"
        return None
    fused, stats, heads = _best_fusion(src, dst, optimize_model, info)
    if fused is None or not stats:
        info.setdefault("reason", "nothing to fuse: no attention, LayerNorm or GELU pattern "
                                  "ONNX Runtime recognizes")
        return None
    info.pop("reason", None)
    info["fused"] = stats
    if heads and heads[0]:
        info["num_heads"], info["hidden_size"] = heads
    fused.save_model_to_file(str(dst))
    err, scale = _max_difference(src, dst, feeds)
    info["max_abs_error"] = float(f"{err:.3g}")
    if not err <= 1e-3 * max(scale, 1.0):
        info["reason"] = (f"the fused model's outputs differ from the input's by up to "
                          f"{err:.3g} (scale {scale:.3g}): not used")
        dst.unlink(missing_ok=True)
        return None
    info["applied"] = True
    return dst


def _best_fusion(src: Path, dst: Path, optimize_model, info: dict[str, Any]):
    """ORT's optimizer at each (num_heads, hidden) the graph suggests: the run that fused
    the most ops (the first that fused Attention wins), its fused-op counts and shape."""
    import onnx

    from compactor.exporting import quiet

    from .candidates import ort_quiet

    model = onnx.load(str(src), load_external_data=False)
    shapes = head_shapes(model) or [(0, 0)]  # 0, 0: ORT's own detection
    fused, stats, heads = None, {}, None
    for num_heads, hidden in shapes:
        try:
            with quiet(), ort_quiet(), _cwd(dst.parent):
                m = optimize_model(str(src), model_type="bert", num_heads=num_heads,
                                   hidden_size=hidden, opt_level=0, use_gpu=False)
            got = {k: int(v) for k, v in m.get_fused_operator_statistics().items() if v}
        except Exception as e:  # noqa: BLE001 - the optimizer raises many types; recorded
            info["reason"] = f"ONNX Runtime's transformer optimizer failed: {first_line(e)}"
            continue
        if sum(got.values()) > sum(stats.values()):
            fused, stats, heads = m, got, (num_heads, hidden)
        if got.get("Attention"):
            break
    return fused, stats, heads


def head_shapes(model) -> list[tuple[int, int]]:
    """(num_heads, hidden_size) pairs read off the Reshapes that split attention heads
    (a shape ending in [heads, head_size], or [-1, head_size] with the hidden size from the
    square projection weights), most frequent first."""
    from collections import Counter

    from onnx import numpy_helper

    consts: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in model.graph.initializer
        if t.data_type == 7 and len(t.dims) <= 1}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producers = {o: n for n in model.graph.node for o in n.output}
    # The hidden size, for shapes that leave the head count to Reshape ([b, s, -1, 32]):
    # the width of the square projections (query, key, value, output).
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    square: Counter = Counter(dims[n.input[1]][0] for n in model.graph.node
                              if n.op_type == "MatMul" and len(dims.get(n.input[1], ())) == 2
                              and dims[n.input[1]][0] == dims[n.input[1]][1])
    hidden = square.most_common(1)[0][0] if square else 0
    counts: Counter = Counter()
    for n in model.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        tail: list[int] = []
        if n.input[1] in consts and consts[n.input[1]].size == 4:
            tail = [int(v) for v in consts[n.input[1]].reshape(-1)[2:]]
        elif n.input[1] in producers and producers[n.input[1]].op_type == "Concat":
            parts = [consts.get(i) for i in producers[n.input[1]].input]
            if len(parts) == 4 and all(p is not None and p.size == 1 for p in parts[2:]):
                tail = [int(p.reshape(-1)[0]) for p in parts[2:]]
        if len(tail) == 2 and tail[0] > 1 and tail[1] > 0:
            counts[(tail[0], tail[0] * tail[1])] += 1
        elif len(tail) == 2 and tail[0] == -1 and tail[1] > 0 and hidden % tail[1] == 0:
            counts[(hidden // tail[1], hidden)] += 1
    return [k for k, c in counts.most_common(3) if c >= 2]


def _max_difference(a: Path, b: Path, feeds: Sequence[dict]) -> tuple[float, float]:
    """Largest absolute difference of two models' outputs on ``feeds``, and the outputs'
    largest magnitude."""
    from compactor.measure.latency import session

    sa, sb = session(a), session(b)
    names = {i.name for i in sa.get_inputs()}
    err = scale = 0.0
    for f in feeds:
        feed = {k: v for k, v in f.items() if k in names}
        for x, y in zip(sa.run(None, feed), sb.run(None, feed), strict=True):
            if x.size and np.issubdtype(x.dtype, np.floating):
                err = max(err, float(np.max(np.abs(x.astype(np.float64) - y))))
                scale = max(scale, float(np.max(np.abs(x))))
            elif x.size and not np.array_equal(x, y):
                err = float("inf")
    return err, scale


# --------------------------------------------------------------------------- op mix


@dataclass(frozen=True)
class OpMix:
    """Where a model's multiply-accumulates are, by op type (weights when shapes are
    unknown)."""

    shares: dict[str, float]  # op type -> share of MACs (or of weight elements)
    basis: str  # "MACs" or "weights"
    softmax: int  # Softmax/Attention nodes: a sign of a transformer

    def share(self, *ops: str) -> float:
        return sum(self.shares.get(o, 0.0) for o in ops)

    def to_dict(self) -> dict[str, Any]:
        return {"basis": self.basis, "softmax_nodes": self.softmax,
                "shares": {k: round(v, 4) for k, v in sorted(self.shares.items(),
                                                             key=lambda kv: -kv[1])}}


def op_mix(model, input_shapes: Mapping[str, tuple[int, ...]]) -> OpMix:
    """The op mix of ``model`` and its subgraphs (``If`` branches, ``Loop``/``Scan``
    bodies): a weight that lives in a branch counts like one in the main graph."""
    from compactor.measure.macs import all_graphs, iter_nodes, macs_by_node

    per_node = macs_by_node(model, input_shapes)
    ops = {k: n.op_type for k, n in iter_nodes(model.graph)}
    graphs = all_graphs(model.graph)
    totals: dict[str, float] = {}
    basis = "MACs"
    if per_node and sum(per_node.values()) > 0:
        for k, m in per_node.items():
            totals[ops.get(k, "?")] = totals.get(ops.get(k, "?"), 0.0) + m
    else:
        basis = "weights"
        # a branch's weight may be its own initializer or one of an enclosing graph
        sizes = {t.name: int(np.prod(t.dims)) for g in graphs for t in g.initializer}
        for g in graphs:
            for n in g.node:
                if n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in sizes:
                    totals[n.op_type] = totals.get(n.op_type, 0.0) + sizes[n.input[1]]
    total = sum(totals.values()) or 1.0
    softmax = sum(1 for _, n in iter_nodes(model.graph) if n.op_type in ("Softmax", "Attention"))
    return OpMix({k: v / total for k, v in totals.items()}, basis, softmax)


def resolve_mode(setting: str, mix: OpMix, has_calibration: bool) -> tuple[QuantMode, str]:
    """The recipe's ``mode`` as a member, ``auto`` chosen from the op mix. Returns (mode,
    why)."""
    if setting == "auto":
        return choose_mode(mix, has_calibration)
    return QuantMode(setting), "set in the recipe"


def choose_mode(mix: OpMix, has_calibration: bool) -> tuple[QuantMode, str]:
    """``auto``: dynamic for MatMul-dominated (transformer) graphs, static for convolution
    networks and the rest; dynamic when there is no calibration data. Returns (mode, why)."""
    matmul, conv = mix.share("MatMul"), mix.share("Conv", "ConvTranspose")
    gemm = mix.share("Gemm")
    desc = (f"MatMul {matmul:.0%}, Conv {conv:.0%}, Gemm {gemm:.0%} of "
            f"{mix.basis}" + (f", {mix.softmax} Softmax/Attention" if mix.softmax else ""))
    # Linear layers export as MatMul or Gemm; with attention (Softmax), both make a
    # transformer, whose activation ranges vary from input to input.
    if matmul >= 0.5 or (mix.softmax and matmul + gemm >= 0.5):
        return QuantMode.DYNAMIC, (f"{desc}: a MatMul-dominated (transformer) graph, whose "
                                   "activation ranges vary from input to input; dynamic int8 "
                                   "measures them per input")
    if not has_calibration:
        return QuantMode.DYNAMIC, (f"{desc}: static int8 would suit it, but the recipe has "
                                   "no data.calibration, so dynamic it is")
    return QuantMode.STATIC, (f"{desc}: " + ("a convolution network" if conv >= 0.5 else
                                             "not MatMul-dominated")
                              + "; static int8 with calibrated ranges runs fused int8 kernels")


# --------------------------------------------------------------------------- data checks


_ONNX_TO_NP = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32,
               3: np.int8, 2: np.uint8, 9: np.bool_}


def model_inputs(model) -> dict[str, tuple[list[int | None], Any]]:
    """Graph inputs (initializers excluded): name -> (dims, None for a dynamic one; dtype)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tt.shape.dim]
        out[i.name] = (dims, _ONNX_TO_NP.get(tt.elem_type))
    return out


def fit_batches(model, batches: Sequence[Any], split: str) -> tuple[list[dict], int]:
    """The batches' inputs as feeds for ``model``, checked against its input shapes and
    dtypes (DataError, exit 3, on a mismatch). A model with a fixed batch size of 1 is fed
    one sample at a time (an input without a batch axis, a scalar, whole each time).
    Batches keep their own shapes: batches padded to their own length are fed as they are,
    never joined. Returns the feeds and the number of samples."""
    inputs = model_inputs(model)
    feeds: list[dict] = []
    samples = 0
    for bi, b in enumerate(batches):
        missing = [n for n in inputs if n not in b.inputs]
        if missing:
            raise DataError(
                f"data.{split} batch {bi} has no input {', '.join(missing)} (the model "
                f"takes {', '.join(inputs)})",
                "name the arrays after the model's inputs",
            )
        feed = {n: b.inputs[n] for n in inputs}
        one_at_a_time = False
        for name, (dims, dtype) in inputs.items():
            a = feed[name]
            if dtype is not None and a.dtype != dtype:
                raise DataError(
                    f"data.{split} batch {bi}: input {name!r} is {a.dtype}, the model takes "
                    f"{np.dtype(dtype).name}",
                    "fix the data's dtype (or model.inputs' dtype in the recipe)",
                )
            axis = b.axis(name)
            fixed = [(i, d) for i, d in enumerate(dims) if d is not None]
            if a.ndim != len(dims) or any(
                    a.shape[i] != d for i, d in fixed if not (i == axis and d == 1)):
                want = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
                raise DataError(
                    f"data.{split} batch {bi}: input {name!r} has shape {list(a.shape)}, the "
                    f"model expects {want}",
                    f"the {split} data must have the shapes the model was exported with",
                )
            if axis is not None and dims[axis] == 1 and a.shape[axis] != 1:
                one_at_a_time = True
        n = b.size
        samples += n
        if one_at_a_time:
            feeds += [{k: v for k, v in b.rows(slice(i, i + 1)).inputs.items() if k in feed}
                      for i in range(n)]
        else:
            feeds.append(feed)
    return feeds, samples
