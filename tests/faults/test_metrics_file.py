"""metrics.jsonl with damaged lines: a resume keeps every readable line up to its step and sets the
unreadable ones aside (never deletes them); `read_metrics` skips them instead of stopping.

Pure file tests on hand-written files (issue #12): no JAX, well under 2 s.
"""

import json
import os
import warnings

import pytest

from lmobjective.run.metrics_log import MetricsWarning, read_metrics, truncate_metrics

GOOD = [b'{"step": 0, "val_loss": 6.2}\n', b'{"step": 1, "train_loss": 6.1}\n',
        b'{"step": 2, "train_loss": 6.0}\n', b'{"step": 3, "train_loss": 5.9}\n',
        b'{"step": 4, "train_loss": 5.8}\n', b'{"step": 5, "train_loss": 5.7}\n']


def write(workdir, *lines: bytes) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "wb") as f:
    f.write(b"".join(lines))
  return path


def content(workdir, name="metrics.jsonl") -> bytes:
  with open(os.path.join(workdir, name), "rb") as f:
    return f.read()


def aside(workdir) -> list[dict]:
  return [json.loads(l) for l in content(workdir, "metrics.unreadable.jsonl").splitlines()]


def stderr_lines(capsys) -> list[str]:
  return capsys.readouterr().err.splitlines()


def test_a_corrupt_middle_line_loses_no_later_line(tmp_path, capsys):
  """The old code stopped at line 4 and rewrote the file with lines 1-3 only."""
  corrupt = b'{"step": 3, "train_lo\x00\x00\x00ss": 5.9}\n'
  path = write(str(tmp_path), *GOOD[:3], corrupt, *GOOD[4:])
  truncate_metrics(str(tmp_path), 4)
  assert content(tmp_path) == b"".join(GOOD[:3] + GOOD[4:5])  # step 5 > 4 goes: the run writes it again
  assert aside(tmp_path) == [{"line": 4, "text": corrupt[:-1].decode(),
                              "reason": "JSONDecodeError: Invalid control character at char 21"}]
  side = os.path.join(str(tmp_path), "metrics.unreadable.jsonl")
  assert stderr_lines(capsys) == [f"warning: {path}:4: unreadable line (JSONDecodeError: Invalid control "
                                  f"character at char 21) moved to {side}"]


def test_a_torn_last_line_goes_aside_with_a_note(tmp_path, capsys):
  path = write(str(tmp_path), *GOOD[:5], b'{"step": 5, "train_l')
  truncate_metrics(str(tmp_path), 4)
  assert content(tmp_path) == b"".join(GOOD[:5])
  (entry,) = aside(tmp_path)
  assert (entry["line"], entry["text"]) == (6, '{"step": 5, "train_l')
  (err,) = stderr_lines(capsys)
  assert err.startswith(f"note: {path}:6: torn last line") and "JSONDecodeError" in err


def test_json_that_is_not_a_record_goes_aside(tmp_path, capsys):
  """The old code raised AttributeError ('list' object has no attribute 'get') on line 2."""
  odd = [b"[1, 2]\n", b"42\n", b'"text"\n', b"null\n", b'{"train_loss": 5.0}\n', b'{"step": true}\n',
         b'{"step": 2.0}\n', b"\n"]
  write(str(tmp_path), GOOD[0], *odd, GOOD[1])
  truncate_metrics(str(tmp_path), 4)
  assert content(tmp_path) == GOOD[0] + GOOD[1]
  assert [(e["line"], e["text"], e["reason"]) for e in aside(tmp_path)] == [
      (2, "[1, 2]", "a JSON list, not an object"), (3, "42", "a JSON int, not an object"),
      (4, '"text"', "a JSON str, not an object"), (5, "null", "a JSON NoneType, not an object"),
      (6, '{"train_loss": 5.0}', "no integer step"), (7, '{"step": true}', "no integer step"),
      (8, '{"step": 2.0}', "no integer step"), (9, "", "JSONDecodeError: Expecting value at char 1")]
  assert [e.split(":")[2] for e in stderr_lines(capsys)] == [str(n) for n in range(2, 10)]


def test_invalid_utf8_is_kept_aside_byte_for_byte(tmp_path):
  raw = b'{"step": 2, "train_loss": 6.0\xff\xfe}'
  write(str(tmp_path), GOOD[0], raw + b"\n", GOOD[1])
  truncate_metrics(str(tmp_path), 4)
  (entry,) = aside(tmp_path)
  assert entry["reason"] == "UnicodeDecodeError: invalid UTF-8 at byte 29"
  assert entry["text"].encode("utf-8", "surrogateescape") == raw


def test_lines_out_of_order_are_filtered_in_place(tmp_path):
  """Kept lines stay in the order written (no sorting), each judged by its own step."""
  lines = [GOOD[3], GOOD[1], GOOD[5], GOOD[0], GOOD[4], GOOD[2]]
  write(str(tmp_path), *lines)
  truncate_metrics(str(tmp_path), 3)
  assert content(tmp_path) == GOOD[3] + GOOD[1] + GOOD[0] + GOOD[2]
  assert not os.path.exists(tmp_path / "metrics.unreadable.jsonl")


def test_a_fresh_start_drops_readable_lines_but_keeps_unreadable_ones(tmp_path):
  write(str(tmp_path), GOOD[0], b"{oops\n", GOOD[1], b'{"step": 2')
  truncate_metrics(str(tmp_path), None)
  assert content(tmp_path) == b""
  assert [(e["line"], e["text"]) for e in aside(tmp_path)] == [(2, "{oops"), (4, '{"step": 2')]


def test_a_second_call_changes_nothing_and_a_second_resume_appends(tmp_path, capsys):
  write(str(tmp_path), *GOOD[:2], b"{bad one\n", *GOOD[2:])
  truncate_metrics(str(tmp_path), 4)
  first = content(tmp_path), content(tmp_path, "metrics.unreadable.jsonl")
  capsys.readouterr()
  truncate_metrics(str(tmp_path), 4)
  assert (content(tmp_path), content(tmp_path, "metrics.unreadable.jsonl")) == first
  assert stderr_lines(capsys) == []
  with open(tmp_path / "metrics.jsonl", "ab") as f:  # the resumed run writes on, then is killed again
    f.write(GOOD[5] + b"{bad two\n" + b'{"step": 6, "tr')
  truncate_metrics(str(tmp_path), 5)
  assert content(tmp_path) == b"".join(GOOD)
  assert [(e["line"], e["text"]) for e in aside(tmp_path)] == [(3, "{bad one"), (7, "{bad two"),
                                                               (8, '{"step": 6, "tr')]


def test_a_failed_rewrite_leaves_metrics_as_they_were(tmp_path, monkeypatch):
  """The side file lands first; if the rewrite then fails, metrics.jsonl is untouched (no temporary
  left), and the retry repeats the side entry rather than losing it."""
  original = b"".join(GOOD[:2]) + b"{bad\n" + GOOD[2]
  write(str(tmp_path), original)
  calls = []
  real_fsync = os.fsync

  def fsync_fails_second(fd):
    calls.append(fd)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    real_fsync(fd)
  monkeypatch.setattr(os, "fsync", fsync_fails_second)
  with pytest.raises(OSError, match="No space"):
    truncate_metrics(str(tmp_path), 4)
  assert content(tmp_path) == original
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "metrics.unreadable.jsonl"]
  truncate_metrics(str(tmp_path), 4)
  assert content(tmp_path) == b"".join(GOOD[:3])
  assert [e["text"] for e in aside(tmp_path)] == ["{bad", "{bad"]


def test_read_metrics_skips_unreadable_lines_and_warns_once(tmp_path):
  """The old code stopped at line 3 and returned only the two records before it."""
  path = write(str(tmp_path), *GOOD[:2], b"{bad\n", GOOD[2], b"[1]\n", *GOOD[3:])
  with pytest.warns(MetricsWarning) as caught:
    records = read_metrics(str(tmp_path))
  assert records == [json.loads(l) for l in GOOD]
  assert [str(w.message) for w in caught] == [
      f"{path}: 2 unreadable line(s) skipped, the first at line 3 (JSONDecodeError: Expecting property "
      "name enclosed in double quotes at char 1)"]


def test_read_metrics_is_quiet_about_a_torn_last_line(tmp_path):
  path = write(str(tmp_path), *GOOD[:3], b'{"step": 3, "tra')
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert read_metrics(path) == [json.loads(l) for l in GOOD[:3]]



def test_flush_puts_every_tensorboard_event_on_disk_before_a_kill_9(tmp_path):
  """The train loop flushes before each checkpoint save: a kill -9 right after it must find every
  step up to the checkpoint in TensorBoard (tensorboardX's queued writer lost the last steps' events
  here, and the kill -9 resume test saw a step missing from TensorBoard)."""
  import signal
  import subprocess
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/_tensorboard.py
  from _tensorboard import tensorboard_scalars
  script = ("import os, signal, sys\n"
            "from lmobjective.run.metrics_log import MetricsWriter\n"
            "w = MetricsWriter(sys.argv[1], purge_step=0)\n"
            "for s in range(1, 201):\n"
            "  w.write({'step': s, 'train_loss': 1.0 / s})\n"
            "w.flush()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  shown = tensorboard_scalars(tmp_path, "train_loss")
  assert [s for s, _ in shown] == list(range(1, 201))
  assert [v for _, v in shown] == pytest.approx([1.0 / s for s in range(1, 201)], rel=1e-6)
