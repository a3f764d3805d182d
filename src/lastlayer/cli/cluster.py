"""The cluster flags (Kerberos login, Hadoop configuration) and ``auth-to-local`` on the command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from lastlayer.hadoop import ClusterConfig, HadoopLogin
from lastlayer.settings.options import AuthToLocalOptions, checked

#: What in-process clients can only read from the environment: MIT Kerberos' configuration file
#: (see :mod:`lastlayer.hadoop.login`). Everything else goes to them, and to Spark, explicitly.
IN_PROCESS_ENV = ("KRB5_CONFIG",)


@contextmanager
def connect(ns: argparse.Namespace) -> Iterator[HadoopLogin | None]:
    """The login of the cluster flags, entered before anything touches ``hdfs://``, with the part of
    its :meth:`~HadoopLogin.env` that in-process clients need (:data:`IN_PROCESS_ENV`) exported for
    the command and restored on exit. ``None`` when no cluster flag is given and no ticket cache is
    named (``KRB5CCNAME``): every client then keeps its own defaults."""
    config = checked(ns, ClusterConfig)
    if config == ClusterConfig() and "KRB5CCNAME" not in os.environ:
        yield None
        return
    with (
        HadoopLogin(config) as hadoop,
        _exported({k: v for k, v in hadoop.env().items() if k in IN_PROCESS_ENV}),
    ):
        yield hadoop


@contextmanager
def _exported(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` in ``os.environ`` for the duration, then the values from before."""
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def storage_options(hadoop: HadoopLogin | None) -> dict[str, Any] | None:
    """The login's storage options, ``None`` without a login."""
    return None if hadoop is None else hadoop.storage_options()


def auth_to_local(ns: argparse.Namespace, hadoop: HadoopLogin | None) -> int:
    from lastlayer import storage
    from lastlayer.hadoop import auth_to_local
    from lastlayer.hadoop.login import default_realm

    opts = checked(ns, AuthToLocalOptions)
    if opts.rules_base64:
        rules = auth_to_local.rules_from_base64(opts.rules_base64)
    elif opts.core_site:
        rules = auth_to_local.rules_from_core_site(storage.read_bytes(opts.core_site))
    else:
        rules = opts.rules
    realm = opts.default_realm or default_realm() or ns.principal.rpartition("@")[2]
    print(auth_to_local.short_name(ns.principal, rules, realm, opts.mechanism))
    return 0
