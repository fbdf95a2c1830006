"""Where calibration and evaluation text comes from: named datasets, local files, built-in text.

Named datasets load from the Hugging Face hub through ``datasets`` (its cache first when
``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` is set). Offline, the same set comes from local
files, given with ``--data-files`` or found in the folder named by ``$KVQ_DATA_DIR``
(``$KVQ_DATA_DIR/<name>/*`` or ``$KVQ_DATA_DIR/<name>.<ext>``); kvq does not probe the network
itself: it tries the hub load and, when ``datasets`` reports no connection or offline mode, stops
with one line that says both local ways. ``pydoc`` (CPython's own documentation topics, shipped
with every Python) is always present: the offline quick start, never a silent substitute for a set
the user named. Local files: see :mod:`kvq.data.local_files`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvq.data.documents import Document, LoadedDataset, RecordError, record_document
from kvq.data.local_files import FILE_SUFFIXES, read_files
from kvq.errors import KvqError, UsageError

Purpose = Literal["calibration", "evaluation"]


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


# --- local folders ------------------------------------------------------------------------------


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


def _load_hub(spec: DatasetSpec, purpose: Purpose) -> LoadedDataset:
    src = spec.calibration if purpose == "calibration" else spec.evaluation
    offline_hint = (
        f"offline, pass --data-files FILE (jsonl/json/txt/parquet) or set KVQ_DATA_DIR=FOLDER holding "
        f"{spec.name}/ or {spec.name}.jsonl; or use --dataset {PYDOC} for the built-in offline text"
    )
    import datasets
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = {"split": src.split}
    if src.data_files:
        kwargs["data_files"] = {src.split: src.data_files}
    try:
        ds = datasets.load_dataset(src.path, src.config, **kwargs)
    except (ConnectionError, LocalEntryNotFoundError) as exc:  # no network, or offline mode and not cached
        why = "offline mode is set and it is not cached" if datasets.config.HF_HUB_OFFLINE else "no connection"
        raise KvqError(f"dataset {spec.name!r} ({src.path}) cannot be loaded: the Hugging Face hub is unreachable "
                       f"({why})", hint=offline_hint) from exc
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KvqError(f"dataset {spec.name!r} ({src.path}) could not be loaded: {first}", hint=offline_hint) from exc
    origin = f"hf://{src.path}" + (f"/{src.config}" if src.config else "") + f" split={src.split}"
    if src.data_files:
        origin += f" files={src.data_files}"
    if spec.join_rows:
        return LoadedDataset(spec.name, [Document(text="\n\n".join(ds["text"]))], origin)
    docs = []
    for i, record in enumerate(ds):
        try:
            docs.append(record_document(record, spec.field))
        except RecordError as exc:
            raise KvqError(f"dataset {spec.name!r}: {src.path}[{i}]: {exc}") from exc
    return LoadedDataset(spec.name, docs, origin)


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(text=topics[key]) for key in sorted(topics)]


def _from_files(name: str, files: list[Path], field: str, origin: str) -> LoadedDataset:
    """The documents of local files; refused if none of them holds any text."""
    docs = read_files(files, field)
    if all(d.is_empty for d in docs):
        what = f"data file {files[0]}" if len(files) == 1 else f"the {len(files)} data files ({files[0]}, ...)"
        records = f"{len(docs)} record" + ("" if len(docs) == 1 else "s")
        raise UsageError(f"{what}: no non-empty documents ({records}, all empty or whitespace)",
                         hint="pass files whose records hold text")
    return LoadedDataset(name, docs, origin, tuple(map(str, files)))


def load_documents(
    dataset: str, data_files: list[str] | None = None, purpose: Purpose = "calibration"
) -> LoadedDataset:
    """Documents of ``dataset`` (a name or a path) for calibration or evaluation.

    Order: ``--data-files`` if given; else for a named set ``$KVQ_DATA_DIR``, then the hub.
    """
    spec = NAMED_DATASETS.get(dataset)
    field = spec.field if spec else "text"
    if data_files:
        return _from_files(dataset, [Path(f) for f in data_files], field, "local files")
    if dataset == PYDOC:
        return LoadedDataset(PYDOC, _pydoc_documents(), "pydoc_data.topics (CPython documentation)")
    if spec is not None:
        local = _local_files_for(spec.name)
        if local:
            return _from_files(spec.name, local, field, "KVQ_DATA_DIR")
        return _load_hub(spec, purpose)
    path = Path(dataset)
    if path.is_dir():
        files = _files_in(path)
        if not files:
            raise UsageError(f"dataset folder {path} holds no {'/'.join(FILE_SUFFIXES)} files")
        return _from_files(str(path), files, field, "local files")
    if path.exists() or path.is_symlink():  # a file; read_files says what is wrong if it is not a regular one
        return _from_files(str(path), [path], field, "local files")
    raise UsageError(
        f"unknown dataset {dataset!r}: not a named dataset and no such file or folder",
        hint=f"named datasets: {', '.join(DATASET_NAMES)}; or give a path to jsonl/json/txt/parquet files",
    )
