"""Hadoop and Kerberos: the explicit login, the client configuration, hdfs:// for fsspec, auth_to_local.

``login`` (:class:`HadoopLogin`, :class:`ClusterConfig`), ``config`` (core-site.xml and
hdfs-site.xml: a folder or a bounded download), ``fs`` (the ``hdfs://`` fsspec adapter taking
explicit credentials), ``auth_to_local`` (Hadoop's principal-to-user rules), ``conf_xml`` (the safe
Hadoop XML reader), ``java_regex`` (Java regexes as Python ``re``).
"""

from lastlayer.hadoop.login import ClusterConfig, HadoopLogin

__all__ = ["ClusterConfig", "HadoopLogin"]
