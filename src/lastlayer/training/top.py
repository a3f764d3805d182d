"""``--train_top=head``: the network's head convolution trained together with a softmax, in numpy, on
the cached activations that enter it (:mod:`lastlayer.zoo.top`); then the rest of the run goes on
with the trained head's features.

Forward, per image: activations ``A`` ``[P, C_in]`` (P = 49 positions, C_in = 320), ``Z = A Wᵀ + b``
``[P, C_out]`` (the 1x1 convolution as a matmul over positions), ``H = clip(Z, 0, 6)`` (ReLU6), the
mean over positions ``[C_out]``, the frozen block features after it, standardized (the statistics
of the ImageNet head's features on the training images, fixed while training), then the softmax.
The gradients are written out by hand (a finite-difference test checks them) and Adam updates both
layers, with the run's steps, batch size, learning rate and batches (the same seeded draws as the
last layer's, so only the rows the run gathered are read).

Afterwards :func:`derive` writes the trained head's features of every cached row to a temporary
folder, part for part, so evaluation, the trust stage and the final softmax (fitted again on them,
as on any features) run unchanged; :func:`exported` puts the trained weights into the network the
model carries. One step costs two matmuls of ``2 · B · P · C_in · C_out`` flops (8 GFLOP at B = 100)
and a few element-wise passes over ``B · P · C_out`` values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from lastlayer import storage
from lastlayer.bottlenecks.parts import FeatureSource, Row, UnreadablePart, encode_rows, unpack
from lastlayer.errors import DataError, UsageError
from lastlayer.training.train import (
    Standardizer,
    TrainConfig,
    batch_positions,
    softmax_cross_entropy,
    truncated_normal,
)
from lastlayer.zoo import Backbones
from lastlayer.zoo.top import HeadConv, with_head

if TYPE_CHECKING:
    from lastlayer.bottlenecks.needs import Bottlenecks

log = logging.getLogger("lastlayer.retrain")

#: The head's learning rate relative to ``--learning_rate`` (measured: docs/benchmarks.md, "--train_top").
HEAD_LR_SCALE = 1.0
#: Adam's decay rates and epsilon (Kingma & Ba's defaults).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: Images whose features are computed at once (``B·P·C_out`` float32: 32 MB at 128).
CHUNK = 128
#: Second word of the seed of the stream that picks a drawn image's variant while the top trains.
TOP_STREAM = 3
#: Content key of the rows of a derived part (read by location, never looked up by key).
_NO_KEY = "0" * 64


@dataclass
class TopNet:
    """The trainable top: the head convolution and the softmax on standardized features.

    Attributes:
        head: the network's head (shapes, block feature count; its ImageNet weights are the start).
        weight, bias: the head convolution, ``[C_out, C_in]`` and ``[C_out]``.
        softmax_weight, softmax_bias: ``[D, C]`` and ``[C]``, D = C_out + blocks, on standardized features.
        scaler: the standardization of the ``D`` features (fixed).
    """

    head: HeadConv
    weight: np.ndarray
    bias: np.ndarray
    softmax_weight: np.ndarray
    softmax_bias: np.ndarray
    scaler: Standardizer

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cached rows ``[n, C_in·P + blocks]`` → activations ``[n·P, C_in]`` (position-major) and
        block features ``[n, blocks]``."""
        n, head = len(x), self.head
        acts = x[:, : head.activations].reshape(n, head.channels, head.positions).transpose(0, 2, 1)
        return acts.reshape(n * head.positions, head.channels), x[:, head.activations :]

    def features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The trained head's features of cached rows ``x``: ``[n, D]`` (pooled head output, then the
        block features), with the activations ``[n·P, C_in]`` and where ReLU6 passes gradients
        (``bool [n·P, C_out]``: 0 ≤ pre-activation ≤ 6)."""
        acts, blocks = self.split(x)
        z = acts @ self.weight.T
        z += self.bias
        h = np.clip(z, 0, 6)
        pooled = h.reshape(len(x), self.head.positions, -1).mean(axis=1)
        passes = np.equal(h, z, out=np.empty(z.shape, bool))  # 0 <= z <= 6, in one pass
        return np.hstack([pooled, blocks]), acts, passes

    def loss(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy of rows ``x`` with classes ``y`` ``[n]``, and its gradient with respect
        to each parameter (by name: ``weight``, ``bias``, ``softmax_weight``, ``softmax_bias``)."""
        g, acts, passes = self.features(x)
        s = self.scaler(g)
        probs, loss = softmax_cross_entropy(s @ self.softmax_weight + self.softmax_bias, y)
        probs[np.arange(len(y)), y] -= 1.0
        dlogits = probs / len(y)
        c_out = self.weight.shape[0]
        dpooled = (dlogits @ self.softmax_weight.T)[:, :c_out] * self.scaler.scale[:c_out]
        per_position = (dpooled / self.head.positions)[:, None, :]
        dz = np.multiply(passes.reshape(len(x), self.head.positions, -1), per_position, dtype=dpooled.dtype)
        dz = dz.reshape(len(x) * self.head.positions, -1)
        grads = {
            "weight": dz.T @ acts,
            "bias": dz.sum(axis=0),
            "softmax_weight": s.T @ dlogits,
            "softmax_bias": dlogits.sum(axis=0),
        }
        return loss, grads


class Adam:
    """Adam (Kingma & Ba) over named arrays, updated in place, each with its own learning rate."""

    def __init__(self, params: dict[str, np.ndarray], rates: dict[str, float]) -> None:
        self.params, self.rates, self.t = params, rates, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        """One update with ``grads`` (same names and shapes as the parameters)."""
        b1, b2 = ADAM_BETAS
        self.t += 1
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1**self.t)
            v_hat = self.v[k] / (1 - b2**self.t)
            self.params[k] -= (self.rates[k] * m_hat / (np.sqrt(v_hat) + ADAM_EPS)).astype(
                self.params[k].dtype
            )


def features_of(net: TopNet, x: np.ndarray) -> np.ndarray:
    """``float32 [n, D]``: :meth:`TopNet.features` of rows ``x``, :data:`CHUNK` rows at a time."""
    if not len(x):
        return np.zeros((0, net.weight.shape[0] + net.head.blocks), np.float32)
    return np.vstack([net.features(x[i : i + CHUNK])[0] for i in range(0, len(x), CHUNK)])


def _scaler(
    net: TopNet, rows: Callable[[np.ndarray], np.ndarray], n: int, blocks: Standardizer
) -> Standardizer:
    """The standardization of the ImageNet head's pooled features (their mean and spread over the ``n``
    training images, one row each) and of the block features (``blocks``, the run's statistics)."""
    pooled = np.vstack([features_of(net, rows(np.arange(i, min(i + CHUNK, n)))) for i in range(0, n, CHUNK)])
    head = Standardizer.of(pooled[:, : net.weight.shape[0]])
    at = net.head.activations
    return Standardizer(
        np.concatenate([head.mean, blocks.mean[at:]]), np.concatenate([head.scale, blocks.scale[at:]])
    )


def train_top(
    head: HeadConv,
    train_x: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    train_y: np.ndarray,
    n_classes: int,
    config: TrainConfig,
    standardizer: Standardizer,
    head_lr_scale: float = HEAD_LR_SCALE,
) -> TopNet:
    """Train the head convolution and a softmax together on the cached rows.

    Args:
        head: the network's head, its ImageNet weights the start.
        train_x: given positions ``[B]`` into the training set and a generator, their cached rows
            ``float32 [B, C_in·P + blocks]`` (a variant each with distortions on).
        train_y: ``int64 [N_train]`` classes.
        config: steps, batch size, learning rate and seed (the last layer's).
        standardizer: the rows' statistics on the training images (used for the block features).
        head_lr_scale: the head's learning rate relative to ``config.learning_rate``.

    Raises:
        DataError: training diverged.
    """
    started = time.perf_counter()
    rng = np.random.default_rng([config.seed, TOP_STREAM])
    net = TopNet(head, head.weight.copy(), head.bias.copy(), np.zeros(0), np.zeros(0), standardizer)
    net.scaler = _scaler(net, lambda pos: train_x(pos, rng), len(train_y), standardizer)
    dim = head.weight.shape[0] + head.blocks
    net.softmax_weight = truncated_normal(rng, 0.001, (dim, n_classes))
    net.softmax_bias = np.zeros(n_classes, np.float32)
    params = {k: getattr(net, k) for k in ("weight", "bias", "softmax_weight", "softmax_bias")}
    lr = config.learning_rate
    adam = Adam(
        params,
        {"weight": lr * head_lr_scale, "bias": lr * head_lr_scale, "softmax_weight": lr, "softmax_bias": lr},
    )
    next_batch = batch_positions(train_y, n_classes, config)
    loss = float("nan")
    for _ in range(config.steps):
        positions = next_batch()
        loss, grads = net.loss(train_x(positions, rng), train_y[positions])
        adam.step(grads)
    if not all(np.isfinite(p).all() for p in params.values()):
        raise DataError(
            f"training the head diverged with --learning_rate={lr:g}: lower --learning_rate, or leave "
            "--train_top out; no model was written"
        )
    log.info(
        "Trained the head convolution (%d x %d) with the softmax: %d steps in %.1f s, last batch's "
        "cross entropy %f",
        *head.weight.shape,
        config.steps,
        time.perf_counter() - started,
        loss,
    )
    return net


def derive(bottlenecks: Bottlenecks, net: TopNet, folder: str) -> Bottlenecks:
    """The same bottlenecks with the trained head's features (``D`` floats per row) in place of the
    cached activations: each part the rows are in, transformed and written to ``folder`` with its
    rows in place (so every location still holds)."""
    sources = tuple(
        _derived(s, bottlenecks.plain[:, 0], net, storage.join(folder, "plain")) for s in bottlenecks.sources
    )
    variants = tuple(
        _derived(s, bottlenecks.variants[:, 0], net, storage.join(folder, "variants"))
        for s in bottlenecks.variant_sources
    )
    return replace(bottlenecks, sources=sources, variant_sources=variants)


def _derived(source: FeatureSource, locations: np.ndarray, net: TopNet, folder: str) -> FeatureSource:
    dim = net.weight.shape[0] + net.head.blocks
    parts = set(unpack(locations[locations >= 0])[0].tolist())
    names: list[str | None] = [None] * len(source.names)
    for part in sorted(parts):
        try:
            derived = features_of(net, source.read(part))
        except UnreadablePart as exc:
            raise DataError(
                f"{exc} while --train_top read it: another run changed the cache; run again"
            ) from exc
        name, data = encode_rows([Row(_NO_KEY, 0, "", None, row, None) for row in derived], dim)
        storage.write_atomic(storage.join(folder, name), data)
        names[part] = name
    return FeatureSource(folder, dim, tuple(names))


def exported(network: Backbones, net: TopNet) -> Backbones:
    """The network the model carries, with the trained head convolution's weights in place.

    Raises:
        UsageError: the network has no trainable head (``--quantize_output_graph`` swapped in its int8
            version).
    """
    (model,) = network.models
    if model.head is None or model.whole is None:
        raise UsageError(
            f"--train_top=head: the exported network {model.architecture} has no trained head in it "
            "(--quantize_output_graph gives int8 networks): leave --quantize_output_graph out"
        )
    trained = with_head(model.whole.onnx_bytes, model.head, net.weight, net.bias)
    return Backbones((replace(model.whole, onnx_bytes=trained),))
