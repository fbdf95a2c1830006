"""Documents of local files, read with ``datasets``; every bad file gets a one-line message naming it.

Formats: ``.jsonl`` one record per line; ``.json`` a list of records, an object holding one list
of records, or columns (``{"text": [...]}``); ``.parquet`` a ``text`` / ``messages`` column;
``.txt`` the whole file is one document. Records carry a ``text`` string (or ``messages`` for
chat sets). Documents keep file order, then record order.

Text is UTF-8; a leading UTF-8 byte-order mark is dropped. UTF-16/UTF-32 files (byte-order mark
``FF FE`` / ``FE FF``) are refused with a hint to convert them: the readers ``datasets`` uses
(pyarrow's JSON and parquet readers) take UTF-8 only, and kvq does not transcode behind a user's
back. An empty file adds no documents. ``datasets`` reads the files (streaming, with a temporary
cache folder, so nothing is copied into or left in ``~/.cache``); when it fails, the stdlib
re-reads the one failing file to say which line or record is at fault (error path only).
"""

from __future__ import annotations

import glob
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvq.data.documents import Document, RecordError, record_document, unencodable_at
from kvq.errors import UsageError

FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_TO_UTF8 = "kvq reads UTF-8 text: convert the file (e.g. iconv -f LATIN1 -t UTF-8 IN > OUT) or fix that line"
_BATCH = 1000  # rows per batch taken from datasets


def read_files(files: list[Path], field: str = "text") -> list[Document]:
    """Documents of local files, in the order given (records in file order)."""
    docs: list[Document] = []
    for path in files:
        path = Path(path)
        suffix = _checked_suffix(path)
        if path.stat().st_size == 0:
            continue  # an empty file holds no records
        if suffix == ".parquet":
            docs.extend(_read_parquet(path, field))
        elif suffix == ".txt":
            docs.append(_read_text(path))
        else:
            docs.extend(_read_json(path, field))
    return docs


def _checked_suffix(path: Path) -> str:
    """The file's suffix, once it is known to be a readable regular file of a supported type."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"data file {path} is a broken symbolic link (to {path.readlink()})")
    if not path.exists():
        raise UsageError(f"data file {path} does not exist")
    if path.is_dir():
        raise UsageError(f"data file {path} is a folder", hint="pass the files inside it, or --dataset FOLDER")
    if not path.is_file():  # a FIFO, socket or device: opening it could block forever
        raise UsageError(f"data file {path} is not a regular file", hint="copy its contents into a file")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UsageError(f"data file {path}: unsupported type {suffix or '(no suffix)'}",
                         hint=f"use {', '.join(FILE_SUFFIXES)}")
    if suffix != ".parquet":
        try:
            with path.open("rb") as fh:
                head = fh.read(4)
        except OSError as exc:
            raise UsageError(f"data file {path} cannot be read ({exc.strerror or exc})") from exc
        for bom, name in _WIDE_BOMS:
            if head.startswith(bom):
                raise UsageError(f"data file {path} is {name} text; kvq reads UTF-8",
                                 hint=f"convert it: iconv -f {name} -t UTF-8 {path} > {path.stem}-utf8{suffix}")
    return suffix


def _load_rows(path: Path, builder: str, **config) -> list[dict[str, list]]:
    """Batches (column -> values) of one file read by ``datasets``, quietly, with a throw-away cache folder."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # kvq says what failed, in one line
    try:
        with tempfile.TemporaryDirectory(prefix="kvq-datasets-") as cache:
            ds = datasets.load_dataset(builder, data_files=[glob.escape(str(path.resolve()))], split="train",
                                       streaming=True, cache_dir=cache, **config)
            return list(ds.iter(batch_size=_BATCH))
    except StopIteration:  # what datasets raises for a file that holds no records (only whitespace)
        return []
    finally:
        datasets.logging.set_verbosity(level)


def _read_errors() -> tuple[type[Exception], ...]:
    """What reading a bad file raises: pyarrow's errors (ArrowInvalid is a ValueError, ArrowTypeError a
    TypeError), UnicodeDecodeError (a ValueError), OSError."""
    import pyarrow

    return ValueError, OSError, pyarrow.ArrowException


def _documents(batches: list[dict[str, list]], field: str, where: Callable[[int], str]) -> list[Document]:
    """Documents of each row; a row that is not a document is refused, named by ``where(row)``."""
    docs: list[Document] = []
    for batch in batches:
        columns = [c for c in ("text", "messages") if c in batch]
        for j in range(len(next(iter(batch.values()), []))):
            try:
                docs.append(record_document({c: batch[c][j] for c in columns}, field))
            except RecordError:
                try:  # again with every field, so that the message lists the keys the record has
                    record_document({c: batch[c][j] for c in batch}, field)
                except RecordError as exc:
                    raise UsageError(f"{where(len(docs))}: {exc}") from exc
    return docs


def _read_json(path: Path, field: str) -> list[Document]:
    jsonl = path.suffix.lower() == ".jsonl"
    where = (lambda row: f"{path}:{_line_of_row(path, row)}") if jsonl else (lambda row: f"{path}[{row}]")
    if not _starts_like_records(path, jsonl):
        problem = _json_problem(path, jsonl, field) or f"{path}: does not start with a JSON record"
        raise UsageError(problem, hint=_TO_UTF8 if "UTF-8" in problem else None)
    try:
        # Mixed types in a field are an error, not JSON-encoded strings (datasets' default would turn
        # every text into its JSON form when one record's text is a number).
        rows = _load_json_rows(path, jsonl, on_mixed_types=None)
    except _read_errors() as exc:
        problem = _json_problem(path, jsonl, field)
        if problem:
            raise UsageError(problem, hint=_TO_UTF8 if "UTF-8" in problem else None) from exc
        try:  # every record's text is a string: mixed types are in other fields, which kvq does not read
            rows = _load_json_rows(path, jsonl)
        except _read_errors() as again:
            raise UsageError(f"{path}: not readable as JSON records ({_first_line(again)})") from again
    if not rows:  # datasets drops records without any field ({}): say which, if any, is one
        problem = _json_problem(path, jsonl, field)
        if problem:
            raise UsageError(problem)
    return _documents(rows, field, where)


def _load_json_rows(path: Path, jsonl: bool, **config) -> list[dict[str, list]]:
    rows = _load_rows(path, "json", **config)
    inner = None if jsonl else _single_list_column(rows)
    if inner is not None:  # {"data": [records]} or {"text": [strings]}: the list is the records
        rows = _load_rows(path, "json", field=inner, **config)
    return rows


def _starts_like_records(path: Path, jsonl: bool, chunk: int = 1 << 16) -> bool:
    """True if the first JSON value starts an object (``.json``: or a list), or the file is only whitespace.

    Checked before pyarrow's JSON reader sees a file: it crashes the process (SIGSEGV, pyarrow 26)
    on a file whose values are all ``null``; a file whose first value is not a record is refused anyway.
    """
    with path.open("rb") as fh:
        head = fh.read(chunk).removeprefix(b"\xef\xbb\xbf")
        while head:
            first = head.lstrip(b" \t\r\n")[:1]
            if first:
                return first == b"{" or (not jsonl and first == b"[")
            head = fh.read(chunk)
    return True


def _single_list_column(rows: list[dict[str, list]]) -> str | None:
    """The column of a one-row table that holds the records as a list, if that is its shape."""
    if len(rows) != 1 or len(next(iter(rows[0].values()), [])) != 1:
        return None
    lists = [c for c, values in rows[0].items() if isinstance(values[0], list)]
    if "text" in lists:
        return "text"
    return lists[0] if len(lists) == 1 and not {"text", "messages"} & set(rows[0]) else None


def _read_parquet(path: Path, field: str) -> list[Document]:
    try:
        rows = _load_rows(path, "parquet")
    except _read_errors() as exc:  # a corrupt file, or not parquet at all
        raise UsageError(f"{path}: not a readable parquet file ({_first_line(exc)})") from exc
    columns = list(rows[0]) if rows else []
    if rows and not {"text", "messages"} & set(columns):
        raise UsageError(f"{path}: no '{field}' column; its columns: {', '.join(columns[:8])}")
    return _documents(rows, field, lambda row: f"{path} row {row}")


def _read_text(path: Path) -> Document:
    try:
        # "utf-8-sig" drops a leading byte-order mark; universal newlines, as Python's open() reads text.
        rows = _load_rows(path, "text", sample_by="document", encoding="utf-8-sig")
        text = "".join(t for batch in rows for t in batch["text"])
    except _read_errors() as exc:
        raise UsageError(_utf8_problem(path) or f"{path}: cannot be read as text ({_first_line(exc)})",
                         hint=_TO_UTF8) from exc
    if "\x00" in text:
        raise UsageError(f"{path}: holds NUL bytes: a binary file, not text",
                         hint="pass a UTF-8 text file (.txt), or records in .jsonl/.json/.parquet")
    return Document(text=text)


# --- the error path: name the line or record at fault ----------------------------------------


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _utf8_problem(path: Path) -> str | None:
    """Where a file is not UTF-8 (line and byte), or None if it is."""
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (f"{path}:{n}: not UTF-8 text (byte 0x{line[exc.start]:02X} at byte {exc.start + 1} of the "
                        f"line): a binary file, or another encoding such as Latin-1")
    return None


def _json_problem(path: Path, jsonl: bool, field: str) -> str | None:
    """The first thing wrong in a JSON file (not UTF-8, not JSON, not records, no text), named by line or record.

    Hand-written with the stdlib because pyarrow's errors name neither the line nor the record; it
    runs only once ``datasets`` has failed (or found nothing), so it costs nothing on good files.
    """
    problem = _utf8_problem(path)
    if problem:
        return problem
    text = path.read_text(encoding="utf-8-sig")
    if jsonl:
        records = ((f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        if not isinstance(data, list):
            return f"{path}: expected a list of records, got {type(data).__name__}"
        records = ((f"{path}[{i}]", json.dumps(r)) for i, r in enumerate(data))
    for where, record in records:
        try:
            value = json.loads(record)
        except json.JSONDecodeError as exc:
            return f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
        encoded = json.dumps(value, ensure_ascii=False)
        at = unencodable_at(encoded)
        if at is not None:
            return f"{where}: holds a lone surrogate {encoded[at]!r}, which is not valid Unicode (no tokenizer takes it)"
        try:
            record_document(value, field)
        except RecordError as exc:
            return f"{where}: {exc}"
    return None


def _line_of_row(path: Path, row: int) -> int:
    """The line number of a JSON-lines file's ``row``-th record (blank lines hold none)."""
    with path.open(encoding="utf-8-sig") as fh:
        seen = -1
        for n, line in enumerate(fh, 1):
            seen += bool(line.strip())
            if seen == row:
                return n
    return row + 1
