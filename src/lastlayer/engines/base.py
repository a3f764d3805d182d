"""What every engine takes and gives back."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lastlayer.preprocess import Distortions


@dataclass(frozen=True)
class Task:
    """One image to look at.

    Attributes:
        index: position of the image in the image set.
        url: where to read it.
        relpath: its path relative to image_dir.
        stamp: ``"<size>:<mtime>"`` as listed, or ``None``.
        training: whether distorted variants may be wanted for it.
    """

    index: int
    url: str
    relpath: str
    stamp: str | None
    training: bool


@dataclass(frozen=True)
class Need:
    """What is still missing for one image: plain features and/or distorted variant numbers."""

    plain: bool
    variants: tuple[int, ...] = ()

    @property
    def nothing(self) -> bool:
        """Whether the cache already has everything."""
        return not self.plain and not self.variants


#: Given a task and the content key of its bytes, what must be computed.
NeedFn = Callable[[Task, str], Need]


@dataclass
class Result:
    """What an engine found for one task.

    Attributes:
        task: the task.
        content: SHA-256 hex of the image bytes.
        plain: ``float32 [D]`` plain features, when they were needed and the image decoded.
        variants: distorted variant number to ``float32 [D]``.
        error: why the image could not be decoded, or ``None``.
    """

    task: Task
    content: str
    plain: np.ndarray | None = None
    variants: dict[int, np.ndarray] = field(default_factory=dict)
    error: str | None = None


def content_key(data: bytes) -> str:
    """The cache key of an image's bytes (SHA-256 hex)."""
    return hashlib.sha256(data).hexdigest()


def variant_rng(content: str, distortions: Distortions, variant: int) -> np.random.Generator:
    """The random stream of one distorted variant: fixed by the image, the distortions and the number,
    so the cache holds the same variants whichever engine or run computed them."""
    digest = hashlib.sha256(f"{content}|{distortions.to_json()}|{variant}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))
