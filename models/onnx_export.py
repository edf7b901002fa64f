"""ONNX export of a scoring model: raw features in, standardization and the network inside, one logit out.

The graph is built directly from the module's weights with `onnx.helper` (opset 17): the networks of
`models.nets` are only Linear, LayerNorm and ReLU layers, so the graph is short, deterministic (the same
weights give the same bytes) and needs neither torch's deprecated TorchScript exporter nor onnxscript.
Standardization is part of the graph, so that any ONNX runtime at a bank scores raw feature rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.nets import MLP, LogisticRegression
from models.spec import FeatureSpec

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
INPUT_NAME = "features"
OUTPUT_NAME = "logit"


class OnnxExportError(ValueError):
    """The model holds a layer that the exporter does not know."""


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in forward order."""
    if isinstance(model, MLP):
        return list(model.net)
    if isinstance(model, LogisticRegression):
        return [model.linear]
    raise OnnxExportError(f"cannot export a {type(model).__name__}: only MLP and LogisticRegression")


def _const(name: str, value: np.ndarray) -> TensorProto:
    """A float32 initializer."""
    return numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name=name)


def _layer_nodes(
    layer: nn.Module, index: int, x: str, inits: list[TensorProto]
) -> tuple[list[onnx.NodeProto], str]:
    """Nodes of one layer reading tensor `x`; returns them and the name of the layer's output."""
    out = f"h{index}"
    if isinstance(layer, nn.Linear):
        inits.append(_const(f"w{index}", layer.weight.detach().cpu().numpy()))
        inputs = [x, f"w{index}"]
        if layer.bias is not None:
            inits.append(_const(f"b{index}", layer.bias.detach().cpu().numpy()))
            inputs.append(f"b{index}")
        return [helper.make_node("Gemm", inputs, [out], transB=1)], out
    if isinstance(layer, nn.ReLU):
        return [helper.make_node("Relu", [x], [out])], out
    if isinstance(layer, nn.LayerNorm):
        if layer.weight is None or len(layer.normalized_shape) != 1:
            raise OnnxExportError("LayerNorm must be affine over the last dimension")
        inits.append(_const(f"g{index}", layer.weight.detach().cpu().numpy()))
        inits.append(_const(f"beta{index}", layer.bias.detach().cpu().numpy()))
        node = helper.make_node(
            "LayerNormalization", [x, f"g{index}", f"beta{index}"], [out], axis=-1, epsilon=layer.eps
        )
        return [node], out
    raise OnnxExportError(f"cannot export layer {index} ({type(layer).__name__})")


def to_onnx(model: nn.Module, spec: FeatureSpec, *, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize model + standardization as an ONNX graph: float32 raw features (N, F) -> logits (N,)."""
    n = len(spec.names)
    inits = [
        _const("mean", np.asarray(spec.mean)),
        _const("std", np.asarray(spec.std)),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), name="flat"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["x0"]),
    ]
    x = "x0"
    for index, layer in enumerate(_layers(model)):
        layer_nodes, x = _layer_nodes(layer, index, x, inits)
        nodes.extend(layer_nodes)
    nodes.append(helper.make_node("Reshape", [x, "flat"], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes,
        "fedfraud_scorer",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch"])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedfraud")
    proto.ir_version = IR_VERSION
    props = {"feature_names": ",".join(spec.names), "feature_version": spec.version, **(metadata or {})}
    helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def onnx_input_width(blob: bytes) -> int:
    """Number of feature columns an exported graph expects (checks that it is one of ours)."""
    proto = onnx.load_from_string(blob)
    inputs = [i for i in proto.graph.input if i.name == INPUT_NAME]
    outputs: Sequence[str] = [o.name for o in proto.graph.output]
    if len(inputs) != 1 or list(outputs) != [OUTPUT_NAME]:
        raise OnnxExportError(f"not a fedfraud scorer graph (inputs {[i.name for i in proto.graph.input]})")
    dims = inputs[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value)
