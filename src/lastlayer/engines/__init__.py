"""Engines compute bottleneck features for the images the cache lacks.

An engine takes :class:`~lastlayer.engines.base.Task` s and yields
:class:`~lastlayer.engines.base.Result` s; the cache bookkeeping stays in :mod:`lastlayer.features`.
"""
