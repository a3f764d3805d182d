"""Cache keys: an image's content key, the 16-byte digests a store keeps of ``(content, variant)``
and of ``(path, stamp)``, the folder of a distortion setting and the random stream of a variant.

numpy and hashlib only (no pyarrow), so engines and their executors can test what is cached cheaply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lastlayer.preprocess import Distortions

#: Single additions kept in a dict before they are merged into a store's sorted arrays.
RECENT_MAX = 65536

#: A key digest (see :func:`key_digests`), a stamp digest and a content key, as numpy types.
KEY = np.dtype("V16")
STAMP = np.dtype("V16")
CONTENT = np.dtype("V32")

#: Hex digit (ASCII code) to its value; 255 for anything else.
_NIBBLE = np.full(256, 255, np.uint8)
for _digit in b"0123456789abcdef":
    _NIBBLE[_digit] = int(chr(_digit), 16)


# -- digests ----------------------------------------------------------------------------------
def content_bytes(contents: Sequence[str]) -> np.ndarray:
    """``uint8 [n, 32]``: the bytes of each SHA-256 hex content key.

    Raises:
        ValueError: a key is not 64 lower-case hex digits.
    """
    try:
        text = np.array(contents, dtype="S65").reshape(-1)
    except UnicodeEncodeError as exc:
        raise ValueError("a content key is not 64 hex digits") from exc
    chars = text.view(np.uint8).reshape(len(text), 65)
    nibbles = _NIBBLE[chars[:, :64]]
    if chars[:, 64].any() or (nibbles > 15).any():
        raise ValueError("a content key is not 64 hex digits")
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]


def key_digests(contents: Sequence[str], variants: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """``V16 [n]``: the digest of each ``(content, variant)`` key: the 32 bytes of the content key
    folded to 12 by XOR, then the variant as 4 big-endian bytes.

    Two of n keys share a digest with odds of about n² / 2⁹⁷ (10⁻¹⁴ for 6·10⁷ keys, ten million
    images with five variants each): exact in practice, with no Python object per key.
    """
    return fold_keys(content_bytes(contents), variants)


def fold_keys(raw: np.ndarray, variants: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """:func:`key_digests` of content keys given as bytes, ``uint8 [n, 32]`` or ``V32 [n]``."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, 32)
    out = np.zeros((len(raw), 16), np.uint8)
    out[:, :12] = raw[:, :12] ^ raw[:, 12:24]
    out[:, :8] ^= raw[:, 24:]
    number = np.ascontiguousarray(np.broadcast_to(np.asarray(variants, ">u4"), (len(raw),)))
    out[:, 12:] = number.view(np.uint8).reshape(-1, 4)
    return out.view(KEY).reshape(-1)


def lookup(keys: np.ndarray, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the sorted ``keys`` of ``probes`` (meaningless where missing), and where found."""
    if not len(keys):
        return np.zeros(len(probes), np.int64), np.zeros(len(probes), bool)
    at = np.minimum(np.searchsorted(keys, probes), len(keys) - 1)
    return at, keys[at] == probes


def errors_among(contents: np.ndarray, errors: Mapping[str, str]) -> np.ndarray:
    """``bool [n]``: which of the ``V32 [n]`` content keys have a cached decode error."""
    if not errors:
        return np.zeros(len(contents), bool)
    failed = {bytes.fromhex(c) for c in errors}
    return np.fromiter((c.tobytes() in failed for c in contents), bool, len(contents))


def key_digest(content: str, variant: int = 0) -> bytes:
    """The digest of one key: :func:`key_digests` of one key, in plain Python (numpy costs tens of
    microseconds per call, and the need test asks this for every image and variant).

    Raises:
        ValueError: ``content`` is not 64 hex digits.
    """
    raw = bytes.fromhex(content)
    if len(content) != 64:
        raise ValueError("a content key is not 64 hex digits")
    folded = int.from_bytes(raw[:12]) ^ int.from_bytes(raw[12:24]) ^ (int.from_bytes(raw[24:]) << 32)
    return folded.to_bytes(12) + variant.to_bytes(4)


def stamp_digest(path: str, stamp: str) -> bytes:
    """The first 16 bytes of the SHA-256 of ``path``, NUL, ``stamp``."""
    return hashlib.sha256(f"{path}\0{stamp}".encode()).digest()[:16]


def stamp_digests(paths: Sequence[str], stamps: Sequence[str]) -> np.ndarray:
    """``V16 [n]``: :func:`stamp_digest` of each path and stamp."""
    return np.frombuffer(b"".join(map(stamp_digest, paths, stamps)), STAMP)


class DigestMap:
    """Fixed-width digests to values: sorted arrays plus a dict of the latest single additions (merged
    in when it grows past :data:`RECENT_MAX` or an eighth of the arrays), so no Python object per entry
    lives for long and a lookup is a binary search.

    Attributes:
        keys: sorted digests (those merged so far).
        values: the value of each of :attr:`keys`.
        first: whether the first value given for a digest wins (else the last).
    """

    def __init__(self, width: int, value_dtype: np.dtype | str, first: bool) -> None:
        self.keys = np.zeros(0, f"V{width}")
        self.values = np.zeros(0, value_dtype)
        self.first = first
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._recent: dict[bytes, Any] = {}

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """:attr:`keys` and :attr:`values` with every addition merged in."""
        self._merge()
        return self.keys, self.values

    def put_many(self, digests: np.ndarray, values: np.ndarray) -> None:
        """Add ``digests`` with ``values`` (after everything added so far)."""
        self._spill()
        self._chunks.append((digests, np.asarray(values, self.values.dtype)))

    def put(self, digest: bytes, value: Any) -> None:
        """Add one digest (ignored when ``first`` and the digest is known)."""
        if self.first and self.get(digest) is not None:
            return
        self._recent[digest] = value
        if len(self._recent) > max(RECENT_MAX, len(self.keys) // 8):
            self._merge()

    def get(self, digest: bytes) -> Any:
        """The value of ``digest``, or ``None``."""
        if digest in self._recent:
            return self._recent[digest]
        if self._chunks:
            self._merge()
        probe = np.frombuffer(digest, self.keys.dtype)
        i = int(np.searchsorted(self.keys, probe)[0])
        return self.values[i] if i < len(self.keys) and self.keys[i].tobytes() == digest else None

    def get_many(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The values of ``digests`` (meaningless where missing) and ``bool`` whether each is present."""
        self._merge()
        if not len(self.keys):
            return np.zeros(len(digests), self.values.dtype), np.zeros(len(digests), bool)
        at, found = lookup(self.keys, digests)
        return self.values[at], found

    def set_many(self, digests: np.ndarray, values: np.ndarray) -> None:
        """Give the ``digests`` that are present these ``values`` (those absent are ignored)."""
        self._merge()
        at, found = lookup(self.keys, digests)
        self.values[at[found]] = np.asarray(values, self.values.dtype)[found]

    def _spill(self) -> None:
        if self._recent:
            keys = np.frombuffer(b"".join(self._recent), self.keys.dtype)
            self._chunks.append((keys, np.array(list(self._recent.values()), self.values.dtype)))
            self._recent = {}

    def _merge(self) -> None:
        """Sort everything added into the arrays; each intermediate array is let go as soon as it is
        used, so the peak is about twice the arrays."""
        self._spill()
        if not self._chunks:
            return
        parts, self._chunks = [(self.keys, self.values), *self._chunks], []
        keys = np.concatenate([k for k, _ in parts])
        values = np.concatenate([v for _, v in parts])
        del parts
        self.keys, self.values = np.zeros(0, self.keys.dtype), np.zeros(0, self.values.dtype)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        values = values[order]
        del order
        keep = np.ones(len(keys), bool)
        if self.first:
            keep[1:] = keys[1:] != keys[:-1]
        else:
            keep[:-1] = keys[:-1] != keys[1:]
        if keep.all():
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = keys[keep], values[keep]


@dataclass(frozen=True)
class CachedKeys:
    """What a :class:`FeatureStore` holds, without the features: a picklable copy of its lookups, for
    engines that decide on other machines what to compute (16 bytes per cached key).

    Attributes:
        digests: ``V16 [K]`` sorted digests of every cached ``(content, variant)``.
        errors: content key to decode error, for images that could not be decoded.
    """

    digests: np.ndarray
    errors: Mapping[str, str]

    @classmethod
    def empty(cls) -> CachedKeys:
        """Nothing cached."""
        return cls(np.zeros(0, KEY), {})

    def has(self, content: str, variant: int = 0) -> bool:
        """Whether ``(content, variant)`` is cached (as features or as a decode error)."""
        if content in self.errors:
            return True
        return bool(lookup(self.digests, np.frombuffer(key_digest(content, variant), KEY))[1][0])

    def has_many(self, contents: np.ndarray, variant: int = 0) -> np.ndarray:
        """:meth:`has` of each of the ``V32 [n]`` content keys: ``bool [n]``."""
        return lookup(self.digests, fold_keys(contents, variant))[1] | errors_among(contents, self.errors)

    def error(self, content: str) -> str | None:
        """Why this image could not be decoded, if that is what is cached."""
        return self.errors.get(content)

    def failed_many(self, contents: np.ndarray) -> np.ndarray:
        """``bool [n]``: which of the ``V32 [n]`` content keys have a cached decode error."""
        return errors_among(contents, self.errors)

    def keys(self) -> CachedKeys:
        """Itself: it is already a copy."""
        return self


class ContentKeys:
    """The content keys of N images, each known or not: 33 bytes per image, no Python string.

    Attributes:
        keys: ``V32 [N]`` the keys' bytes (meaningless where unknown).
        known: ``bool [N]`` whether each is known.
    """

    def __init__(self, keys: np.ndarray, known: np.ndarray) -> None:
        self.keys, self.known = keys, known

    def __len__(self) -> int:
        return len(self.known)

    def __getitem__(self, i: int) -> str | None:
        return self.keys[i].tobytes().hex() if self.known[i] else None

    def __setitem__(self, i: int, content: str | None) -> None:
        self.known[i] = content is not None
        if content is not None:
            self.keys[i] = np.frombuffer(bytes.fromhex(content), CONTENT)[0]

    def __iter__(self) -> Iterator[str | None]:
        return (self[i] for i in range(len(self)))


def content_key(data: bytes) -> str:
    """The cache key of an image's bytes (SHA-256 hex)."""
    return hashlib.sha256(data).hexdigest()


def variant_rng(content: str, distortions: Distortions, variant: int) -> np.random.Generator:
    """The random stream of one distorted variant: fixed by the image, the distortions and the number,
    so the cache holds the same variants whichever engine or run computed them."""
    digest = hashlib.sha256(f"{content}|{distortions.to_json()}|{variant}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def distortion_key(distortions: Distortions) -> str:
    """Name of the cache folder of one distortion setting."""
    return "distorted-" + hashlib.sha256(distortions.to_json().encode()).hexdigest()[:16]
