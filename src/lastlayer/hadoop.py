"""Hadoop client configuration for ``hdfs://`` URLs.

hdfs-native reads ``core-site.xml`` and ``hdfs-site.xml`` from ``HADOOP_CONF_DIR``. They come from an
existing folder, or are downloaded from a configuration endpoint (the walkthrough's
``hdfs.config_uri``: the base URL under which both files are served) into a private folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.request

from lastlayer import storage
from lastlayer.errors import StorageError

log = logging.getLogger(__name__)

CONFIG_FILES = ("core-site.xml", "hdfs-site.xml")
DOWNLOAD_TIMEOUT_S = 30.0


def _fetch(url: str) -> bytes:
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise StorageError(f"cannot download {url}: {exc} (check the HDFS configuration URI)") from exc
    return storage.read_bytes(url)


def download_config(config_uri: str) -> str:
    """Download ``core-site.xml`` and ``hdfs-site.xml`` from ``config_uri`` into a private folder.

    Returns:
        The folder, to use as ``HADOOP_CONF_DIR``.
    """
    folder = tempfile.mkdtemp(prefix="lastlayer-hadoop-conf-")  # created 0700
    for name in CONFIG_FILES:
        data = _fetch(storage.join(config_uri, name))
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    log.info("Hadoop configuration downloaded from %s", config_uri)
    return folder


def configure(conf_dir: str = "", config_uri: str = "") -> str | None:
    """Point ``HADOOP_CONF_DIR`` at ``conf_dir``, or at the files downloaded from ``config_uri``.

    Returns:
        The configuration folder in use, or ``None`` when neither is given and none is set.
    """
    if config_uri:
        conf_dir = download_config(config_uri)
    if conf_dir:
        missing = [n for n in CONFIG_FILES if not os.path.isfile(os.path.join(conf_dir, n))]
        if missing:
            raise StorageError(f"Hadoop configuration folder {conf_dir} lacks {', '.join(missing)}")
        os.environ["HADOOP_CONF_DIR"] = conf_dir
    return os.environ.get("HADOOP_CONF_DIR")
