"""Seeded, documented selection of calibration samples.

1. Documents are shuffled with ``random.Random(seed)`` (a seed gives the same order everywhere).
2. Each document is encoded as the tokenizer encodes it, special tokens included (chat
   conversations are rendered with the model's chat template, whose text already carries them),
   and cut into consecutive chunks of at most ``seqlen`` tokens.
3. Samples are taken round-robin: the first chunk of every document in shuffled order, then the
   second chunk of every document long enough to have one, and so on, until ``samples`` are taken.
   So ``--samples N`` on a corpus of many documents calibrates on N different documents, and a
   file holding one document longer than ``seqlen`` with ``--samples 1`` calibrates on exactly its
   first ``seqlen`` tokens.
4. Empty documents are skipped. Samples shorter than ``seqlen`` are padded in their batch; padding
   never enters the statistics.

Text holding a lone surrogate (``"\\ud800"``, possible only in documents built in Python: files are
checked when read) is refused naming the document: SmolLM2's fast tokenizer would raise a bare
``TypeError`` on it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvq.data.documents import Document, unencodable_at
from kvq.errors import KvqError, UsageError


@dataclass
class Samples:
    """Token ids of each sample (lists of different lengths, each at most seqlen)."""

    token_ids: list[list[int]]
    documents_used: int
    documents_available: int

    @property
    def total_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def encode_document(doc: Document, tokenizer, where: str = "a document") -> list[int]:
    """Token ids of ``doc`` (chat conversations through the chat template); ``where`` names it in errors."""
    return encode_prefix(doc, tokenizer, None, where)[0]


CHARS_PER_TOKEN = 8  # a first guess of the text a token takes (English averages about 4); grown when short
MARGIN_TOKENS = 64  # tokens past the ones needed: where a cut text may tokenize differently, dropped


def encode_prefix(doc: Document, tokenizer, need: int | None, where: str = "a document") -> tuple[list[int], bool]:
    """(token ids, whether they are the whole document): at least the first ``need`` tokens of ``doc`` as the
    whole document encodes them (all of them for ``need`` None, or a document short enough).

    A long document is encoded a character prefix at a time, the prefix doubled until it holds ``need`` +
    :data:`MARGIN_TOKENS` tokens; the tokens of the margin, where the cut can change how text tokenizes (a
    word cut in two, an end-of-text token), are dropped. Work is bounded by the sample, not the document.
    """
    if doc.messages is not None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise KvqError("this dataset holds chat conversations but the model's tokenizer has no chat template",
                           hint="use a plain-text dataset (c4, wikitext2, pile, or files with a 'text' field)")
        text, special = tokenizer.apply_chat_template(list(doc.messages), tokenize=False), False
    else:
        text, special = doc.text, True
    _check_encodable(text, where)
    size = len(text) if need is None else (need + MARGIN_TOKENS) * CHARS_PER_TOKEN + 1024
    while size < len(text):
        ids = tokenizer(text[:size], add_special_tokens=special)["input_ids"]
        if len(ids) >= need + MARGIN_TOKENS:
            return list(ids[:need]), False
        size *= 2
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]), True


def _check_encodable(text: str, where: str) -> None:
    at = unencodable_at(text)
    if at is not None:
        raise UsageError(f"{where} holds a lone surrogate {text[at]!r} at character {at}, which is not valid "
                         "Unicode: the tokenizer cannot encode it", hint="fix or drop that text")


def select_samples(
    documents: list[Document], tokenizer, samples: int, seqlen: int, seed: int
) -> Samples:
    """Pick ``samples`` token sequences of at most ``seqlen`` tokens (see the module docstring)."""
    order = [i for i, d in enumerate(documents) if not d.is_empty]
    if not order:
        raise KvqError("the dataset holds no non-empty documents")
    random.Random(seed).shuffle(order)
    encoded: dict[int, tuple[list[int], bool]] = {}  # document -> (its first tokens, whether all of them)
    picked: list[list[int]] = []
    used: set[int] = set()
    chunk = 0
    while len(picked) < samples:
        took_any = False
        for i in order:
            need = (chunk + 1) * seqlen  # a document is encoded only as far as its next sample reaches
            if i not in encoded or (not encoded[i][1] and len(encoded[i][0]) < need):
                need = max(need, 2 * len(encoded[i][0])) if i in encoded else need  # growing: twice as far
                encoded[i] = encode_prefix(documents[i], tokenizer, need, f"document {i + 1} of {len(documents)}")
            ids = encoded[i][0]
            piece = ids[chunk * seqlen : (chunk + 1) * seqlen]
            if not piece:
                continue
            picked.append(piece)
            used.add(i)
            took_any = True
            if len(picked) == samples:
                break
        if not took_any:
            break  # every document is exhausted
        chunk += 1
    return Samples(picked, documents_used=len(used), documents_available=len(order))


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq) long
    attention_mask: torch.Tensor  # (batch, seq) long, 1 = real token, 0 = padding (right side)
    num_samples: int
    num_tokens: int


def batches(token_ids: list[list[int]], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Right-padded batches: real tokens keep positions 0..n-1, as without padding."""
    for start in range(0, len(token_ids), batch_size):
        group = token_ids[start : start + batch_size]
        width = max(len(t) for t in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # (batch, seq)
        mask = torch.zeros((len(group), width), dtype=torch.long)  # (batch, seq)
        for row, t in enumerate(group):
            ids[row, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[row, : len(t)] = 1
        yield Batch(ids, mask, len(group), sum(len(t) for t in group))
