"""Calibration and evaluation data: sources (named sets, local files, built-in text) and sampling."""

from kvq.data.documents import Document, LoadedDataset
from kvq.data.local_files import FILE_SUFFIXES, read_files
from kvq.data.sampling import Batch, Samples, batches, encode_document, select_samples
from kvq.data.sources import DATASET_NAMES, NAMED_DATASETS, PYDOC, load_documents

__all__ = [
    "DATASET_NAMES",
    "FILE_SUFFIXES",
    "NAMED_DATASETS",
    "PYDOC",
    "Batch",
    "Document",
    "LoadedDataset",
    "Samples",
    "batches",
    "encode_document",
    "load_documents",
    "read_files",
    "select_samples",
]
