import json

import pytest

from kvq.data import PYDOC, Document, load_documents, read_files
from kvq.errors import KvqError, UsageError


def test_local_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "url": "u"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "three"}]))
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"text": "four"}]}))
    (tmp_path / "d.txt").write_text("five\nsix\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["seven", "eight"]}), tmp_path / "e.parquet")
    files = [tmp_path / n for n in ("a.jsonl", "b.json", "c.json", "d.txt", "e.parquet")]
    docs = read_files(files)
    assert [d.text for d in docs] == ["one", "two", "three", "four", "five\nsix\n", "seven", "eight"]


def test_chat_records_keep_messages(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "hi", "messages": msgs}) + "\n")
    ds = load_documents("ultrachat", [str(tmp_path / "chat.jsonl")])
    assert ds.documents == [Document(messages=tuple(msgs))]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("x.jsonl", '{"body": "no text"}\n', r"x.jsonl:1: record has no 'text' \(or 'messages'\) field; its keys: body"),
        ("x.jsonl", "{not json\n", r"x.jsonl:1: not valid JSON"),
        ("x.csv", "a,b\n", r"x.csv: unsupported type .csv"),
        ("x.json", '"just a string"', r"x.json: expected a list of records"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=expected):
        read_files([tmp_path / name])


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(UsageError, match="data file .*nope.jsonl does not exist"):
        load_documents("c4", [str(tmp_path / "nope.jsonl")])
    with pytest.raises(UsageError, match="unknown dataset 'c5'") as err:
        load_documents("c5")
    assert "c4, ultrachat, wikitext2, pile, pydoc" in err.value.hint


def test_named_dataset_offline_says_both_ways(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KVQ_DATA_DIR", raising=False)
    with pytest.raises(KvqError, match="dataset 'c4' .* the Hugging Face hub is unreachable") as err:
        load_documents("c4")
    assert "--data-files" in err.value.hint and "KVQ_DATA_DIR" in err.value.hint and "pydoc" in err.value.hint


def test_kvq_data_dir_gives_the_named_set(tmp_path, monkeypatch, shared_data):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "part.jsonl").write_text((shared_data / "c4-en-validation-sample.jsonl").read_text())
    (tmp_path / "wikitext2.txt").write_text("A wiki text.\n")
    monkeypatch.setenv("KVQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c4 = load_documents("c4")
    assert len(c4.documents) == 1350 and c4.origin == "KVQ_DATA_DIR"
    assert load_documents("wikitext2").documents == [Document(text="A wiki text.\n")]


def test_a_path_is_its_own_dataset(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"text": "alpha"}\n')
    assert load_documents(str(tmp_path / "mine.jsonl")).documents == [Document(text="alpha")]
    assert load_documents(str(tmp_path)).documents == [Document(text="alpha")]


def test_pydoc_is_always_there():
    ds = load_documents(PYDOC)
    assert len(ds.documents) > 50
    assert all(d.text for d in ds.documents)
