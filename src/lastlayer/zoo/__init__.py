"""The model zoo: pretrained feature extractors as ONNX graphs, built from PyTorch weights without torch.

``load_feature_model(architecture, model_dir)`` resolves a name (a zoo network, a codelab name
substituted with a warning, or the path/URL of a user ONNX model) and returns a :class:`FeatureModel`
whose ONNX graph takes ``image``: uint8 RGB ``[N, S, S, 3]`` and returns ``features``: float32
``[N, D]`` (zoo networks also return ImageNet ``logits``: float32 ``[N, 1000]``);
``load_backbones("a+b", model_dir)`` loads several, whose features are concatenated.
"""

from lastlayer.zoo.backbones import Backbones, load_backbones
from lastlayer.zoo.catalog import DEFAULT_ARCHITECTURE, ZOO, ZooEntry, resolve
from lastlayer.zoo.graph import attach_preprocessing
from lastlayer.zoo.loader import FeatureModel, load_feature_model

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "ZOO",
    "Backbones",
    "FeatureModel",
    "ZooEntry",
    "attach_preprocessing",
    "load_backbones",
    "load_feature_model",
    "resolve",
]
