"""A document (plain text or a chat conversation) and the check that turns one record into one."""

from __future__ import annotations

from dataclasses import dataclass


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
class LoadedDataset:
    """The documents of a dataset and what was read: hub path and split, "local files", or the pydoc module."""

    name: str
    documents: list[Document]
    origin: str
    files: tuple[str, ...] = ()


class RecordError(ValueError):
    """A record that is not a document; the caller adds where it is (file and line, or row)."""


def record_document(record: object, field: str) -> Document:
    """The document a record holds: its ``text`` string, or its ``messages`` list when ``field`` asks for them.

    A record holding both gives what ``field`` names; one holding only the other gives that one.
    ``None`` values count as absent (columnar readers fill a field missing from a record with None).
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object per record, got {type(record).__name__}")
    present = {k: v for k, v in record.items() if v is not None}
    if "messages" in present and (field == "messages" or "text" not in present):
        msgs = present["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise RecordError("'messages' must be a list of {role, content} objects")
        return Document(messages=tuple(msgs))
    if "text" in present:
        text = present["text"]
        if not isinstance(text, str):
            raise RecordError(f"'text' must be a string, got {type(text).__name__}")
        return Document(text=text)
    keys = ", ".join(sorted(present)[:8]) or "none"
    raise RecordError(f"record has no 'text' (or 'messages') field; its keys: {keys}")


def unencodable_at(text: str) -> int | None:
    """None if ``text`` is valid Unicode; else the index of its first lone surrogate (no tokenizer takes one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None
