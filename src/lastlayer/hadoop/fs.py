"""``hdfs://`` and ``viewfs://`` for fsspec with explicit credentials: hdfs-native's filesystems, adapted.

Why an adapter: hdfs-native's ``Client(url, config, config_dir, *, kerberos_principal,
kerberos_keytab, kerberos_cache)`` takes a login and a configuration folder per client, so two
logins can live in one process; but its fsspec filesystem (``hdfs_native.fsspec``) hands every
storage option to ``Client`` as a Hadoop ``config`` key, so through fsspec a client could only take
its identity from ``KRB5CCNAME`` and its configuration from ``HADOOP_CONF_DIR``: process-wide state.
These subclasses take the credentials and the folder as named storage options and pass the rest
(Hadoop keys such as ``dfs.replication``) on as ``config``. :func:`register` makes them fsspec's
``hdfs`` and ``viewfs`` (a :class:`~lastlayer.hadoop.HadoopLogin` does, and :mod:`lastlayer.storage`
before it opens such a URL), so URLs and storage options reach them unchanged; importing this module
changes nothing. Without those options they behave as hdfs-native's own.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from hdfs_native import Client
from hdfs_native.fsspec import HdfsFileSystem as _NativeHdfs


class HdfsFileSystem(_NativeHdfs):
    """hdfs-native's ``hdfs://`` filesystem, with the credentials and the configuration folder as
    named storage options (hdfs-native's own constructor gives every option to ``Client`` as config)."""

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *args: Any,
        kerberos_principal: str | None = None,
        kerberos_keytab: str | None = None,
        kerberos_cache: str | None = None,
        hadoop_conf_dir: str | None = None,
        **config: Any,
    ) -> None:
        """``host``/``port`` come from the URL (none: ``fs.defaultFS``); ``hadoop_conf_dir`` holds
        core-site.xml and hdfs-site.xml (none: ``HADOOP_CONF_DIR``); ``kerberos_*`` name the login
        (none: the default ticket cache); ``config`` are Hadoop keys and values."""
        AbstractFileSystem.__init__(  # hdfs-native's __init__ would build a Client of its own
            self,
            host,
            port,
            *args,
            kerberos_principal=kerberos_principal,
            kerberos_keytab=kerberos_keytab,
            kerberos_cache=kerberos_cache,
            hadoop_conf_dir=hadoop_conf_dir,
            **config,
        )
        self.host, self.port = host, port
        url = f"{self.protocol}://{host or ''}{f':{port}' if host and port else ''}"
        self.client = Client(
            url,
            {key: str(value) for key, value in config.items()},
            hadoop_conf_dir or None,
            kerberos_principal=kerberos_principal or None,
            kerberos_keytab=kerberos_keytab or None,
            kerberos_cache=kerberos_cache or None,
        )


class ViewfsFileSystem(HdfsFileSystem):
    """The same for ``viewfs://`` (a client-side mount table over several namespaces)."""

    protocol = "viewfs"


def register() -> None:
    """Make these fsspec's filesystems of ``hdfs://`` and ``viewfs://``, in place of its own entries
    (idempotent)."""
    fsspec.register_implementation("hdfs", HdfsFileSystem, clobber=True)
    fsspec.register_implementation("viewfs", ViewfsFileSystem, clobber=True)
