"""Several feature networks as one: ``--architecture a+b+c`` concatenates their features, in order.

Each branch keeps its own cache folder (its model key), so a single-network cache is reused when the
network joins an ensemble, and its own preprocessing, so its features are the single network's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lastlayer.errors import UsageError
from lastlayer.zoo.catalog import is_user_model
from lastlayer.zoo.loader import FeatureModel, load_feature_model
from lastlayer.zoo.top import NONE

#: Joins the names of the networks of an ensemble in ``--architecture``.
SEPARATOR = "+"


@dataclass(frozen=True)
class Backbones:
    """One or more feature networks; a model's features are their features concatenated, in order.

    Attributes:
        models: the branches (at least one).
    """

    models: tuple[FeatureModel, ...]

    def __iter__(self) -> Iterator[FeatureModel]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def architecture(self) -> str:
        """The networks actually used, ``+``-joined."""
        return SEPARATOR.join(m.architecture for m in self.models)

    @property
    def feature_size(self) -> int:
        """Length of the concatenated feature vector."""
        return sum(m.feature_size for m in self.models)

    @property
    def key(self) -> str:
        """The single network's key, or a hex sha256 over the branches' keys."""
        if len(self.models) == 1:
            return self.models[0].key
        return hashlib.sha256(SEPARATOR.join(m.key for m in self.models).encode()).hexdigest()


def split_architecture(architecture: str) -> list[str]:
    """The network names of ``--architecture``: a path or URL is one name; otherwise ``+`` separates
    shipped networks.

    Raises:
        UsageError: an empty or repeated name, or a path/URL in an ensemble.
    """
    if is_user_model(architecture):
        return [architecture]
    names = [name.strip() for name in architecture.split(SEPARATOR)]
    if any(not name for name in names):
        raise UsageError(
            f"--architecture={architecture!r}: an empty name between '+' signs; join shipped networks "
            "as in mobilenet_v2_1.0_224+efficientnet_lite0"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"--architecture={architecture!r}: a network appears twice; name each once")
    return names


def load_backbones(
    architecture: str,
    model_dir: str,
    storage_options: Mapping[str, Any] | None = None,
    block_features: bool = False,
    train_top: str = NONE,
) -> Backbones:
    """The networks of ``--architecture`` (see :func:`split_architecture`), each loaded with
    :func:`~lastlayer.zoo.load_feature_model` (``block_features`` and ``train_top`` passed on).

    Raises:
        UsageError: a bad list, an unknown name, or an ensemble with ``--train_top=head``.
        ModelError, StorageError: as :func:`~lastlayer.zoo.load_feature_model`.
    """
    names = split_architecture(architecture)
    if train_top != NONE and len(names) > 1:
        raise UsageError(
            f"--train_top={train_top} trains one network's top: name one network in --architecture, "
            "or leave --train_top out for an ensemble"
        )
    return Backbones(
        tuple(
            load_feature_model(name, model_dir, storage_options, block_features, train_top) for name in names
        )
    )
