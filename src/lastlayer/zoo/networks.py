"""ONNX graphs of the zoo networks, built from their PyTorch state dicts.

Batch-norm is folded into the preceding convolution (weights and a bias), so a graph holds only
``Conv``, ``Clip`` (ReLU6), ``Add`` (residuals), ``GlobalAveragePool``, ``Flatten`` and ``Gemm``.
A core graph takes ``input``: float32 ``[N, 3, S, S]`` (already scaled) and returns ``features``:
float32 ``[N, 1280]`` (the pooled vector before the classifier) and ``logits``: float32 ``[N, 1000]``
(the ImageNet head). With ``blocks``, ``features`` also holds the average-pooled output of each block
group (``Concat``; 712 more values for MobileNetV2, 784 for EfficientNet-Lite0): the same pass, and
features that transfer better to images unlike ImageNet's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lastlayer.errors import ModelError
from lastlayer.model.contract import FEATURES, LOGITS

OPSET = 17
#: IR version 8 goes with opset 17 and is accepted by every onnxruntime this package supports.
IR_VERSION = 8

INPUT = "input"

StateDict = Mapping[str, np.ndarray]

#: torchvision MobileNetV2 inverted-residual settings: (expansion t, channels c, repeats n, stride s).
MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
MOBILENET_V2_BN_EPS = 1e-5


@dataclass(frozen=True)
class BlockGroup:
    """One EfficientNet block group before depth scaling; channel counts are read from the weights
    (Lite0 maps 32->16->24->40->80->112->192->320)."""

    expand: int
    kernel: int
    stride: int
    repeats: int


#: EfficientNet-B0 / Lite0 block groups.
EFFICIENTNET_GROUPS: tuple[BlockGroup, ...] = (
    BlockGroup(1, 3, 1, 1),
    BlockGroup(6, 3, 2, 2),
    BlockGroup(6, 5, 2, 2),
    BlockGroup(6, 3, 2, 3),
    BlockGroup(6, 5, 1, 3),
    BlockGroup(6, 5, 2, 4),
    BlockGroup(6, 3, 1, 1),
)
EFFICIENTNET_BN_EPS = 1e-3


def efficientnet_lite_layout(depth: float) -> list[tuple[int, int, int]]:
    """Per block ``(expansion, kernel, stride)`` for depth coefficient ``depth``.

    The first and last groups keep their repeat counts (Lite variant); the others repeat
    ``ceil(depth * n)`` times. The group stride applies to its first block.
    """
    layout = []
    last = len(EFFICIENTNET_GROUPS) - 1
    for i, group in enumerate(EFFICIENTNET_GROUPS):
        repeats = group.repeats if i in (0, last) else math.ceil(depth * group.repeats)
        for j in range(repeats):
            layout.append((group.expand, group.kernel, group.stride if j == 0 else 1))
    return layout


def fold_batch_norm(
    weight: np.ndarray, sd: StateDict, prefix: str, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fold the batch norm at ``prefix`` into conv ``weight`` ``[O, I, kh, kw]``.

    Returns:
        ``(weight, bias)`` as float32, ``[O, I, kh, kw]`` and ``[O]``, computed in float64.
    """
    gamma = _get(sd, f"{prefix}.weight", (weight.shape[0],)).astype(np.float64)
    beta = _get(sd, f"{prefix}.bias", (weight.shape[0],)).astype(np.float64)
    mean = _get(sd, f"{prefix}.running_mean", (weight.shape[0],)).astype(np.float64)
    var = _get(sd, f"{prefix}.running_var", (weight.shape[0],)).astype(np.float64)
    scale = gamma / np.sqrt(var + eps)
    folded = weight.astype(np.float64) * scale[:, None, None, None]
    return folded.astype(np.float32), (beta - mean * scale).astype(np.float32)


def _get(sd: StateDict, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    try:
        value = sd[key]
    except KeyError:
        raise ModelError(f"the weights have no tensor {key!r}: not the expected network") from None
    if shape is not None and value.shape != shape:
        raise ModelError(f"weight {key!r} has shape {value.shape}, expected {shape}")
    return value


def conv_weight(sd: StateDict, key: str) -> np.ndarray:
    """The square conv kernel ``[O, I, k, k]`` at ``key``."""
    weight = _get(sd, key)
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ModelError(f"weight {key!r} has shape {weight.shape}, expected a square 4-D conv kernel")
    return weight


def same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TensorFlow "SAME" padding for a square input of ``size`` px.

    Returns:
        ``([top, left, bottom, right], output size)``: the odd pixel goes at the bottom/right.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before = total // 2
    return [before, before, total - before, total - before], out


class _GraphBuilder:
    """Accumulates nodes and initializers of a feed-forward float32 graph built from a state dict."""

    def __init__(self, sd: StateDict, eps: float) -> None:
        self.sd = sd
        self.eps = eps
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._clip_bounds: tuple[str, str] | None = None

    def constant(self, name: str, value: np.ndarray) -> str:
        array = np.ascontiguousarray(value, dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def conv_bn(
        self,
        x: str,
        conv: str,
        bn: str,
        stride: int = 1,
        pads: list[int] | None = None,
        depthwise: bool = False,
        relu6: bool = True,
    ) -> str:
        """Conv ``{conv}.weight`` (``[O, I, k, k]``, or ``[C, 1, k, k]`` when ``depthwise``) with the batch
        norm at ``bn`` folded in, then ReLU6 when ``relu6``. ``pads``: ``[top, left, bottom, right]``, px."""
        weight, bias = fold_batch_norm(conv_weight(self.sd, f"{conv}.weight"), self.sd, bn, self.eps)
        k = int(weight.shape[2])
        groups = int(weight.shape[0]) if depthwise else 1
        out = f"{conv}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.constant(f"{conv}.weight", weight), self.constant(f"{conv}.bias", bias)],
                [out],
                name=conv,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=pads or [0, 0, 0, 0],
                group=groups,
            )
        )
        return self.relu6(out) if relu6 else out

    def relu6(self, x: str) -> str:
        """ReLU6 as ``Clip(x, 0, 6)``."""
        if self._clip_bounds is None:
            self._clip_bounds = (
                self.constant("relu6.min", np.array(0.0)),
                self.constant("relu6.max", np.array(6.0)),
            )
        out = f"{x}.relu6"
        self.nodes.append(helper.make_node("Clip", [x, *self._clip_bounds], [out], name=f"{x}/relu6"))
        return out

    def add(self, a: str, b: str, name: str) -> str:
        out = f"{name}.sum"
        self.nodes.append(helper.make_node("Add", [a, b], [out], name=f"{name}/residual"))
        return out

    def pool(self, x: str, name: str) -> str:
        """Global average pool of ``x`` ``[N, C, H, W]`` to ``[N, C]``."""
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [f"{name}.4d"], name=f"{name}/pool"))
        self.nodes.append(helper.make_node("Flatten", [f"{name}.4d"], [name], name=f"{name}/flatten", axis=1))
        return name

    def head(self, x: str, fc_weight: np.ndarray, fc_bias: np.ndarray, taps: list[str]) -> int:
        """Global average pool to ``features`` ``[N, C]`` (with the pooled ``taps`` after it, if any),
        then the classifier on the pooled ``x`` to ``logits``.

        Returns:
            The number of classes.
        """
        pooled = self.pool(x, "pooled" if taps else FEATURES)
        if taps:
            extra = [self.pool(t, f"{t}.pooled") for t in taps]
            self.nodes.append(helper.make_node("Concat", [pooled, *extra], [FEATURES], name="blocks", axis=1))
        w = self.constant("classifier.weight", fc_weight)
        b = self.constant("classifier.bias", fc_bias)
        self.nodes.append(helper.make_node("Gemm", [pooled, w, b], [LOGITS], name="classifier", transB=1))
        return int(fc_weight.shape[0])

    def model(self, name: str, size: int, feature_size: int, classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, size, size])],
            [
                helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", feature_size]),
                helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", classes]),
            ],
            initializer=self.initializers,
        )
        opsets = [helper.make_opsetid("", OPSET)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="lastlayer")
        model.ir_version = IR_VERSION
        return model


def _classifier(sd: StateDict, prefix: str, feature_size: int) -> tuple[np.ndarray, np.ndarray]:
    weight = _get(sd, f"{prefix}.weight")
    if weight.ndim != 2 or weight.shape[1] != feature_size:
        raise ModelError(
            f"classifier {prefix!r} has shape {weight.shape}; expected [classes, {feature_size}]"
        )
    return weight, _get(sd, f"{prefix}.bias", (weight.shape[0],))


def _check_no_more(sd: StateDict, prefix: str) -> None:
    """Refuse weights with tensors under ``prefix``: blocks beyond the ones this network has."""
    if any(key.startswith(prefix) for key in sd):
        raise ModelError(
            f"the weights have more blocks than this network ({prefix}*): not the expected depth"
        )


def mobilenet_v2(sd: StateDict, size: int, blocks: bool = False) -> onnx.ModelProto:
    """torchvision MobileNetV2 (width 1.0) at ``size`` px: symmetric padding, BN eps 1e-5, ReLU6;
    ``blocks``: each block group's pooled output in ``features`` too."""
    g = _GraphBuilder(sd, MOBILENET_V2_BN_EPS)
    taps: list[tuple[str, int]] = []
    x = g.conv_bn(INPUT, "features.0.0", "features.0.1", stride=2, pads=[1, 1, 1, 1])
    channels = conv_weight(sd, "features.0.0.weight").shape[0]
    index = 1
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        for j in range(n):
            stride = s if j == 0 else 1
            p = f"features.{index}.conv"
            block_in = x
            layer = 0
            if t != 1:
                x = g.conv_bn(x, f"{p}.0.0", f"{p}.0.1")
                layer = 1
            dw = conv_weight(sd, f"{p}.{layer}.0.weight")
            pad = (dw.shape[2] - 1) // 2
            x = g.conv_bn(x, f"{p}.{layer}.0", f"{p}.{layer}.1", stride, [pad] * 4, depthwise=True)
            x = g.conv_bn(x, f"{p}.{layer + 1}", f"{p}.{layer + 2}", relu6=False)
            project = conv_weight(sd, f"{p}.{layer + 1}.weight")
            if project.shape[0] != c or dw.shape[0] != channels * t:
                raise ModelError(
                    f"{p}: weights map {channels}->{dw.shape[0]}->{project.shape[0]} channels, "
                    f"expected {channels}->{channels * t}->{c}"
                )
            if stride == 1 and channels == c:
                x = g.add(block_in, x, f"features.{index}")
            channels = c
            index += 1
        taps.append((x, c))
    x = g.conv_bn(x, f"features.{index}.0", f"features.{index}.1")
    _check_no_more(sd, f"features.{index + 1}.")
    feature_size = conv_weight(sd, f"features.{index}.0.weight").shape[0]
    taps = taps if blocks else []
    classes = g.head(x, *_classifier(sd, "classifier.1", feature_size), [t for t, _ in taps])
    return g.model("mobilenet_v2", size, feature_size + sum(c for _, c in taps), classes)


def efficientnet_lite(sd: StateDict, size: int, depth: float, blocks: bool = False) -> onnx.ModelProto:
    """EfficientNet-Lite (EfficientNet-PyTorch layout) at ``size`` px with depth coefficient ``depth``.

    TensorFlow "SAME" padding (explicit pads for the fixed size), BN eps 1e-3, ReLU6, no
    squeeze-excite. Channel counts and kernel sizes come from the weights. ``blocks``: each block
    group's pooled output in ``features`` too.
    """
    g = _GraphBuilder(sd, EFFICIENTNET_BN_EPS)
    pads, spatial = same_pads(size, conv_weight(sd, "_conv_stem.weight").shape[2], 2)
    x = g.conv_bn(INPUT, "_conv_stem", "_bn0", stride=2, pads=pads)
    layout = efficientnet_lite_layout(depth)
    _check_no_more(sd, f"_blocks.{len(layout)}.")
    taps: list[tuple[str, int]] = []
    for i, (expand, kernel, stride) in enumerate(layout):
        p = f"_blocks.{i}"
        block_in = x
        has_expand = f"{p}._expand_conv.weight" in sd
        if has_expand != (expand != 1):
            found = "has" if has_expand else "lacks"
            raise ModelError(f"{p} {found} an expansion conv, but its expansion ratio is {expand}")
        if has_expand:
            x = g.conv_bn(x, f"{p}._expand_conv", f"{p}._bn0")
        dw = conv_weight(sd, f"{p}._depthwise_conv.weight")
        if dw.shape[1:] != (1, kernel, kernel):
            raise ModelError(f"{p}: depthwise kernel {dw.shape}, expected [C, 1, {kernel}, {kernel}]")
        pads, spatial = same_pads(spatial, kernel, stride)
        x = g.conv_bn(x, f"{p}._depthwise_conv", f"{p}._bn1", stride, pads, depthwise=True)
        x = g.conv_bn(x, f"{p}._project_conv", f"{p}._bn2", relu6=False)
        channels_in = conv_weight(sd, f"{p}._expand_conv.weight").shape[1] if has_expand else dw.shape[0]
        channels_out = conv_weight(sd, f"{p}._project_conv.weight").shape[0]
        if stride == 1 and channels_in == channels_out:
            x = g.add(block_in, x, p)
        if i + 1 == len(layout) or layout[i + 1][2] != 1 or layout[i + 1][:2] != (expand, kernel):
            taps.append((x, channels_out))  # a group ends where the next block's settings change
    x = g.conv_bn(x, "_conv_head", "_bn1")
    feature_size = conv_weight(sd, "_conv_head.weight").shape[0]
    taps = taps if blocks else []
    classes = g.head(x, *_classifier(sd, "_fc", feature_size), [t for t, _ in taps])
    return g.model("efficientnet_lite", size, feature_size + sum(c for _, c in taps), classes)
