"""Outputs that appear whole or not at all, and the leftovers of killed runs swept away.

Every file or directory llmopt writes is built beside its destination under a name that carries
the writer's process id (``.NAME.llmopt-KIND-PID-RANDOM``), flushed to disk (fsync), and then put
in place by one rename:

- a file (report, manifest): ``write_atomic`` — a temporary file, fsync, ``os.replace``;
- a directory (an artifact): ``publish_dir`` — on Linux ``renameat2(RENAME_EXCHANGE)`` swaps the
  new directory with the previous one in one step; where the filesystem cannot, the previous one
  is moved aside first and moved back if anything fails (and by ``sweep`` if the run was killed);
- an .onnx file with external data (``llmopt export``): ``publish_model`` — the .onnx file is the
  commit point. New weights go to a data file the previous .onnx does not reference, then the new
  .onnx replaces the old in one rename, then the old data file is removed. At every instant the
  .onnx on disk references a complete data file.

A run killed with SIGKILL cannot clean up; the next run that writes to the same place calls
``sweep``, which removes (or, for a moved-aside artifact, restores) what dead processes left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from llmopt.errors import OutputError

_TAG = ".llmopt-"
# .NAME.llmopt-KIND-PID-RANDOM[.tmp]; KIND: new (being built), old (a previous output moved aside), tmp (a file)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.llmopt-(?P<kind>new|old|tmp)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_WORK = re.compile(r"^llmopt-(?:work|verify|calib)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def staging_path(dest: Path, kind: str = "new", directory: bool = True) -> Path:
    """A fresh, empty path beside ``dest`` that ``sweep(dest)`` recognizes as this process's."""
    prefix = f".{dest.name}{_TAG}{kind}-{os.getpid()}-"
    try:
        if directory:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
            path.chmod(0o755)  # mkdtemp makes it private; an artifact is an ordinary directory
            return path
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
        os.close(fd)
        return Path(name)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write in {dest.parent} ({exc.strerror or exc}); choose another path") from None


def work_dir(kind: str = "work") -> Path:
    """A private temporary directory (in the system's temp dir) that ``sweep_work_dirs`` can attribute."""
    return Path(tempfile.mkdtemp(prefix=f"llmopt-{kind}-{os.getpid()}-"))


@contextlib.contextmanager
def temp_dir(kind: str):
    """``work_dir(kind)`` for the length of a with-block (and swept later if the process is killed)."""
    path = work_dir(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep(dest: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``dest`` left beside it; put back a previous artifact that a
    killed publish had moved aside. Returns the paths it removed or restored."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        return []
    done = []
    for entry in sorted(parent.iterdir()):
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != dest.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not os.path.lexists(dest) and (entry / "artifact").is_dir():
            os.replace(entry / "artifact", dest)  # the publish died between its two renames: roll back
        _remove(entry)
        done.append(entry)
    return done


def sweep_work_dirs() -> list[Path]:
    """Remove temporary directories (``work_dir``) of llmopt processes that no longer run."""
    root = Path(tempfile.gettempdir())
    done = []
    for entry in root.iterdir():
        m = _WORK.match(entry.name)
        if m and not _alive(int(m["pid"])):
            _remove(entry)
            done.append(entry)
    return done


def remove_own_work_dirs() -> list[Path]:
    """Remove this process's temporary directories: on Ctrl-C, once every ``with`` has unwound, so
    that an interrupt landing inside a cleanup (an ``rmtree`` in a ``finally``) leaves nothing."""
    root = Path(tempfile.gettempdir())
    done = []
    for entry in root.iterdir():
        m = _WORK.match(entry.name)
        if m and int(m["pid"]) == os.getpid():
            _remove(entry)
            done.append(entry)
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's files and the directory entry itself, to disk."""
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                fsync_path(child)
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path``: a temporary file beside it, fsync, one rename."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    sweep(path)
    tmp = staging_path(path, "tmp", directory=False)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- directories

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(staging: Path, out: Path) -> None:
    """Put the finished directory ``staging`` at ``out`` (replacing a previous one) in one step."""
    fsync_path(staging)
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        _remove(staging)  # now holds the previous artifact
    else:  # two renames; a crash between them is rolled back by sweep(out)
        aside = staging_path(out, "old")
        os.replace(out, aside / "artifact")
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(aside / "artifact", out)
            raise
        finally:
            _remove(aside)
    fsync_path(out.parent)


# --------------------------------------------------------------------------- .onnx + external data


def data_file_for(out: Path, referenced: set[str]) -> str:
    """The data file name a new ``out`` should use: ``<out>.data`` unless the .onnx now at ``out``
    references it, then ``<out>.1.data`` (so the previous pair stays whole until the commit)."""
    for name in (f"{out.name}.data", f"{out.name}.1.data"):
        if name not in referenced:
            return name
    raise AssertionError("unreachable: two candidates, a model references at most one data file name here")


def referenced_data_files(onnx_file: Path) -> set[str]:
    """External data file names (relative locations) the .onnx file references, reading no weights."""
    if not onnx_file.is_file():
        return set()
    try:
        import onnx

        proto = onnx.load(str(onnx_file), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged previous file references nothing we must keep
        return set()
    names = set()
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return names


def publish_model(staged: Path, out: Path) -> None:
    """Move the .onnx ``staged`` and the data files beside it to ``out``'s folder; the .onnx last."""
    old = referenced_data_files(out)
    new = []
    for f in sorted(staged.parent.iterdir()):
        if f != staged:
            fsync_path(f)
            os.replace(f, out.parent / f.name)
            new.append(f.name)
    fsync_path(staged)
    os.replace(staged, out)  # the commit point
    fsync_path(out.parent)
    for name in old - set(new):
        if Path(name).name == name and name.startswith(out.name):  # only the pair's own data files
            (out.parent / name).unlink(missing_ok=True)
