"""Files written whole or not at all, and JSON read back: the one helper every module uses.

A reader (another process, a resumed run, a notebook) never sees half a file: `atomic_path`
yields a unique temporary name in the target's directory, and only a body that finished moves
it into place (`os.replace`, atomic on POSIX); on any error the temporary is removed and the old
file, if any, is left as it was. `check_workdir` refuses an output directory that cannot be
written, in one line, before anything is.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from lmobjective import faults
from lmobjective.config import ConfigError


def _read_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# tempfile makes private files (0600) and directories (0700); a finished file gets the mode an
# ordinary open() would have given it. Read once: os.umask can only be read by setting it.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str, directory: bool = False) -> Iterator[str]:
  """A temporary path to write (a file, or with `directory` a directory) that becomes `path`.

  A finished file is fsynced before the rename. The temporary keeps `path`'s extension (matplotlib and numpy pick formats by it). For a
  directory, an existing `path` is kept (another process wrote it first) and the new one dropped.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(path)
  stem, ext = os.path.splitext(name)
  if directory:
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
  else:
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=parent)
    os.close(fd)
  os.chmod(tmp, (0o777 if directory else 0o666) & ~_UMASK)
  try:
    yield tmp
    if not directory:
      with open(tmp, "rb") as f:  # on disk before it replaces the old file
        os.fsync(f.fileno())
    if directory and os.path.isdir(path):
      raise FileExistsError(path)
    faults.point("atomic.rename", path)
    os.replace(tmp, path)
  except FileExistsError:
    _remove(tmp)
  except BaseException:
    _remove(tmp)
    raise


def remove_stale_temporaries(directory: str, names: list[str]) -> list[str]:
  """Removes the temporaries `atomic_path` left for `names` in `directory` (a writer killed before
  its rename; the file itself is intact). Only for a directory whose writer is known dead (a run
  holding its workdir's lock). Returns the removed paths."""
  removed = []
  for name in names:
    stem, ext = os.path.splitext(name)
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(stem)}.*.tmp{glob.escape(ext)}")):
      _remove(tmp)
      removed.append(tmp)
  return removed


def _remove(tmp: str) -> None:
  if os.path.isdir(tmp):
    shutil.rmtree(tmp, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` whole (text as UTF-8)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """`json.dumps(obj, **dump_kwargs)` written atomically."""
  atomic_write(path, json.dumps(obj, **dump_kwargs))


def read_json(path: str, default: Any = None) -> Any:
  """The JSON in `path`, or `default` when the file is missing or is not valid JSON (a file that
  some older writer left half-written). Other errors (permissions, a directory) propagate."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return default


def check_dir(key: str, path: str) -> None:
  """Raises `ConfigError(key, path, ...)` unless `path` is, or can be made as, a directory we can write.

  Creates nothing that stays: the nearest existing ancestor gets an empty directory made and removed
  at once, since permission bits say nothing as root and /proc or /sys refuse writes all the same.
  """
  if not path:
    raise ConfigError(key, path, "must be a directory path")
  target = os.path.abspath(os.path.expanduser(path))
  existing = target
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(key, path, "exists and is not a directory" if existing == target
                      else f"{existing} is not a directory")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
  except OSError as e:
    raise ConfigError(key, path, f"cannot create anything in {existing} ({e.strerror})") from None


def check_workdir(path: str) -> None:
  """The run's --workdir: a directory (existing or not) that this process can write into."""
  check_dir("workdir", path)
