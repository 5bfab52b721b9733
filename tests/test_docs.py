"""The examples in README.md and docs/*.md run, so the docs cannot go stale.

In each file, in order and in one fresh directory: ```python blocks are executed (sharing one
namespace), a ```python file=NAME block is written to the file NAME instead (a plugin file the
commands below it use), and every `$ llmopt ...` line of a ```console block is run; a trailing
`# exit N` says which exit code to expect (default 0).
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(python|console)(?: file=(\S+))?\n(.*?)```", re.S)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _blocks(path):
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(path.read_text())]


@pytest.mark.parametrize("doc", [d for d in DOCS if _blocks(d)], ids=lambda p: p.name)
def test_doc_examples_run(doc, tmp_path, monkeypatch, exported):
    monkeypatch.chdir(tmp_path)
    if doc.name == "README.md":  # README's Python example compiles a model.onnx
        from llmopt import ir as irx

        irx.save(irx.load(exported("llama", True)), tmp_path / "model.onnx")
    namespace: dict = {}
    for kind, file, body in _blocks(doc):
        if file:
            (tmp_path / file).write_text(body)
            continue
        if kind == "python":
            exec(compile(body, f"{doc.name}", "exec"), namespace)
            continue
        for line in body.splitlines():
            if not line.startswith("$ "):
                continue
            command, _, comment = line[2:].partition("  # ")
            expect = int(comment.split()[1]) if comment.startswith("exit") else 0
            argv = shlex.split(command)
            assert argv[0] == "llmopt", line
            res = subprocess.run([sys.executable, "-m", "llmopt", *argv[1:]], capture_output=True, text=True)
            assert res.returncode == expect, f"{line}\n{res.stderr[-2000:]}"
            if expect == 2:
                assert "Traceback" not in res.stderr and res.stderr.startswith("error: ")
