"""Where calibration and evaluation text comes from: named datasets, local files, built-in text.

Named datasets load from the Hugging Face hub through ``datasets`` when a network exists. Offline,
the same set comes from local files, given with ``--data-files`` or found in the folder named by
``$KVQ_DATA_DIR`` (``$KVQ_DATA_DIR/<name>/*`` or ``$KVQ_DATA_DIR/<name>.<ext>``). With neither, the
error says both ways. ``pydoc`` (CPython's own documentation topics, shipped with every Python) is
always present: the offline quick start, never a silent substitute for a set the user named.

Files: ``.jsonl`` / ``.json`` records with a ``text`` field (or ``messages`` for chat sets),
``.txt`` (the whole file is one document), ``.parquet`` (a ``text`` or ``messages`` column).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from kvq.errors import KvqError, UsageError

Purpose = Literal["calibration", "evaluation"]
FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


@dataclass(frozen=True)
class Document:
    """One document: plain text, or a chat conversation to render with the model's chat template."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None

    @property
    def is_empty(self) -> bool:
        if self.messages is not None:
            return not any(str(m.get("content", "")).strip() for m in self.messages)
        return not (self.text or "").strip()


@dataclass(frozen=True)
class HubSource:
    path: str
    config: str | None
    split: str
    data_files: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its hub source per purpose, and the record field holding its text."""

    name: str
    description: str
    calibration: HubSource
    evaluation: HubSource
    field: Literal["text", "messages"] = "text"
    join_rows: bool = False  # rows are lines of one long text (WikiText): join them into one document


C4 = DatasetSpec(
    name="c4",
    description="allenai/c4 en, validation shard 0 (evaluation: shard 1, disjoint)",
    calibration=HubSource("allenai/c4", None, "validation", "en/c4-validation.00000-of-00008.json.gz"),
    evaluation=HubSource("allenai/c4", None, "validation", "en/c4-validation.00001-of-00008.json.gz"),
)
ULTRACHAT = DatasetSpec(
    name="ultrachat",
    description="HuggingFaceH4/ultrachat_200k train_sft (evaluation: test_sft), rendered with the chat template",
    calibration=HubSource("HuggingFaceH4/ultrachat_200k", None, "train_sft"),
    evaluation=HubSource("HuggingFaceH4/ultrachat_200k", None, "test_sft"),
    field="messages",
)
WIKITEXT2 = DatasetSpec(
    name="wikitext2",
    description="wikitext-2-raw-v1, train split (evaluation: test split), rows joined with blank lines",
    calibration=HubSource("wikitext", "wikitext-2-raw-v1", "train"),
    evaluation=HubSource("wikitext", "wikitext-2-raw-v1", "test"),
    join_rows=True,
)
PILE = DatasetSpec(
    name="pile",
    description="the Pile validation set (mit-han-lab/pile-val-backup)",
    calibration=HubSource("mit-han-lab/pile-val-backup", None, "validation"),
    evaluation=HubSource("mit-han-lab/pile-val-backup", None, "validation"),
)
NAMED_DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (C4, ULTRACHAT, WIKITEXT2, PILE)}
PYDOC = "pydoc"
DATASET_NAMES: tuple[str, ...] = (*NAMED_DATASETS, PYDOC)


@dataclass(frozen=True)
class LoadedDataset:
    name: str
    documents: list[Document]
    origin: str  # what was read: hub path and split, file list, or the pydoc module
    files: tuple[str, ...] = ()


# --- local files -----------------------------------------------------------------------------


def _record_document(record: object, where: str, field: str) -> Document:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object per record, got {type(record).__name__}")
    if field == "messages" and "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise UsageError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        return Document(messages=tuple(msgs))
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise UsageError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        return Document(text=text)
    if "messages" in record:
        return _record_document(record, where, "messages")
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise UsageError(f"{where}: record has no 'text' (or 'messages') field; its keys: {keys}")


def _read_jsonl(path: Path, field: str) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            docs.append(_record_document(record, f"{path}:{n}", field))
    return docs


def _read_json(path: Path, field: str) -> list[Document]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "text" in data and isinstance(data["text"], list):  # columnar: {"text": [...]}
            return [Document(text=str(t)) for t in data["text"]]
        if len(lists) != 1:
            raise UsageError(f"{path}: expected a list of records (or an object holding one list of them)")
        data = lists[0]
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a list of records, got {type(data).__name__}")
    return [_record_document(r, f"{path}[{i}]", field) for i, r in enumerate(data)]


def _read_parquet(path: Path, field: str) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise UsageError(f"{path}: not a readable parquet file ({exc})") from None
    columns = table.column_names
    column = field if field in columns else ("text" if "text" in columns else None)
    if column is None:
        raise UsageError(f"{path}: no '{field}' column; its columns: {', '.join(columns[:8])}")
    return [_record_document({column: v}, f"{path}[{i}]", field) for i, v in enumerate(table.column(column).to_pylist())]


def read_files(files: list[Path], field: str = "text") -> list[Document]:
    """Documents of local files, in the order given (records in file order)."""
    docs: list[Document] = []
    for path in files:
        if not path.exists():
            raise UsageError(f"data file {path} does not exist")
        if path.is_dir():
            raise UsageError(f"data file {path} is a folder", hint="pass the files inside it, or --dataset FOLDER")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs.extend(_read_jsonl(path, field))
        elif suffix == ".json":
            docs.extend(_read_json(path, field))
        elif suffix == ".txt":
            docs.append(Document(text=path.read_text(encoding="utf-8")))
        elif suffix == ".parquet":
            docs.extend(_read_parquet(path, field))
        else:
            raise UsageError(
                f"data file {path}: unsupported type {suffix or '(no suffix)'}",
                hint=f"use {', '.join(FILE_SUFFIXES)}",
            )
    return docs


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)


def _local_files_for(name: str) -> list[Path]:
    root = os.environ.get("KVQ_DATA_DIR")
    if not root:
        return []
    folder = Path(root)
    if (folder / name).is_dir():
        return _files_in(folder / name)
    return [folder / f"{name}{s}" for s in FILE_SUFFIXES if (folder / f"{name}{s}").is_file()]


# --- hub ---------------------------------------------------------------------------------------


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host cannot be reached quickly."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(spec: DatasetSpec, purpose: Purpose) -> LoadedDataset:
    src = spec.calibration if purpose == "calibration" else spec.evaluation
    offline_hint = (
        f"offline, pass --data-files FILE (jsonl/json/txt/parquet) or set KVQ_DATA_DIR=FOLDER holding "
        f"{spec.name}/ or {spec.name}.jsonl; or use --dataset {PYDOC} for the built-in offline text"
    )
    if not hub_reachable():
        raise KvqError(f"dataset {spec.name!r} ({src.path}) cannot be loaded: the Hugging Face hub is unreachable",
                       hint=offline_hint)
    import datasets

    kwargs = {"split": src.split}
    if src.data_files:
        kwargs["data_files"] = {src.split: src.data_files}
    try:
        ds = datasets.load_dataset(src.path, src.config, **kwargs)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise KvqError(f"dataset {spec.name!r} ({src.path}) could not be loaded: {str(exc).splitlines()[0]}",
                       hint=offline_hint) from None
    origin = f"hf://{src.path}" + (f"/{src.config}" if src.config else "") + f" split={src.split}"
    if src.data_files:
        origin += f" files={src.data_files}"
    if spec.join_rows:
        return LoadedDataset(spec.name, [Document(text="\n\n".join(ds["text"]))], origin)
    return LoadedDataset(
        spec.name, [_record_document(r, f"{src.path}[{i}]", spec.field) for i, r in enumerate(ds)], origin
    )


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(text=topics[key]) for key in sorted(topics)]


def load_documents(
    dataset: str, data_files: list[str] | None = None, purpose: Purpose = "calibration"
) -> LoadedDataset:
    """Documents of ``dataset`` (a name or a path) for calibration or evaluation.

    Order: ``--data-files`` if given; else for a named set ``$KVQ_DATA_DIR``, then the hub.
    """
    spec = NAMED_DATASETS.get(dataset)
    field = spec.field if spec else "text"
    if data_files:
        files = [Path(f) for f in data_files]
        return LoadedDataset(dataset, read_files(files, field), "local files", tuple(map(str, files)))
    if dataset == PYDOC:
        return LoadedDataset(PYDOC, _pydoc_documents(), "pydoc_data.topics (CPython documentation)")
    if spec is not None:
        local = _local_files_for(spec.name)
        if local:
            return LoadedDataset(spec.name, read_files(local, field), "KVQ_DATA_DIR", tuple(map(str, local)))
        return _load_hub(spec, purpose)
    path = Path(dataset)
    if path.is_dir():
        files = _files_in(path)
        if not files:
            raise UsageError(f"dataset folder {path} holds no {'/'.join(FILE_SUFFIXES)} files")
        return LoadedDataset(str(path), read_files(files), "local files", tuple(map(str, files)))
    if path.is_file():
        return LoadedDataset(str(path), read_files([path]), "local files", (str(path),))
    raise UsageError(
        f"unknown dataset {dataset!r}: not a named dataset and no such file or folder",
        hint=f"named datasets: {', '.join(DATASET_NAMES)}; or give a path to jsonl/json/txt/parquet files",
    )
