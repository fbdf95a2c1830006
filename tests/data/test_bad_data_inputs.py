"""Bad calibration/evaluation text: each is one line naming the file (and line or record), exit 2.

Oracles are hand-written: the bytes each test writes say which line is at fault; the tokenizer's own
behaviour on a lone surrogate is shown before kvq's refusal of it is checked.
"""

from __future__ import annotations

import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_input import MAX_LINE, assert_contract, run_in_process, snapshot

from kvq.data import Document, load_documents, read_files, select_samples
from kvq.errors import UsageError


def refused(call, *args) -> UsageError:
    """The UsageError ``call(*args)`` raises, checked to be one bounded line with its cause kept."""
    with pytest.raises(UsageError) as info:
        call(*args)
    err = info.value
    assert err.exit_code == 2
    assert "\n" not in err.message and len(err.message) <= MAX_LINE, err.message
    assert err.__cause__ is not None or not err.__suppress_context__  # never `raise ... from None`
    return err


# --- encodings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["blob.txt", "blob.jsonl", "blob.json"])
def test_binary_file_is_not_utf8_text(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # a PNG header: byte 0x89 on line 1
    err = refused(read_files, [path])
    assert f"{path}:1: not UTF-8 text (byte 0x89 at byte 1 of the line)" in err.message


def test_binary_that_is_valid_utf8_is_refused_as_text(tmp_path):
    path = tmp_path / "zeros.txt"
    path.write_bytes(b"\x00" * 64)
    assert f"{path}: holds NUL bytes: a binary file, not text" in refused(read_files, [path]).message


@pytest.mark.parametrize("name, body", [("u16.jsonl", '{"text": "hello"}\n'), ("u16.txt", "hello\n"),
                                        ("u16.json", '[{"text": "hello"}]')])
def test_utf16_with_bom_is_refused_with_a_conversion_hint(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(body.encode("utf-16"))  # Python writes a BOM (FF FE on little-endian machines)
    err = refused(read_files, [path])
    assert err.message == f"data file {path} is UTF-16 text; kvq reads UTF-8"
    assert err.hint.startswith(f"convert it: iconv -f UTF-16 -t UTF-8 {path}")


@pytest.mark.parametrize("name, body", [("bom.txt", "caf\u00e9 first\n"), ("bom.jsonl", '{"text": "caf\u00e9 first"}\n'),
                                        ("bom.json", '[{"text": "caf\u00e9 first"}, {"text": "second"}]')])
def test_utf8_with_bom_just_works(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    docs = read_files([path])
    assert docs[0].text.rstrip("\n") == "caf\u00e9 first"  # the BOM is gone, the accent kept
    assert "\ufeff" not in docs[0].text


@pytest.mark.parametrize("name, lines", [
    ("latin1.txt", [b"plain ascii", b"caf\xe9 au lait"]),
    ("latin1.jsonl", [b'{"text": "plain"}', b"", b'{"text": "caf\xe9"}']),
])
def test_latin1_bytes_name_the_line(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad_line = next(n for n, line in enumerate(lines, 1) if b"\xe9" in line)
    col = lines[bad_line - 1].index(b"\xe9") + 1
    err = refused(read_files, [path])
    assert f"{path}:{bad_line}: not UTF-8 text (byte 0xE9 at byte {col} of the line)" in err.message


# --- JSON structure ----------------------------------------------------------------------------


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')  # line 4 lacks its brace
    err = refused(read_files, [path])
    assert err.message.startswith(f"{path}:4: not valid JSON (")


@pytest.mark.parametrize("body, got", [('"just a string"', "str"), ("42", "int"), ("null", "NoneType")])
def test_json_that_is_not_records(tmp_path, body, got):
    path = tmp_path / "scalar.json"
    path.write_text(body)
    assert refused(read_files, [path]).message == f"{path}: expected a list of records, got {got}"


def test_record_without_text_names_its_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"body": "no text", "url": "u"}\n')  # the record is on line 4
    err = refused(read_files, [path])
    assert err.message == f"{path}:4: record has no 'text' (or 'messages') field; its keys: body, url"


def test_text_of_the_wrong_type_names_its_record(tmp_path):
    jsonl, js = tmp_path / "t.jsonl", tmp_path / "t.json"
    jsonl.write_text('{"text": "a"}\n{"text": 5}\n')
    js.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": ["x"]}]))
    assert refused(read_files, [jsonl]).message == f"{jsonl}:2: 'text' must be a string, got int"
    assert refused(read_files, [js]).message == f"{js}[2]: 'text' must be a string, got list"


def test_all_empty_documents(tmp_path):
    path = tmp_path / "empty-docs.jsonl"
    path.write_text('{"text": ""}\n{"text": "   \\n "}\n')
    err = refused(load_documents, "c4", [str(path)])
    assert err.message == f"data file {path}: no non-empty documents (2 records, all empty or whitespace)"


def test_an_empty_file_adds_no_documents(tmp_path):
    """Accepted: an empty file among others contributes nothing; alone, it is refused as above."""
    empty, full = tmp_path / "empty.jsonl", tmp_path / "full.jsonl"
    empty.write_bytes(b"")
    full.write_text('{"text": "x"}\n')
    assert load_documents("c4", [str(empty), str(full)]).documents == [Document(text="x")]
    assert "no non-empty documents (0 records" in refused(load_documents, "c4", [str(empty)]).message


# --- paths that are not readable files ---------------------------------------------------------


def test_folder_as_data_file(tmp_path):
    err = refused(read_files, [tmp_path])
    assert err.message == f"data file {tmp_path} is a folder"


def test_broken_symlink(tmp_path):
    link = tmp_path / "gone.jsonl"
    link.symlink_to(tmp_path / "deleted.jsonl")
    err = refused(read_files, [link])
    assert err.message == f"data file {link} is a broken symbolic link (to {tmp_path / 'deleted.jsonl'})"


def test_fifo_is_refused_without_blocking(tmp_path):
    """Unreadable without chmod (root reads any mode): a FIFO nobody writes to would block a reader."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    caught: list[BaseException] = []
    worker = threading.Thread(target=lambda: caught.extend(_raised(read_files, [fifo])), daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # unblock the reader so the thread can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert len(caught) == 1 and isinstance(caught[0], UsageError)
    assert caught[0].message == f"data file {fifo} is not a regular file"


def _raised(call, *args) -> list[BaseException]:
    try:
        call(*args)
    except Exception as exc:
        return [exc]
    return []


# --- strings the tokenizer rejects -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    import tiny_models
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models.tokenizer_dir())  # SmolLM2's own tokenizer


def test_lone_surrogate_in_a_json_string_names_the_line(tmp_path, tokenizer):
    text = json.loads('"a\\ud800b"')
    with pytest.raises(TypeError):  # what SmolLM2's fast tokenizer does with it: no useful message
        tokenizer(text)
    path = tmp_path / "sur.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')  # an escaped lone surrogate on line 2
    err = refused(read_files, [path])
    assert err.message.startswith(f"{path}:2: holds a lone surrogate '\\ud800', which is not valid Unicode")


def test_lone_surrogate_in_a_document_names_the_document(tokenizer):
    docs = [Document(text="fine text"), Document(text="x\ud800y")]
    err = refused(select_samples, docs, tokenizer, 2, 16, 0)
    assert err.message.startswith("document 2 of 2 holds a lone surrogate '\\ud800' at character 1")


# --- parquet -----------------------------------------------------------------------------------


def test_parquet_without_a_text_column(tmp_path):
    path = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), path)
    assert refused(read_files, [path]).message == f"{path}: no 'text' column; its columns: body, id"


def test_corrupt_parquet(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"]}), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut in half: no footer
    err = refused(read_files, [bad])
    assert err.message.startswith(f"{bad}: not a readable parquet file (")
    assert read_files([good]) == [Document(text="alpha"), Document(text="beta")]


# --- end to end through the CLI: exit 2, one line, --out untouched -----------------------------


def _bad_files(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "u16.jsonl").write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "notext.jsonl").write_text('{"body": "b"}\n')
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "surrogate.jsonl").write_text('{"text": "\\udfff"}\n')
    return {
        "folder.jsonl": "folder.jsonl is a folder",
        "blank.jsonl": "blank.jsonl: no non-empty documents (1 record, all empty or whitespace)",
        "surrogate.jsonl": "surrogate.jsonl:1: holds a lone surrogate '\\udfff'",
        "latin1.jsonl": "latin1.jsonl:2: not UTF-8 text",
        "u16.jsonl": "u16.jsonl is UTF-16 text",
        "broken.jsonl": "broken.jsonl:2: not valid JSON",
        "notext.jsonl": "notext.jsonl:1: record has no 'text'",
        "bad.parquet": "bad.parquet: not a readable parquet file",
    }


@pytest.mark.parametrize("out_state", ["absent", "good artifact"])
def test_calibrate_refuses_bad_data_and_leaves_out_alone(tmp_path, tiny_llama, capsys, out_state):
    cases = _bad_files(tmp_path)
    out = tmp_path / "out"
    common = ["--model", str(tiny_llama), "--device", "cpu", "--samples", "2", "--seqlen", "16", "--out", str(out)]
    if out_state == "good artifact":  # a real artifact from an earlier good run
        assert run_in_process(["calibrate", "--dataset", "pydoc", *common], capsys).code == 0
        assert (out / "scales.safetensors").is_file()
    before = snapshot(out)
    for name, expected in cases.items():
        argv = ["calibrate", "--dataset", "c4", "--data-files", str(tmp_path / name), *common]
        assert_contract(run_in_process(argv, capsys), 2, expected)
        assert snapshot(out) == before, name
