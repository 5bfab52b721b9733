"""The examples in README.md and docs/*.md run, so the docs cannot go stale.

In each file, in order and in one fresh directory: ```python blocks are executed (sharing one
namespace), a ```python file=NAME block is written to the file NAME instead (a plugin file the
commands below it use), and every `$ llmopt ...` line of a ```console block is run; a trailing
`# exit N` says which exit code to expect (default 0).
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(python|console)(?: file=(\S+))?\n(.*?)```", re.S)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _blocks(path):
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(path.read_text())]


def _readme_inputs(where: Path) -> None:
    """What README's commands name: a Hugging Face model directory, an eval text, a recipe, a plugin."""
    from llmopt.frontend.exporter import reference_model_dir

    shutil.copytree(reference_model_dir(), where / "path" / "to" / "hf-model-dir")
    shutil.copy(reference_model_dir() / "eval.txt", where / "eval.txt")
    (where / "recipe.toml").write_text('[[passes]]\nname = "fold"\n\n[[passes]]\nname = "cleanup"\n\n'
                                       '[[passes]]\nname = "quantize-dynamic"\noptions = { block_size = 64 }\n')
    plugin = next(body for _, file, body in _blocks(REPO / "docs" / "writing-passes.md") if file == "my_passes.py")
    (where / "my_passes.py").write_text(plugin)


@pytest.mark.parametrize("doc", [d for d in DOCS if _blocks(d)], ids=lambda p: p.name)
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if doc.name == "README.md":
        _readme_inputs(tmp_path)
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


def _bash_blocks() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)]


def test_readme_test_command_is_what_ci_runs():
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0] in _bash_blocks()


def test_readme_quick_start_runs(tmp_path):
    """The quick start's install prefix is CI's (minus the test extra); its llmopt command runs as written."""
    quick = _bash_blocks()[0]
    setup, _, command = quick.rpartition(" && ")
    ci = next(ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv"))
    assert setup == ci.rpartition(" && ")[0].replace(".[export,test]", ".[export]")
    argv = shlex.split(command)
    assert argv[0] == "llmopt"
    res = subprocess.run([sys.executable, "-m", "llmopt", *argv[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "verify    PASS" in res.stdout and "speedup" in res.stdout and (tmp_path / "out" / "llmopt.json").is_file()


def test_architecture_names_every_module():
    """docs/architecture.md's table has a line for every module in the tree (by path or, in a row
    that groups a folder's modules, by file name), and names none that is gone."""
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = [p for d in ("llmopt", "passes", "targets", "models") for p in (REPO / d).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")]
    missing = [str(p.relative_to(REPO)) for p in modules if f"`{p.relative_to(REPO)}`" not in text and f"`{p.name}`" not in text]
    assert not missing, f"docs/architecture.md has no line for {missing}"
    named = re.findall(r"`((?:llmopt|passes|targets|models)/[\w/]+\.py)`", text)
    gone = [n for n in named if not (REPO / n).is_file()]
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
