"""kvq.io.atomic: the --out policy (a)-(d) of docs/artifacts.md, atomic set replacement, failures, SIGKILL.

The expected states are written out by hand (file names and bytes); "atomic" is checked by killing a
real writer process at random instants and hashing what the output holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bad_input import snapshot

from kvq.artifacts.files import ARTIFACT_FILES, check_artifact_out, write_artifact
from kvq.errors import KvqError, UsageError
from kvq.io import atomic as output
from kvq.io.atomic import write_file, write_folder

OLD = {"stats.safetensors": b"old stats", "scales.safetensors": b"old scales", "scales.json": b"{}\n"}


def make_set(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".kvq-tmp"))


# --- (a) what the command reads --------------------------------------------------------------------


def test_a_out_that_is_an_input_file_is_refused_even_with_force(tmp_path):
    stats = tmp_path / "out" / "stats.safetensors"
    make_set(tmp_path / "out", OLD)
    for force in (False, True):
        with pytest.raises(UsageError, match="stats.safetensors is a file this command reads"):
            write_artifact(stats, {"scales.safetensors": b"new"}, force=force, inputs=[stats])
    assert contents(tmp_path / "out") == OLD


def test_a_out_holding_an_input_it_would_drop_is_refused_even_with_force(tmp_path):
    out = tmp_path / "out"
    make_set(out, {**OLD, "data.jsonl": b'{"text": "x"}\n'})
    with pytest.raises(UsageError, match=r"would replace .*data\.jsonl, which this command reads"):
        write_artifact(out, {"stats.safetensors": b"s", "scales.safetensors": b"c"}, force=True,
                       inputs=[out / "data.jsonl"])
    assert contents(out)["data.jsonl"] == b'{"text": "x"}\n'


def test_a_reading_the_stats_of_the_folder_solve_writes_into_is_allowed(tmp_path):
    """`kvq solve kvq-out --out kvq-out`: the statistics read are carried over, not lost."""
    out = tmp_path / "out"
    make_set(out, OLD)
    inode = os.stat(out / "stats.safetensors").st_ino
    write_artifact(out, {"scales.safetensors": b"new scales", "scales.json": b"[]\n"}, inputs=[out / "stats.safetensors"])
    assert contents(out) == {"stats.safetensors": b"old stats", "scales.safetensors": b"new scales",
                             "scales.json": b"[]\n"}
    assert os.stat(out / "stats.safetensors").st_ino == inode  # hard-linked, not copied


@pytest.mark.parametrize("where", ["inside", "around"])
def test_a_export_overlapping_a_source_folder_is_refused_even_with_force(tmp_path, where):
    model = tmp_path / "model"
    make_set(model, {"config.json": b"{}"})
    out = model / "export" if where == "inside" else tmp_path
    with pytest.raises(UsageError, match="overlaps .*model, which this command reads from"):
        write_folder(out, {"a.bin": b"1"}, force=True, sources=[model])
    assert contents(model) == {"config.json": b"{}"}


def test_a_folder_holding_the_current_folder_is_refused_even_with_force(tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_set(out, OLD)
    monkeypatch.chdir(out)
    with pytest.raises(UsageError, match="holds the current folder"):
        write_artifact(Path("."), OLD, force=True)
    assert contents(out) == OLD


def test_the_policy_can_be_checked_before_any_work(tmp_path):
    out = tmp_path / "out"
    make_set(out, {**OLD, "notes.txt": b"mine"})
    with pytest.raises(UsageError, match="notes.txt"):
        check_artifact_out(out, ["stats.safetensors", "scales.safetensors", "scales.json"])
    assert check_artifact_out(out, ["scales.safetensors"], force=True) == out
    assert contents(out) == {**OLD, "notes.txt": b"mine"} and temporaries(tmp_path) == []


# --- (b) absent or empty ---------------------------------------------------------------------------


def test_b_absent_output_is_written_with_its_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    paths = write_artifact(out, OLD)
    assert paths == [out / name for name in OLD]
    assert contents(out) == OLD
    assert temporaries(out.parent) == []


def test_b_empty_folder_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_artifact(out, OLD)
    assert contents(out) == OLD


# --- (c) a folder of the same kind ----------------------------------------------------------------


def test_c_calibrate_again_replaces_the_set_and_drops_the_stale_report(tmp_path):
    out = tmp_path / "out"
    make_set(out, {**OLD, "validate.json": b'{"report": "validate"}'})
    new = {"stats.safetensors": b"new stats", "scales.safetensors": b"new scales", "scales.json": b"[1]\n"}
    write_artifact(out, new)
    assert contents(out) == new  # validate.json described the old scales: gone
    assert temporaries(tmp_path) == []


def test_c_solve_carries_stats_and_drops_the_report_of_the_replaced_scales(tmp_path):
    out = tmp_path / "out"
    make_set(out, {**OLD, "validate.json": b'{"report": "validate"}'})
    write_artifact(out, {"scales.safetensors": b"new scales", "scales.json": b"[2]\n"})
    assert contents(out) == {"stats.safetensors": b"old stats", "scales.safetensors": b"new scales",
                             "scales.json": b"[2]\n"}


def test_c_writing_stats_alone_drops_the_scales_computed_from_the_old_ones(tmp_path):
    out = tmp_path / "out"
    make_set(out, {**OLD, "validate.json": b"{}"})
    write_artifact(out, {"stats.safetensors": b"new stats"})
    assert contents(out) == {"stats.safetensors": b"new stats"}


def test_c_an_export_folder_holding_only_its_own_names_is_replaced(tmp_path):
    out = tmp_path / "export"
    make_set(out, {"rank0.safetensors": b"old", "config.json": b"{}"})
    write_folder(out, {"rank0.safetensors": b"new", "rank1.safetensors": b"new1", "config.json": b"{1}"})
    assert contents(out) == {"rank0.safetensors": b"new", "rank1.safetensors": b"new1", "config.json": b"{1}"}


def test_c_a_json_report_with_the_same_keys_is_replaced(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"kvq_version": "0", "rows": []}))
    write_file(path, json.dumps({"kvq_version": "1", "rows": [1]}).encode(), option="--json")
    assert json.loads(path.read_text()) == {"kvq_version": "1", "rows": [1]}
    assert temporaries(tmp_path) == []


# --- (d) anything else -----------------------------------------------------------------------------


def test_d_folder_with_other_files_needs_force(tmp_path):
    out = tmp_path / "out"
    make_set(out, {**OLD, "notes.txt": b"mine"})
    with pytest.raises(UsageError, match=r"holds files this command does not write \(notes\.txt\)") as err:
        write_artifact(out, {"scales.safetensors": b"new"})
    assert err.value.hint == "pass --force to replace it, or choose another --out"
    assert contents(out) == {**OLD, "notes.txt": b"mine"}
    write_artifact(out, {"scales.safetensors": b"new"}, force=True)
    # --force replaces the folder; files of the artifact kind are still carried over
    assert contents(out) == {"stats.safetensors": b"old stats", "scales.safetensors": b"new"}


def test_d_file_where_a_folder_goes_needs_force(tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"a file")
    with pytest.raises(UsageError, match="is a file, but this command writes a folder"):
        write_artifact(out, OLD)
    assert out.read_bytes() == b"a file"
    write_artifact(out, OLD, force=True)
    assert contents(out) == OLD
    assert temporaries(tmp_path) == []


def test_d_folder_where_a_file_goes_needs_force(tmp_path):
    out = tmp_path / "scales.json"
    make_set(out, {"x": b"1"})
    with pytest.raises(UsageError, match="is a folder, but this command writes one file"):
        write_file(out, b"{}")
    write_file(out, b"{}", force=True)
    assert out.read_bytes() == b"{}"
    assert temporaries(tmp_path) == []


def test_d_file_of_another_kind_needs_force_and_the_hint_names_the_option(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama"}')
    with pytest.raises(UsageError, match="existing file of another kind") as err:
        write_file(path, b'{"rows": []}', option="--json")
    assert err.value.hint == "remove it, or choose another --json path"
    assert path.read_text() == '{"model_type": "llama"}'


# --- failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_no_space_left_keeps_the_old_set_and_leaves_no_temporary(tmp_path, monkeypatch, call):
    out = tmp_path / "out"
    make_set(out, OLD)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, full)
    with pytest.raises(KvqError, match="No space left on device") as err:
        write_artifact(out, {"stats.safetensors": b"x" * 1000, "scales.safetensors": b"y"})
    monkeypatch.undo()
    assert "previous output is unchanged" in err.value.hint
    assert contents(out) == OLD
    assert temporaries(tmp_path) == []


def test_a_name_that_is_also_a_folder_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    make_set(out, {"a": b"old"})
    with pytest.raises(KvqError):
        write_folder(out, {"a": b"file", "a/b": b"inside a"})
    assert contents(out) == {"a": b"old"}
    assert temporaries(tmp_path) == []


def test_unwritable_out_is_one_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match=r"cannot write --out .*file/out: Not a directory") as err:
        write_artifact(blocker / "out", OLD)
    assert err.value.hint == "choose a writable --out path"


def test_the_fallback_without_rename_exchange_gives_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    make_set(out, OLD)
    write_artifact(out, {"scales.safetensors": b"new"})
    assert contents(out) == {"stats.safetensors": b"old stats", "scales.safetensors": b"new"}
    assert temporaries(tmp_path) == []


def test_the_fallback_puts_the_old_set_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    make_set(out, OLD)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # new -> out, right after out was moved aside
            raise OSError(errno.EIO, "simulated I/O error", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(output.os, "rename", rename)
    with pytest.raises((OSError, KvqError)):
        write_artifact(out, {"scales.safetensors": b"new"})
    monkeypatch.setattr(output.os, "rename", real_rename)
    assert contents(out) == {name: data for name, data in OLD.items()}
    assert temporaries(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_runs_go_and_a_set_moved_aside_comes_back(tmp_path):
    out = tmp_path / "out"
    dead, host = _dead_pid(), output._HOST
    new_tmp = tmp_path / f".out.{host}.{dead}.0a1b.new.kvq-tmp"
    make_set(new_tmp, {"stats.safetensors": b"half"})
    old_tmp = tmp_path / f".out.{host}.{dead}.0a1c.old.kvq-tmp"  # killed between the fallback's two renames
    make_set(old_tmp, OLD)
    alive = tmp_path / f".out.{host}.{os.getppid()}.0a1d.new.kvq-tmp"  # a live process's: left alone
    make_set(alive, {"x": b"1"})
    output.remove_stale_temporaries(out)
    assert contents(out) == OLD
    assert temporaries(tmp_path) == [alive.name]


# --- SIGKILL at any instant --------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from kvq.io.atomic import write_folder
size = int(sys.argv[2])
files = {"stats.safetensors": b"n" * size, "scales.safetensors": b"m" * size, "scales.json": b"new"}
print("go", flush=True)
write_folder(Path(sys.argv[1]), files, kind=KIND)
""".replace("KIND", repr(ARTIFACT_FILES))


def test_sigkill_at_any_instant_leaves_the_old_or_the_new_set(tmp_path):
    out = tmp_path / "out"
    size = 4 << 20
    old = {"stats.safetensors": b"o" * size, "scales.safetensors": b"p" * size, "scales.json": b"old"}
    new = {"stats.safetensors": b"n" * size, "scales.safetensors": b"m" * size, "scales.json": b"new"}
    new_digest = {name: hashlib.sha256(data).hexdigest() for name, data in new.items()}
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(size)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        return proc

    write_artifact(out, old, force=True)
    old_digest = snapshot(out)
    proc = start()
    began = time.perf_counter()  # the write itself: from "go" to the end of the process
    assert proc.wait(timeout=60) == 0
    duration = time.perf_counter() - began
    assert snapshot(out) == new_digest

    rng = random.Random(7)
    seen = {"old": 0, "new": 0}
    for _ in range(30):
        write_artifact(out, old, force=True)  # the next write: also removes what a killed run left
        assert snapshot(out) == old_digest and temporaries(tmp_path) == []
        proc = start()
        time.sleep(rng.uniform(0, duration * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        state = snapshot(out)
        assert state in (old_digest, new_digest), state
        seen["old" if state == old_digest else "new"] += 1
    write_artifact(out, old, force=True)
    assert temporaries(tmp_path) == [] and snapshot(out) == old_digest
    print(f"after SIGKILL: {seen}")


def test_a_staged_folder_filled_by_a_library_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError, match="conversion failed"), output.staged_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")
    assert not out.exists() and temporaries(out.parent) == []
    with output.staged_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        assert not out.exists()  # nothing at --out until the block ends
    assert contents(out) == {"config.json": b"{}", "sub/w.bin": b"w"}
    assert temporaries(out.parent) == []
