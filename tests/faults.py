"""Fault injection for llmopt's command line: damaged models, malformed pipelines, interrupted runs.

Run as a script (``python tests/faults.py MODEL.onnx --cases 20 --json out.json``) by
``tests/test_fuzz.py`` (a bounded subset) and ``benchmarks/fuzz.py`` (hundreds of cases, the figures
in docs/benchmarks.md). Every case runs the real command line and is judged on what a user sees:

- **traceback**: a Python traceback, an exit code other than 0/1/2 (130 after Ctrl-C), or a crash;
- **one line**: a failure prints exactly one ``error:`` line;
- **input modified**: any byte or file of the input folder changed (sha256 before and after);
- **partial output**: after a failure the output path exists, or anything of the run is left beside
  it or in the temp dir; after a success the artifact is incomplete;
- **previous artifact lost**: an interrupted recompile left the earlier artifact at ``-o`` changed
  or gone (unless the new one completed whole).

Damaged-model cases run in a child forked from one process that imported llmopt once (a crash in
ONNX Runtime kills only that child); interrupted runs are real processes sent SIGINT or SIGKILL at a
random moment.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PY = sys.executable
EXIT_CODES = (0, 1, 2)


# --------------------------------------------------------------------------- observing


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(parent: Path, pid: int | None = None) -> list[str]:
    """Staging/temporary entries of llmopt runs beside outputs and in the temp dir (of ``pid`` if given)."""
    found = [p.name for p in parent.iterdir() if ".llmopt-" in p.name and not p.name.startswith(".llmopt-probe")]
    tmp = Path(tempfile.gettempdir())
    tag = f"-{pid}-" if pid else "-"
    found += [p.name for p in tmp.iterdir() if p.name.startswith(("llmopt-work", "llmopt-verify", "llmopt-calib"))
              and tag in p.name]
    return found


def artifact_whole(out: Path) -> bool:
    """A published artifact: manifest, graph and every file the manifest lists, at its size."""
    try:
        manifest = json.loads((out / "llmopt.json").read_text())
        files = manifest["artifact"]["files"]
        return all((out / n).is_file() and (out / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError):
        return False


@dataclasses.dataclass
class Outcome:
    kind: str
    case: str
    rc: int
    traceback: bool = False
    one_line: bool = True
    input_modified: bool = False
    partial_output: bool = False
    previous_lost: bool = False
    finished_first: bool = False  # an interrupted run whose new artifact was already in place
    note: str = ""

    @property
    def bad(self) -> bool:
        return self.traceback or not self.one_line or self.input_modified or self.partial_output or self.previous_lost


def judge_output(o: Outcome, stderr: str, out: Path, existed_before: bool) -> None:
    o.traceback = "Traceback" in stderr or o.rc not in EXIT_CODES + (130,)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    o.one_line = o.rc == 0 or o.rc == 130 or len(errors) == 1
    if o.rc == 0:
        o.partial_output = not artifact_whole(out)
    elif not existed_before:
        o.partial_output = os.path.lexists(out)
    o.note = (errors[0] if errors else stderr.strip().splitlines()[-1] if stderr.strip() else "")[:200]


# --------------------------------------------------------------------------- running in a forked child


def run_forked(argv: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, int]:
    """Run llmopt's CLI main(argv) in a forked child; (exit code, stderr, the child's pid: temporary
    entries carry it, so ``leftovers`` sees this run's, not a concurrent test run's). A signal shows
    as 128 + signo."""
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child
        code = 99
        try:
            os.chdir(cwd)
            os.dup2(err.fileno(), 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
            sys.stdout = open(os.devnull, "w")
            from llmopt.cli.app import main

            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is what we look for
            import traceback

            traceback.print_exc()
            code = 98
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = signal.SIGKILL
            break
        time.sleep(0.01)
    err.seek(0)
    stderr = err.read().decode("utf-8", "replace")
    rc = os.waitstatus_to_exitcode(status) if done else -signal.SIGKILL
    return (128 - rc if rc < 0 else rc), stderr, pid


# --------------------------------------------------------------------------- damaged models


def _proto_edit(fn: Callable) -> Callable[[Path, random.Random], str]:
    def mutate(model: Path, rng: random.Random) -> str:
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
        what = fn(proto, rng)
        model.write_bytes(proto.SerializeToString())
        return what

    mutate.__name__ = fn.__name__
    return mutate


def _ext(t, key: str, value: str | None = None):
    for e in t.external_data:
        if e.key == key:
            if value is not None:
                e.value = value
            return e.value
    if value is not None:
        t.external_data.add(key=key, value=value)
    return None


def _external(proto):
    return [t for t in proto.graph.initializer if t.data_location == 1]


@_proto_edit
def wrong_dtype(proto, rng):
    t = rng.choice(list(proto.graph.initializer))
    old, t.data_type = t.data_type, rng.choice([d for d in (1, 2, 3, 5, 6, 7, 9, 10, 11, 16) if d != t.data_type])
    return f"{t.name}: dtype {old} -> {t.data_type}"


@_proto_edit
def missing_initializer(proto, rng):
    i = rng.randrange(len(proto.graph.initializer))
    name = proto.graph.initializer[i].name
    del proto.graph.initializer[i]
    return f"removed {name}"


@_proto_edit
def duplicated_initializer(proto, rng):
    t = rng.choice(list(proto.graph.initializer))
    proto.graph.initializer.append(t)
    return f"duplicated {t.name}"


@_proto_edit
def cycle(proto, rng):
    nodes = list(proto.graph.node)
    i = rng.randrange(1, len(nodes) - 1)
    j = rng.randrange(i + 1, len(nodes))
    if not nodes[i].input or not nodes[j].output:
        return "no cycle possible here"
    proto.graph.node[i].input[0] = nodes[j].output[0]
    return f"{nodes[i].name} reads {nodes[j].name}"


@_proto_edit
def terabyte_dims(proto, rng):
    t = rng.choice(_external(proto) or list(proto.graph.initializer))
    del t.dims[:]
    t.dims.extend([2**20, 2**20, rng.choice([1, 4, 256])])
    return f"{t.name} declares {4 * 2**40 * t.dims[-1] / 1e12:.0f} TB"


@_proto_edit
def external_short(proto, rng):
    t = rng.choice(_external(proto))
    _ext(t, "length", str(int(_ext(t, "length") or 0) + rng.choice([1, 4096, 2**31])))
    return f"{t.name} length grown"


@_proto_edit
def external_offset(proto, rng):
    t = rng.choice(_external(proto))
    _ext(t, "offset", str(rng.choice([-8, 2**40, int(_ext(t, "offset") or 0) + 3])))
    return f"{t.name} offset moved"


@_proto_edit
def external_elsewhere(proto, rng):
    where = rng.choice(["../outside.bin", "/etc/hostname", "missing.bin", "sub/../../outside.bin", ".", ""])
    for t in rng.sample(_external(proto), k=rng.randint(1, 3)):
        _ext(t, "location", where)
    return f"location {where!r}"


@_proto_edit
def unknown_op(proto, rng):
    n = rng.choice(list(proto.graph.node))
    n.op_type = rng.choice(["FooBar", "Conv3DTranspose", ""])
    return f"{n.name} is {n.op_type!r}"


@_proto_edit
def bad_opset(proto, rng):
    proto.opset_import[0].version = rng.choice([1, 5, 99, 10**6])
    return f"opset {proto.opset_import[0].version}"


@_proto_edit
def no_outputs(proto, rng):
    del proto.graph.output[:]
    return "graph outputs removed"


@_proto_edit
def renamed_input(proto, rng):
    v = rng.choice(list(proto.graph.input))
    v.name = rng.choice(["", "x", v.name + "_renamed"])
    return f"input renamed to {v.name!r}"


def truncated_model(model: Path, rng: random.Random) -> str:
    data = model.read_bytes()
    k = rng.randrange(0, len(data))
    model.write_bytes(data[:k])
    return f"model cut at {k}/{len(data)}"


def truncated_data(model: Path, rng: random.Random) -> str:
    data_file = model.with_name(model.name + ".data")
    size = data_file.stat().st_size
    k = rng.randrange(0, size)
    with open(data_file, "r+b") as f:
        f.truncate(k)
    return f"data cut at {k}/{size}"


def bit_flips(model: Path, rng: random.Random) -> str:
    data = bytearray(model.read_bytes())
    n = rng.choice([1, 2, 8, 64])
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    model.write_bytes(bytes(data))
    return f"{n} bits flipped in the .onnx"


def data_bit_flips(model: Path, rng: random.Random) -> str:
    data_file = model.with_name(model.name + ".data")
    with open(data_file, "r+b") as f:
        size = data_file.stat().st_size
        for _ in range(16):
            f.seek(rng.randrange(size))
            f.write(bytes([rng.randrange(256)]))
    return "16 bytes of weights overwritten"


def other_file(model: Path, rng: random.Random) -> str:
    kind = rng.choice(["text", "json", "empty", "safetensors", "directory", "zip"])
    model.unlink()
    if kind == "text":
        model.write_text("this is not a model\n" * 20)
    elif kind == "json":
        model.write_text(json.dumps({"model_type": "llama"}))
    elif kind == "empty":
        model.write_bytes(b"")
    elif kind == "safetensors":
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        model.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    elif kind == "directory":
        model.mkdir()
    else:
        model.write_bytes(b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(200)))
    return f"a {kind} where the .onnx was"


MUTATIONS = [truncated_model, truncated_data, bit_flips, data_bit_flips, wrong_dtype, missing_initializer,
             duplicated_initializer, cycle, terabyte_dims, external_short, external_offset, external_elsewhere,
             unknown_op, bad_opset, no_outputs, renamed_input, other_file]


def damaged_model_cases(base: Path, root: Path, n: int, rng: random.Random) -> list[Outcome]:
    outcomes = []
    outside = root / "outside.bin"
    outside.write_bytes(os.urandom(1 << 16))
    for i in range(n):
        mutate = MUTATIONS[i % len(MUTATIONS)]
        case = root / f"case{i}"
        src = private_copy(base, case / "in")
        what = mutate(src / "model.onnx", rng)
        before = tree_digest(src)
        out = case / "out"
        command = rng.choice([["compile", str(src / "model.onnx"), "-o", str(out)],
                              ["compile", str(src / "model.onnx"), "-o", str(out), "--target", "cpu-int4"],
                              ["inspect", str(src / "model.onnx")]])
        rc, stderr, child = run_forked(command, case)
        o = Outcome("damaged model", f"{mutate.__name__}: {what} ({command[0]})", rc)
        judge_output(o, stderr, out if command[0] == "compile" else case / "no-output", existed_before=False)
        if rc == 0 and command[0] != "compile":
            o.partial_output = False
        if o.traceback:
            o.note = stderr[max(0, stderr.find("Traceback") - 200):][:1500] if "Traceback" in stderr else stderr[-1500:]
        o.input_modified = tree_digest(src) != before
        if rc != 0:
            o.partial_output |= bool(leftovers(case, child))
        outcomes.append(o)
        shutil.rmtree(case, ignore_errors=True)
    return outcomes


def private_copy(base: Path, folder: Path) -> Path:
    """``base`` and its data copied to ``folder`` as model.onnx + model.onnx.data; returns the folder."""
    import onnx

    folder.mkdir(parents=True)
    shutil.copy(base.with_name(base.name + ".data"), folder / "model.onnx.data")
    proto = onnx.load(str(base), load_external_data=False)
    for t in _external(proto):
        _ext(t, "location", "model.onnx.data")
    (folder / "model.onnx").write_bytes(proto.SerializeToString())
    return folder


# --------------------------------------------------------------------------- malformed pipelines, recipes, options

PASS_NAMES = ["fold", "cleanup", "fuse", "kv-cache", "logits-to-keep", "quantize-dynamic", "weight-only", "quantize-moe", "qdq", "prune", "fp16",
              "smooth-quant", "fixpoint", "nope"]
OPTIONS = {"quantize-dynamic": ["block_size", "kernel", "accuracy_level", "min_elements", "exclude", "x"],
           "weight-only": ["bits", "block_size", "method", "symmetric", "scales", "table_bits", "head_bits"], "prune": ["sparsity", "structured", "n", "m"],
           "kv-cache": ["buffer", "max_length"], "fuse": ["attention", "moe", "zzz"],
           "quantize-moe": ["bits", "block_size", "symmetric", "accuracy_level"]}
VALUES = ["0", "-1", "1", "3", "7", "64", "1e9", "nan", "inf", "true", "maybe", "a;b", "*", "0.5", "1.5", "", "dynamic"]


def random_pipeline(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(0, 4)):
        name = rng.choice(PASS_NAMES)
        if name == "fixpoint":
            items.append(f"fixpoint{{max_iterations={rng.choice(VALUES)}}}(fold,cleanup)")
            continue
        opts = [f"{rng.choice(OPTIONS.get(name, ['x']))}={rng.choice(VALUES)}" for _ in range(rng.randint(0, 2))]
        items.append(name + ("{" + ",".join(opts) + "}" if opts else ""))
    text = ",".join(items)
    for _ in range(rng.choice([0, 0, 1, 2])):  # and some plain damage
        i = rng.randrange(len(text) + 1)
        text = text[:i] + rng.choice("{}(),=; \t\x00é") + text[i:]
    return text


def random_recipe(rng: random.Random) -> str:
    bits = rng.choice(["3", "4", '"x"', "[1]"])
    return rng.choice([
        "[[passes]]\nname = 'fold'\n",
        "[[passes]]\nname = 42\n",
        "[[passes]]\noptions = { bits = 4 }\n",
        f"[[passes]]\nname = 'weight-only'\noptions = {{ bits = {bits} }}\n",
        "[[passes]]\nfixpoint = 'fold'\n",
        "passes = 'fold'\n",
        "[[passes]\nname = 'fold'\n",
        "\x00\xff",
        "",
        f"[[passes]]\nname = '{random_pipeline(rng)}'\n",
    ])


def malformed_pipeline_cases(base: Path, root: Path, n: int, rng: random.Random) -> list[Outcome]:
    outcomes = []
    src = private_copy(base, root / "pipeline-in")
    before = tree_digest(src)
    for i in range(n):
        out = root / f"p{i}"
        r = rng.random()
        if r < 0.5:
            pipeline = random_pipeline(rng)
            argv, what = ["--passes", pipeline], f"--passes {pipeline!r}"
        elif r < 0.75:
            recipe = root / f"r{i}.toml"
            recipe.write_bytes(random_recipe(rng).encode("utf-8", "surrogateescape"))
            argv, what = ["--recipe", str(recipe)], f"--recipe {recipe.read_bytes()[:60]!r}"
        else:
            flag, value = rng.choice([("--threshold", f"{rng.choice(['min_cosine', 'max_abs', 'min_top1', 'x'])}={rng.choice(VALUES)}"),
                                      ("--target", rng.choice(["cpu-int9", "", "cuda-int8", "cpu-fp32"])),
                                      ("--explain", rng.choice(["fuse", "nope", ""])),
                                      ("--eval-tokens", rng.choice(["-1", "0", "x"])),
                                      ("--max-ppl-increase", rng.choice(["1", "1%", "-5%", "nan", "x"])),
                                      ("--min-speedup", rng.choice(["0", "-1", "nan", "1e9"]))])
            argv, what = [flag, value], f"{flag} {value!r}"
        rc, stderr, child = run_forked(["compile", str(src / "model.onnx"), "-o", str(out), *argv], root)
        o = Outcome("malformed pipeline/recipe/option", what, rc)
        judge_output(o, stderr, out, existed_before=False)
        if rc != 0:
            o.partial_output |= bool(leftovers(root, child))
        outcomes.append(o)
        shutil.rmtree(out, ignore_errors=True)
    if tree_digest(src) != before:
        outcomes[-1].input_modified = True
    return outcomes


# --------------------------------------------------------------------------- interrupted runs


def interrupted_cases(base: Path, root: Path, n: int, rng: random.Random) -> list[Outcome]:
    """A recompile over a previous artifact (and its --report), interrupted at a random moment."""
    src = private_copy(base, root / "int-in")
    before_in = tree_digest(src)
    out, report = root / "art", root / "report.json"
    rc, stderr, _ = run_forked(["compile", str(src / "model.onnx"), "-o", str(out), "--target", "cpu-fp32",
                             "--report", str(report)], root)
    assert rc == 0, stderr
    started = time.monotonic()
    subprocess.run([PY, "-m", "llmopt", "compile", str(src / "model.onnx"), "-o", str(root / "probe"), "--target", "cpu-int4"],
                   cwd=root, capture_output=True, check=True)
    span = time.monotonic() - started  # a whole compile, the interpreter's start included: signals land anywhere in it
    outcomes = []
    for i in range(n):
        prev_art = tree_digest(out)
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGKILL
        target = rng.choice(["cpu-fp32", "cpu-int8", "cpu-int4"])
        proc = subprocess.Popen([PY, "-m", "llmopt", "compile", str(src / "model.onnx"), "-o", str(out), "--target", target,
                                 "--report", str(report)], cwd=root, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True, preexec_fn=_default_sigint)
        delay = rng.uniform(0.2, span)
        time.sleep(delay)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
        phase = _phase(stderr)
        o = Outcome(f"interrupted recompile ({sig.name})", f"{target}, {sig.name} after {delay:.2f}s, during {phase}",
                    proc.returncode if proc.returncode >= 0 else 128 - proc.returncode)
        # finished: the new artifact is in place (a signal may still land in the interpreter's exit)
        finished = proc.returncode == 0 or (artifact_whole(out) and tree_digest(out) != prev_art)
        o.finished_first = finished
        o.traceback = "Traceback" in stderr if sig == signal.SIGINT else False
        if sig == signal.SIGINT and not finished:
            o.one_line = proc.returncode == 130 and "interrupted" in stderr
            if not o.one_line:
                o.note = stderr[-600:]
        # the artifact at -o: the previous one byte for byte, or a whole new one
        now_whole = artifact_whole(out)
        o.previous_lost = not (tree_digest(out) == prev_art if os.path.isdir(out) else False) and not (finished or now_whole)
        o.partial_output = (os.path.isdir(out) and not now_whole) or not _whole_json(report)
        if sig == signal.SIGINT and not finished:  # Ctrl-C cleans up at once
            o.partial_output |= bool(leftovers(root, proc.pid))
        else:  # SIGKILL cannot: the next run that writes there sweeps
            left = leftovers(root, proc.pid)
            if left:
                from llmopt.core import atomic

                atomic.sweep(out), atomic.sweep(report), atomic.sweep_work_dirs()
                o.partial_output |= bool(leftovers(root, proc.pid))
                o.note = f"{len(left)} leftover(s) of the killed run, swept by the next run"
        o.input_modified = tree_digest(src) != before_in
        outcomes.append(o)
    return outcomes


def _default_sigint() -> None:
    """Background jobs of a shell start with SIGINT ignored; a user's terminal delivers it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _whole_json(path: Path) -> bool:
    try:
        data = path.read_bytes()
        json.loads(data)
        return True
    except (OSError, ValueError):
        return False


def _phase(stderr: str) -> str:
    for line in reversed(stderr.splitlines()):
        word = line.split(" ", 1)[0]
        if word in ("load", "pass", "save", "verify", "speed", "eval", "export"):
            return word
        if line.startswith("compiled "):
            return "done"
    return "start-up"


# --------------------------------------------------------------------------- summary

KINDS = {"damaged": damaged_model_cases, "pipeline": malformed_pipeline_cases, "interrupt": interrupted_cases}


def _preload() -> None:
    """Import what every case imports, once, before forking (children start warm, and no thread yet)."""
    import onnxruntime  # noqa: F401

    import llmopt.cli.app  # noqa: F401
    import llmopt.compiler.driver  # noqa: F401
    from llmopt.core.registry import all_passes, all_targets

    all_passes(), all_targets()


def run(base: Path, cases: dict[str, int], seed: int = 0) -> dict:
    _preload()
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="llmopt-faults-") as tmp:
        for kind, n in cases.items():
            if n:
                root = Path(tmp) / kind
                root.mkdir()
                outcomes += KINDS[kind](base, root, n, rng)
    table: dict[str, dict] = {}
    for o in outcomes:
        row = table.setdefault(o.kind, {"cases": 0, "exit 0": 0, "exit 1": 0, "exit 2": 0, "exit 130": 0, "killed": 0,
                                        "finished first": 0, "tracebacks": 0, "not one line": 0, "inputs modified": 0, "partial outputs": 0,
                                        "previous artifacts lost": 0})
        row["cases"] += 1
        key = f"exit {o.rc}" if f"exit {o.rc}" in row else "killed"
        row[key] += 1
        row["finished first"] += o.finished_first
        row["tracebacks"] += o.traceback
        row["not one line"] += not o.one_line
        row["inputs modified"] += o.input_modified
        row["partial outputs"] += o.partial_output
        row["previous artifacts lost"] += o.previous_lost
    return {"seed": seed, "table": table, "bad": [dataclasses.asdict(o) for o in outcomes if o.bad],
            "cases": [dataclasses.asdict(o) for o in outcomes]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="an .onnx export with model.onnx.data-style external data")
    ap.add_argument("--damaged", type=int, default=17)
    ap.add_argument("--pipeline", type=int, default=10)
    ap.add_argument("--interrupt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the summary and every case here")
    a = ap.parse_args(argv)
    result = run(a.model, {"damaged": a.damaged, "pipeline": a.pipeline, "interrupt": a.interrupt}, a.seed)
    text = json.dumps(result, indent=2)
    if a.json:
        a.json.write_text(text)
    print(json.dumps(result["table"], indent=2))
    for b in result["bad"]:
        print("BAD", b, file=sys.stderr)
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
