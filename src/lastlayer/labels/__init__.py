"""The labels file: images, their labels, splits and groups read from a table instead of class folders."""

from lastlayer.labels.images import image_set, read_labels

__all__ = ["image_set", "read_labels"]
