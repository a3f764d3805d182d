"""The cluster flags (Kerberos login, Hadoop configuration) and ``auth-to-local`` on the command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lastlayer.options import AuthToLocalOptions, ClusterOptions, from_namespace


@contextmanager
def connect(ns: argparse.Namespace) -> Iterator[Any]:
    """Hadoop configuration and Kerberos login, before anything touches ``hdfs://``; yields the login."""
    from lastlayer import hadoop, kerberos

    opts = from_namespace(ns, ClusterOptions)
    opts.validate()
    hadoop.configure(opts.hadoop_conf_dir, opts.hdfs_config_uri)
    if opts.principal:
        kerberos.login(opts.principal, opts.keytab, opts.krb5_conf or None)
    elif opts.krb5_conf:
        os.environ["KRB5_CONFIG"] = opts.krb5_conf
    yield None  # interim: the login is process-wide until lastlayer.hadoop lands


def auth_to_local(ns: argparse.Namespace, hadoop: Any) -> int:
    from lastlayer import auth_to_local, kerberos, storage

    opts = from_namespace(ns, AuthToLocalOptions)
    opts.validate()
    if opts.rules_base64:
        rules = auth_to_local.rules_from_base64(opts.rules_base64)
    elif opts.core_site:
        rules = auth_to_local.rules_from_core_site(storage.read_bytes(opts.core_site))
    else:
        rules = opts.rules
    realm = opts.default_realm or kerberos.default_realm() or ns.principal.rpartition("@")[2]
    print(auth_to_local.short_name(ns.principal, rules, realm, opts.mechanism))
    return 0
