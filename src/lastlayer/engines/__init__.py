"""Engines compute bottleneck features for the images the cache lacks.

Every engine implements :class:`~lastlayer.engines.base.Engine`: it takes
:class:`~lastlayer.engines.base.Task` s and yields :class:`~lastlayer.engines.base.Result` s; the
cache bookkeeping stays in :mod:`lastlayer.bottlenecks.needs`, the per-batch work both engines share
in :mod:`lastlayer.engines.batch`. :data:`~lastlayer.settings.run.KNOWN_ENGINES` is the one registry
the ``--engine`` choices come from; an engine's module is imported when a run makes that engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lastlayer.settings.run import KNOWN_ENGINES

if TYPE_CHECKING:
    from lastlayer.engines.base import Engine
    from lastlayer.settings.run import EngineConfig


def engine_class(name: str) -> type[Engine]:
    """The class of the engine ``--engine`` ``name`` (one of :data:`~lastlayer.settings.run.ENGINE_NAMES`),
    its module imported now."""
    module, _, cls = KNOWN_ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(
    config: EngineConfig,
    storage_options: Mapping[str, Any] | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> Engine:
    """The engine ``config.engine`` names, set up from ``config``.

    Raises:
        UsageError: the engine cannot run here (e.g. pyspark is not installed).
    """
    return engine_class(config.engine).from_config(config, storage_options, spark_conf or {})
