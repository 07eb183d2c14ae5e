"""Shared code of the label-efficient segmentation bundles: data, registration, losses, networks, evaluation."""

__version__ = "0.1.0"
