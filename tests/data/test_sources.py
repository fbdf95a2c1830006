import json
import os
import subprocess
import sys

import pytest
from bad_input import assert_contract, run_subprocess, snapshot

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


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as the libraries read it at import (they are imported already), an empty cache."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    monkeypatch.delenv("KVQ_DATA_DIR", raising=False)


def test_named_dataset_offline_says_both_ways(hub_offline):
    with pytest.raises(KvqError, match=r"dataset 'c4' \(allenai/c4\) cannot be loaded: the Hugging Face hub is "
                                       r"unreachable \(offline mode is set and it is not cached\)") as err:
        load_documents("c4")
    assert err.value.exit_code == 1
    assert "--data-files" in err.value.hint and "KVQ_DATA_DIR" in err.value.hint and "pydoc" in err.value.hint
    assert isinstance(err.value.__cause__, ConnectionError)  # datasets' own error, kept for KVQ_DEBUG=1


def _no_hub_env(tmp_path, **extra):
    return {"KVQ_DATA_DIR": "", "HF_HOME": str(tmp_path / "hf-home"), **extra}


def test_offline_mode_through_the_cli(tmp_path, tiny_llama):
    """HF_HUB_OFFLINE=1 in a fresh process, as a user sets it: exit 1, one line, both ways to get data."""
    out = tmp_path / "out"
    outcome = run_subprocess(["calibrate", "--model", str(tiny_llama), "--device", "cpu", "--dataset", "c4",
                              "--out", str(out)], env=_no_hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    line = assert_contract(outcome, 1, "dataset 'c4' (allenai/c4) cannot be loaded: the Hugging Face hub is "
                                       "unreachable (offline mode is set and it is not cached)")
    hint = outcome.stderr.strip().splitlines()[-1]
    assert line != hint and "--data-files" in hint and "KVQ_DATA_DIR" in hint
    assert snapshot(out) is None


def test_no_connection_is_the_libraries_error_not_a_probe(tmp_path):
    """No offline flag and a hub that refuses connections: datasets retries (about 20 s), then kvq's line.

    The endpoint is a closed local port, so the test means the same on a machine with a network.
    """
    code = ("from kvq.data import load_documents\n"
            "try:\n    load_documents('wikitext2', purpose='evaluation')\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc.exit_code, '|', exc.message, '|', type(exc.__cause__).__name__)\n")
    env = {**os.environ, **_no_hub_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_DATASETS_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip() == ("KvqError 1 | dataset 'wikitext2' (wikitext) cannot be loaded: the Hugging Face "
                                   "hub is unreachable (no connection) | ConnectionError"), proc.stderr[-2000:]


def test_kvq_data_dir_gives_the_named_set(tmp_path, monkeypatch):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "part.jsonl").write_text("".join(f'{{"text": "document {i}", "url": "u{i}"}}\n'
                                                       for i in range(1350)))
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
