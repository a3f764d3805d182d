"""Hadoop's XML configuration files (``core-site.xml``, ``hdfs-site.xml``), read safely.

:func:`read` reads a resource as Hadoop's ``Configuration`` does: ``<property>`` with ``<name>``
(trimmed), ``<value>`` (as written; an empty one sets nothing) and ``<final>``, or the same as
attributes; a later definition wins unless an earlier one was final. ``${...}`` variables are not
expanded. Entity declarations (the "billion laughs") and ``xi:include`` are refused; expat fetches no
external DTD.
"""

from __future__ import annotations

import xml.parsers.expat
from dataclasses import dataclass
from typing import NoReturn

from lastlayer.errors import DataError
from lastlayer.hadoop.java_regex import JAVA_TRIM


@dataclass(frozen=True)
class HadoopXml:
    """What a Hadoop XML resource holds.

    Attributes:
        root: the local name of the root element (``configuration`` for a Hadoop configuration).
        props: property name -> value, as Hadoop would use them.
    """

    root: str
    props: dict[str, str]


def read(data: bytes, what: str) -> HadoopXml:
    """The properties of the Hadoop XML resource ``data`` (called ``what`` in messages).

    Raises:
        DataError: not well-formed XML, entity declarations, or an ``xi:include``.
    """
    reader = _Reader(what)
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.characters
    parser.EntityDeclHandler = reader.refuse_entities
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        raise DataError(f"{what} is not well-formed XML: {exc}") from exc
    return HadoopXml(reader.root or "", reader.props)


class _Reader:
    """The event handling of Hadoop's ``Configuration.Parser`` (names are matched by local name)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.root: str | None = None
        self.props: dict[str, str] = {}
        self.finals: set[str] = set()
        self.token: list[str] = []
        self.parse_token = False
        self.name: str | None = None
        self.value: str | None = None
        self.final = False

    @staticmethod
    def _local(tag: str) -> str:
        return tag.rsplit(" ", 1)[-1]

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        local = self._local(tag)
        if self.root is None:
            self.root = local
        if local == "property":
            self.name, self.value, self.final = None, None, False
            for key, val in attrs.items():
                attr = self._local(key)
                if attr == "name":
                    self.name = val
                elif attr == "value":
                    self.value = val
                elif attr == "final":
                    self.final = val == "true"
        elif local in ("name", "value", "final", "source", "tag"):
            self.parse_token = True
            self.token = []
        elif local == "include" and any(self._local(k) == "href" for k in attrs):
            raise DataError(
                f"{self.what} includes another file (xi:include), which cannot be followed here: "
                "give the merged configuration"
            )

    def characters(self, data: str) -> None:
        if self.parse_token:
            self.token.append(data)

    def end(self, tag: str) -> None:
        local = self._local(tag)
        token = "".join(self.token)
        if local == "name" and token:
            self.name = token.strip(JAVA_TRIM)
        elif local == "value" and token:
            self.value = token
        elif local == "final":
            self.final = token == "true"
        elif local == "property" and self.name is not None:
            if self.value is not None and self.name not in self.finals:
                self.props[self.name] = self.value
            if self.final:
                self.finals.add(self.name)

    def refuse_entities(self, *_: object) -> NoReturn:
        raise DataError(f"{self.what} declares XML entities, which are not accepted")
