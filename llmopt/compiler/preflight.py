"""Pre-flight: every path a command reads or writes, checked before any export or pass runs.

A command lists its inputs (every file it will read: the model and its external data, a Hugging
Face directory's files, eval texts, plugin files, recipes) and its outputs (``-o``, ``--report``,
``--plot``, ...). ``check`` refuses, with one line naming the flag, the path and what to do:

- an output that is an input, or a directory that holds one (publishing it would replace the input);
- two outputs at one path, or a file output inside a directory output (the directory is replaced
  as a whole when it is published, so a file written into it first would be lost or block it);
- an output whose parent cannot be made: a component is a file, or the directory is not writable;
- a file output that is a directory, a directory output that is a file or a non-artifact directory.

The check leaves nothing behind (it probes each output's directory with an empty directory it
removes at once); it runs in milliseconds and reads no weights.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from llmopt.errors import InputError, OutputError

ARTIFACT_MANIFEST = "llmopt.json"


@dataclasses.dataclass(frozen=True)
class Output:
    flag: str  # how the user named it: "-o", "--report", "--plot", ...
    path: Path
    kind: str = "file"  # "file" or "dir"
    artifact: bool = False  # a dir output that may replace a previous llmopt artifact

    def __str__(self) -> str:
        return f"{self.flag} {self.path}"


def _real(path: Path) -> Path:
    """``path`` made absolute with symlinks resolved as far as it exists (it may not exist yet)."""
    return Path(os.path.realpath(path))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check(inputs: Iterable[tuple[str, Path]], outputs: Sequence[Output]) -> None:
    """Raise ``OutputError`` for the first output that cannot be written safely (see module doc)."""
    ins = [(what, Path(p), _real(Path(p))) for what, p in inputs]
    for out in outputs:
        real = _real(out.path)
        for what, given, rin in ins:
            if real == rin:
                raise OutputError(f"{out}: is the input {what} {given}; it would be overwritten — write to another path")
            if out.kind == "dir" and _inside(rin, real):
                raise OutputError(f"{out}: holds the input {what} {given}; writing there would replace it — "
                                  "write to another directory")
        _check_parent(out)
        _check_kind(out)
    for i, a in enumerate(outputs):
        for b in outputs[i + 1:]:
            ra, rb = _real(a.path), _real(b.path)
            if ra == rb:
                raise OutputError(f"{a} and {b} are the same path; give each its own")
            for d, f in ((a, b), (b, a)):
                if d.kind == "dir" and _inside(_real(f.path), _real(d.path)):
                    raise OutputError(f"{f}: is inside {d}, which is replaced as a whole when it is written; "
                                      f"put it beside, e.g. {d.path.parent / f.path.name}")


def _check_parent(out: Output) -> None:
    """The first existing ancestor must be a writable directory (the rest is created)."""
    p = Path(os.path.abspath(out.path))
    for anc in p.parents:
        if os.path.lexists(anc):
            if not anc.is_dir():
                raise OutputError(f"{out}: {anc} is a file, not a directory; choose another path")
            try:  # a real probe: permissions, read-only mounts and pseudo-filesystems all answer here
                os.rmdir(tempfile.mkdtemp(prefix=".llmopt-probe-", dir=anc))
            except OSError as exc:
                raise OutputError(f"{out}: cannot write in {anc} ({exc.strerror or exc}); choose another path") from None
            return


def _check_kind(out: Output) -> None:
    p = out.path
    if out.kind == "file":
        if p.is_dir():
            raise OutputError(f"{out}: is a directory; give a file path, e.g. {p / p.name}.json"
                              if out.flag == "--report" else f"{out}: is a directory; give a file path")
        return
    if p.exists() and not p.is_dir():
        raise OutputError(f"{out}: exists and is a file; choose another directory")
    if out.artifact and p.is_dir() and any(p.iterdir()) and not (p / ARTIFACT_MANIFEST).is_file():
        raise OutputError(f"{out}: exists and is not an llmopt artifact (no {ARTIFACT_MANIFEST}); "
                          "choose another directory or empty it first")


def check_text(path: str | os.PathLike, flag: str, chunk: int = 1 << 20) -> Path:
    """``path`` must be a readable UTF-8 text file (decoded in chunks, so a large file costs no memory)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{flag} {p}: evaluation text not found; check the path")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                decoder.decode(block)
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag} {p}: not UTF-8 text (byte {offset + exc.start}: {exc.reason}); "
                         "convert it, e.g. iconv -t UTF-8") from None
    except OSError as exc:
        raise InputError(f"{flag} {p}: cannot read it ({exc.strerror or exc})") from None
    return p


def directory_inputs(what: str, directory: Path) -> list[tuple[str, Path]]:
    """The files of a directory input (a Hugging Face model directory): each one is an input."""
    return [(what, f) for f in sorted(directory.iterdir()) if f.is_file()]
