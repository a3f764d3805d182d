"""Engines compute bottleneck features for the images the cache lacks.

Every engine implements :class:`~lastlayer.engines.base.Engine`: it takes
:class:`~lastlayer.engines.base.Task` s and yields :class:`~lastlayer.engines.base.Result` s; the
cache bookkeeping stays in :mod:`lastlayer.bottlenecks.needs`. :data:`ENGINES` is the one registry the
``--engine`` choices come from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lastlayer.engines.base import Engine
from lastlayer.engines.local import LocalEngine
from lastlayer.engines.spark import SparkEngine

if TYPE_CHECKING:
    from lastlayer.config import EngineConfig

#: ``--engine`` name to engine class.
ENGINES: dict[str, type[Engine]] = {engine.name: engine for engine in (LocalEngine, SparkEngine)}
ENGINE_NAMES = tuple(ENGINES)


def make_engine(
    config: EngineConfig,
    storage_options: Mapping[str, Any] | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> Engine:
    """The engine ``config.engine`` names, set up from ``config``.

    Raises:
        UsageError: the engine cannot run here (e.g. pyspark is not installed).
    """
    return ENGINES[config.engine].from_config(config, storage_options, spark_conf or {})
