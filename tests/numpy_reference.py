"""Plain-numpy MobileNetV2 and EfficientNet-Lite, straight from raw (un-folded) PyTorch state dicts.

Written independently of ``lastlayer.zoo.networks`` to check its ONNX graphs: batch norm is applied
explicitly, convolutions are im2col (``sliding_window_view``) plus ``einsum``, and TensorFlow "SAME"
padding follows TensorFlow's own formula. Everything runs in float64 on NCHW arrays; it is slow, so
tests feed it small images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

StateDict = Mapping[str, np.ndarray]


def conv2d(
    x: np.ndarray, w: np.ndarray, stride: int, pads: tuple[int, int, int, int], depthwise: bool = False
):
    """``x`` ``[N, C, H, W]``, ``w`` ``[O, C, k, k]`` (or ``[C, 1, k, k]`` when depthwise),
    ``pads`` (top, bottom, left, right)."""
    top, bottom, left, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    k = w.shape[2]
    cols = sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    if depthwise:
        return np.einsum("nchwij,cij->nchw", cols, w[:, 0].astype(np.float64), optimize=True)
    return np.einsum("nchwij,ocij->nohw", cols, w.astype(np.float64), optimize=True)


def batch_norm(x: np.ndarray, sd: StateDict, prefix: str, eps: float) -> np.ndarray:
    def channel(name: str) -> np.ndarray:
        return sd[f"{prefix}.{name}"].astype(np.float64)[None, :, None, None]

    return (x - channel("running_mean")) / np.sqrt(channel("running_var") + eps) * channel(
        "weight"
    ) + channel("bias")


def relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def linear(x: np.ndarray, sd: StateDict, prefix: str) -> np.ndarray:
    return x @ sd[f"{prefix}.weight"].astype(np.float64).T + sd[f"{prefix}.bias"]


def mobilenet_v2(sd: StateDict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision MobileNetV2: ``x`` ``[N, 3, S, S]`` -> (features ``[N, 1280]``, logits ``[N, 1000]``)."""
    eps = 1e-5

    def cbr(h: np.ndarray, conv: str, bn: str, stride: int = 1, act: bool = True, dw: bool = False):
        w = sd[f"{conv}.weight"]
        pad = (w.shape[2] - 1) // 2
        out = batch_norm(conv2d(h, w, stride, (pad, pad, pad, pad), depthwise=dw), sd, bn, eps)
        return relu6(out) if act else out

    h = cbr(x, "features.0.0", "features.0.1", stride=2)
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]
    settings.append((6, 320, 1, 1))
    block = 1
    for t, c, n, s in settings:
        for i in range(n):
            p = f"features.{block}.conv"
            mods = [f"{p}.{j}" for j in range(4 if t != 1 else 3)]
            y = h
            if t != 1:
                y = cbr(y, f"{mods.pop(0)}.0", f"{p}.0.1")
            dw = mods.pop(0)
            y = cbr(y, f"{dw}.0", f"{dw}.1", stride=s if i == 0 else 1, dw=True)
            y = cbr(y, mods[0], mods[1], act=False)
            assert y.shape[1] == c, f"{p}: {y.shape[1]} output channels, expected {c}"
            h = h + y if (i > 0 or s == 1) and h.shape == y.shape else y
            block += 1
    h = cbr(h, f"features.{block}.0", f"features.{block}.1")
    features = h.mean(axis=(2, 3))
    return features, linear(features, sd, "classifier.1")


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" rule: (before, after), the extra pixel after."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def efficientnet_lite(sd: StateDict, x: np.ndarray, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """EfficientNet-Lite (EfficientNet-PyTorch keys): ``x`` ``[N, 3, S, S]`` -> (features, logits)."""
    eps = 1e-3

    def cbr(h: np.ndarray, conv: str, bn: str, stride: int = 1, act: bool = True, dw: bool = False):
        w = sd[f"{conv}.weight"]
        before, after = tf_same_pads(h.shape[2], w.shape[2], stride)
        out = batch_norm(conv2d(h, w, stride, (before, after, before, after), depthwise=dw), sd, bn, eps)
        return relu6(out) if act else out

    h = cbr(x, "_conv_stem", "_bn0", stride=2)
    # (expansion, stride, repeats) per group; kernels and widths are read from the weights.
    groups = [(1, 1, 1), (6, 2, 2), (6, 2, 2), (6, 2, 3), (6, 1, 3), (6, 2, 4), (6, 1, 1)]
    block = 0
    for g, (expand, stride, repeats) in enumerate(groups):
        count = repeats if g in (0, len(groups) - 1) else math.ceil(repeats * depth)
        for i in range(count):
            p = f"_blocks.{block}"
            y = h
            if expand != 1:
                y = cbr(y, f"{p}._expand_conv", f"{p}._bn0")
            y = cbr(y, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride if i == 0 else 1, dw=True)
            y = cbr(y, f"{p}._project_conv", f"{p}._bn2", act=False)
            h = h + y if (i > 0 or stride == 1) and h.shape == y.shape else y
            block += 1
    assert f"_blocks.{block}._project_conv.weight" not in sd, "more blocks in the weights than expected"
    h = cbr(h, "_conv_head", "_bn1")
    features = h.mean(axis=(2, 3))
    return features, linear(features, sd, "_fc")
