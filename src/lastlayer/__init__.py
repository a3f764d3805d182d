"""lastlayer: retrain the last layer of a pretrained image network on your own labelled photos.

The Python API, as the command line uses it::

    import lastlayer

    summary = lastlayer.retrain(
        "flower_photos",
        training=lastlayer.TrainingConfig(how_many_training_steps=500),
        outputs=lastlayer.OutputConfig(output_graph="model.onnx", output_labels="labels.txt"),
    )
    print(summary.metrics.test_accuracy)
    for prediction in lastlayer.label("model.onnx", ["photo.jpg"]):
        print(prediction.top[0])

Names are imported on first use, so ``import lastlayer`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lastlayer.version import __version__

if TYPE_CHECKING:
    from lastlayer.errors import (
        DataError,
        EngineError,
        KerberosError,
        LastlayerError,
        ModelError,
        StorageError,
        UsageError,
    )
    from lastlayer.model.inference import Prediction, RetrainedModel, label
    from lastlayer.pipeline import extract_shard, retrain
    from lastlayer.settings.options import RetrainOptions
    from lastlayer.settings.run import CacheConfig, EngineConfig, OutputConfig, TrainingConfig
    from lastlayer.summary import Metrics, RunSummary, ShardResult
    from lastlayer.transfer import UploadReport, upload

__all__ = [
    "CacheConfig",
    "DataError",
    "EngineConfig",
    "EngineError",
    "KerberosError",
    "LastlayerError",
    "Metrics",
    "ModelError",
    "OutputConfig",
    "Prediction",
    "RetrainOptions",
    "RetrainedModel",
    "RunSummary",
    "ShardResult",
    "StorageError",
    "TrainingConfig",
    "UploadReport",
    "UsageError",
    "__version__",
    "extract_shard",
    "label",
    "retrain",
    "upload",
]

#: the module that defines each public name (imported on first use)
_HOME = {
    name: module
    for module, names in {
        "lastlayer.pipeline": ("retrain", "extract_shard"),
        "lastlayer.model.inference": ("label", "Prediction", "RetrainedModel"),
        "lastlayer.transfer": ("upload", "UploadReport"),
        "lastlayer.settings.run": ("TrainingConfig", "CacheConfig", "OutputConfig", "EngineConfig"),
        "lastlayer.settings.options": ("RetrainOptions",),
        "lastlayer.summary": ("RunSummary", "ShardResult", "Metrics"),
        "lastlayer.errors": (
            "LastlayerError",
            "UsageError",
            "DataError",
            "ModelError",
            "StorageError",
            "KerberosError",
            "EngineError",
        ),
    }.items()
    for name in names
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lastlayer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
