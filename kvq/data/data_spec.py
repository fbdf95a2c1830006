"""Which text a run reads: a named set or local path, and the local files holding a named set."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataSpec:
    """The data flags every command that reads text shares (``--dataset``, ``--data-files``); the documents
    come from :func:`kvq.data.load_documents`."""

    dataset: str = "pydoc"  # c4, ultrachat, wikitext2, pile, pydoc, or a path to local files
    data_files: list[str] | None = field(default=None)  # local files holding the named set (offline)
