"""The Hadoop client configuration: ``core-site.xml`` and ``hdfs-site.xml`` in one folder.

The files come from an existing folder, or are downloaded from a base URL (the walkthrough's
``hdfs.config_uri``, under which both are served) through the bounded :func:`lastlayer.fetch.fetch`
into a private folder. Each file must be a Hadoop XML ``<configuration>`` (read safely by
:mod:`lastlayer.hadoop.conf_xml`) before anything uses it.
"""

from __future__ import annotations

import logging
import os

from lastlayer import storage
from lastlayer.errors import DataError, StorageError
from lastlayer.fetch import Limits, fetch, shown
from lastlayer.hadoop import conf_xml

log = logging.getLogger(__name__)

CONFIG_FILES = ("core-site.xml", "hdfs-site.xml")


def check(data: bytes, name: str, source: str) -> dict[str, str]:
    """The properties of ``data``, the ``name`` file read from ``source``.

    Raises:
        DataError: not a Hadoop XML ``<configuration>`` (e.g. an HTML error page).
    """
    try:
        parsed = conf_xml.read(data, name)
    except DataError as exc:
        raise DataError(f"{source}: {exc} (it must be Hadoop's {name})") from exc
    if parsed.root != "configuration":
        raise DataError(
            f"{source}: {name} is not a Hadoop configuration: its root element is <{parsed.root}>, not "
            "<configuration> (check that it is Hadoop's client configuration)"
        )
    return parsed.props


def read_folder(conf_dir: str) -> dict[str, str]:
    """The properties of the configuration in ``conf_dir``, ``hdfs-site.xml`` over ``core-site.xml``.

    Raises:
        StorageError: a file is missing or unreadable.
        DataError: a file is not a Hadoop ``<configuration>``.
    """
    missing = [n for n in CONFIG_FILES if not os.path.isfile(os.path.join(conf_dir, n))]
    if missing:
        raise StorageError(f"Hadoop configuration folder {conf_dir} lacks {', '.join(missing)}")
    props: dict[str, str] = {}
    for name in CONFIG_FILES:
        path = os.path.join(conf_dir, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc} (check its permissions)") from exc
        props.update(check(data, name, path))
    return props


def download(base_url: str, into: str, limits: Limits) -> dict[str, str]:
    """Download both files from ``base_url`` into the folder ``into``, each checked before it lands;
    their properties, as :func:`read_folder` gives them.

    Raises:
        StorageError: unreachable, refused, missing or too slow (naming ``limits.seconds_setting``).
        DataError: larger than ``limits.max_bytes`` (naming its setting), or not a configuration.
    """
    props: dict[str, str] = {}
    for name in CONFIG_FILES:
        url = storage.join(base_url, name)
        data = fetch(url, limits, what=name)
        props.update(check(data, name, shown(url)))
        storage.write_atomic(os.path.join(into, name), data)
    log.info("Hadoop configuration downloaded from %s", shown(base_url))
    return props
