"""Datasets (the on-disk contract) and throughput-minded loaders."""

from facenet.data.dataset import DatasetSplit, load_dataset

__all__ = ["DatasetSplit", "load_dataset"]
