"""Records: the resumable JSONL writer (torn lines, a real SIGKILL), read/validate, atomic JSON."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from distillery.records import (
    JsonlWriter,
    RecordError,
    read_jsonl,
    sft_record,
    validate_sft_records,
    write_json_atomic,
)


def _rec(i: int, payload: str = "") -> dict:
    return sft_record(f"r{i}", f"{i}+{i}", f"{i}+{i}={2 * i};#{2 * i}{payload}", str(2 * i), method="ground_truth")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# --------------------------------------------------------------------------- sft_record


def test_sft_record_follows_the_contract():
    rec = sft_record("a", "1+1", "#2", "2", method="labeling", teacher="t", seed_id="s", sampling={"temperature": 0.0}, extra=5)
    assert rec["id"] == "a"
    assert rec["messages"] == [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "#2"}]
    assert rec["reference"] == "2"
    meta = rec["meta"]
    assert (meta["method"], meta["teacher"], meta["seed_id"], meta["extra"]) == ("labeling", "t", "s", 5)
    assert meta["sampling"] == {"temperature": 0.0}
    assert time.strptime(meta["created"], "%Y-%m-%dT%H:%M:%SZ")
    assert sft_record("b", "p", "a", None, method="m")["meta"]["sampling"] == {}
    validate_sft_records([rec], "x")
    json.dumps(rec)  # serializable


# --------------------------------------------------------------------------- JsonlWriter


def test_writer_writes_partial_then_finish_renames(tmp_path):
    path = tmp_path / "sub" / "data.jsonl"
    w = JsonlWriter(path)
    recs = [_rec(i) for i in range(5)] + [sft_record("u", "héllo 🙂", "日本", None, method="m")]
    w.write(recs[:3])
    w.write(recs[3:])
    assert _partial(path).exists() and not path.exists()
    assert read_jsonl(_partial(path)) == recs  # flushed: readable before finish
    assert w.done_ids() == {r["id"] for r in recs}
    assert w.finish() == path
    assert path.exists() and not _partial(path).exists()
    assert read_jsonl(path) == recs
    assert "🙂" in path.read_text(encoding="utf-8")  # written as UTF-8, not \\u-escaped


def test_fresh_writer_has_nothing_done(tmp_path):
    w = JsonlWriter(tmp_path / "d.jsonl")
    assert w.done_ids() == set()
    w.write([])
    assert read_jsonl(w.finish()) == []


def test_resume_after_torn_last_line(tmp_path):
    path = tmp_path / "data.jsonl"
    w = JsonlWriter(path)
    w.write([_rec(i) for i in range(5)])
    w._f.close()  # the process "dies" here ...
    with _partial(path).open("ab") as f:  # ... in the middle of writing record 5
        f.write(json.dumps(_rec(5)).encode()[:25])

    w2 = JsonlWriter(path)
    done = w2.done_ids()
    assert done == {f"r{i}" for i in range(5)}
    assert _partial(path).read_bytes().endswith(b"\n")
    w2.write([_rec(i) for i in range(10) if f"r{i}" not in done])
    w2.finish()
    ids = [r["id"] for r in read_jsonl(path)]
    assert ids == [f"r{i}" for i in range(10)]


def test_resume_twice_without_torn_line_keeps_everything(tmp_path):
    path = tmp_path / "data.jsonl"
    for start in (0, 3, 6):
        w = JsonlWriter(path)
        assert w.done_ids() == {f"r{i}" for i in range(start)}
        w.write([_rec(i) for i in range(start, start + 3)])
        w._f.close()
    w = JsonlWriter(path)
    w.write([_rec(9)])
    w.finish()
    assert [r["id"] for r in read_jsonl(path)] == [f"r{i}" for i in range(10)]


_CHILD = textwrap.dedent(
    """
    import sys
    from distillery.records import JsonlWriter, sft_record
    w = JsonlWriter(sys.argv[1])
    payload = "x" * 20000  # big records: the kill may land while one is being written
    for i in range(3000):
        w.write([sft_record(f"r{i}", f"{i}+{i}", payload, str(2 * i), method="m")])
    """
)


def test_resume_after_a_real_sigkill(tmp_path):
    path = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            p = _partial(path)
            if p.exists() and p.read_bytes().count(b"\n") >= 30:
                break
            assert proc.poll() is None, "the writer exited before it was killed"
            time.sleep(0.01)
        else:
            pytest.fail("the child wrote too slowly")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()  # never a final file from a killed job

    raw = _partial(path).read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    expected_done = {json.loads(line)["id"] for line in complete.splitlines()}
    w = JsonlWriter(path)
    done = w.done_ids()
    assert done == expected_done
    k = len(done)
    assert k >= 30
    assert done == {f"r{i}" for i in range(k)}  # written in order: a prefix
    assert _partial(path).read_bytes() == complete  # the torn tail (if any) is gone, the rest kept

    total = k + 20
    w.write([sft_record(f"r{i}", f"{i}+{i}", "y", str(2 * i), method="m") for i in range(total) if f"r{i}" not in done])
    w.finish()
    ids = [r["id"] for r in read_jsonl(path)]
    assert ids == [f"r{i}" for i in range(total)]  # nothing lost, nothing duplicated


def test_done_ids_closes_its_file(tmp_path):
    w = JsonlWriter(tmp_path / "d.jsonl")
    w.write([_rec(0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert w.done_ids() == {"r0"}
        gc.collect()
    w.finish()
    assert not [c for c in caught if issubclass(c.category, ResourceWarning)]


# --------------------------------------------------------------------------- read / validate


def test_read_jsonl_skips_blank_lines_and_names_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2}\n')
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]
    path.write_text('{"id": 1}\n\n{"id": 2\n{"id": 3}\n')
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: not valid JSON")


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"id": "x"}, '"messages"'),
        ({"messages": []}, '"messages"'),
        ({"messages": "hi"}, '"messages"'),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": ["just text"]}, "role"),
        ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}, '"content"'),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "last message"),
    ],
)
def test_validate_sft_records_errors_name_source_and_record(bad, needle):
    good = _rec(0)
    with pytest.raises(RecordError) as info:
        validate_sft_records([good, bad], "data/train.jsonl")
    msg = str(info.value)
    assert msg.startswith("data/train.jsonl: record 2:")
    assert needle in msg


def test_validate_accepts_system_and_multi_turn():
    validate_sft_records(
        [
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "1+1"},
                    {"role": "assistant", "content": "#2"},
                    {"role": "user", "content": "2+2"},
                    {"role": "assistant", "content": "#4"},
                ]
            }
        ],
        "x",
    )


# --------------------------------------------------------------------------- write_json_atomic


def test_write_json_atomic(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    write_json_atomic(path, {"acc": 0.5, "names": ["é"]})
    assert json.loads(path.read_text()) == {"acc": 0.5, "names": ["é"]}
    write_json_atomic(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp file left


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
