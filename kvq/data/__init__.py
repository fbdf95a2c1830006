"""Calibration and evaluation data: sources (named sets, local files, built-in text) and sampling."""

from kvq.data.sampling import Batch, Samples, batches, encode_document, select_samples
from kvq.data.sources import (
    DATASET_NAMES,
    NAMED_DATASETS,
    PYDOC,
    Document,
    LoadedDataset,
    hub_reachable,
    load_documents,
    read_files,
)

__all__ = [
    "DATASET_NAMES",
    "NAMED_DATASETS",
    "PYDOC",
    "Batch",
    "Document",
    "LoadedDataset",
    "Samples",
    "batches",
    "encode_document",
    "hub_reachable",
    "load_documents",
    "read_files",
    "select_samples",
]
