"""Export a Hugging Face model directory to ONNX with Hugging Face Optimum, the exporter most ONNX LLMs
on the Hub come from (TorchScript-based ``torch.onnx.export``, past key values as inputs and outputs).

Optimum's ONNX exporter needs transformers < 4.58 and llmopt's venv has transformers 5, so Optimum lives
in a venv of its own, outside the repository (``--venv``, default /work/venvs/optimum). This script
builds that venv on first use and runs the exporter in it as a subprocess: the equivalent of

    optimum-cli export onnx --model HF_DIR --task text-generation-with-past OUT_DIR

Run it with llmopt's python:

    python benchmarks/optimum_export.py --hf-dir DIR --out OUT_DIR [--venv DIR] [--task TASK]

It prints the path of the exported model.onnx as its last stdout line (progress and the exporter's own
output go to stderr); on failure it exits 1 with a one-line error on stderr. Other benchmark scripts
import ``export_with_optimum`` from it (``sys.path.insert(0, benchmarks_dir)``).

A model saved by transformers 5 has a config.json that 4.57 partly does not know: its RoPE settings
(``rope_parameters``) are rewritten to the 4.57 keys (``rope_theta``, ``rope_scaling``) in a patched
copy of the directory (weights symlinked, not copied), and a key that 4.57 rejects outright is dropped
there; stderr says which. Without a tokenizer in HF_DIR, none is needed (the task is given); one that
4.57 cannot load (saved by transformers 5) is copied to OUT_DIR as it is.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("LLMOPT_OPTIMUM_VENV", "/work/venvs/optimum"))
DEFAULT_TASK = "text-generation-with-past"

TORCH = "torch==2.13.0"  # the CPU build on this machine's disk (pip's find-links); never a CUDA build
TRANSFORMERS = "transformers==4.57.*"  # Optimum's ONNX exporter needs transformers < 4.58
# optimum-onnx is where the ONNX exporter lives since Optimum 2; optimum 1.x had it built in
OPTIMUM_CHOICES = ("optimum-onnx[onnxruntime]", "optimum[exporters,onnxruntime]<2")
# Optimum dedups tied weights (embedding and lm_head of gpt2, gemma) only with accelerate installed;
# without it the exported file holds both copies and the exporter warns
EXTRAS = ("accelerate",)
# packages this venv pins itself: a global pip constraint on them is left out for this venv
_PINNED = {"torch", "transformers", "optimum", "optimum-onnx", "tokenizers", "huggingface-hub",
           "onnx", "onnxruntime", "safetensors"}

_PROBE = r"""
import json, sys, torch, transformers, onnx, onnxruntime
from importlib.metadata import version, PackageNotFoundError
import optimum.exporters.onnx  # noqa: F401  (the exporter is there)
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "optimum": v("optimum"),
                  "optimum-onnx": v("optimum-onnx"), "accelerate": v("accelerate")}))
"""

# In the Optimum venv: does transformers 4.57 load this config? Prints {"ok": ..., "error": ...}.
_CONFIG_PROBE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from transformers import AutoConfig
try:
    AutoConfig.from_pretrained(sys.argv[1], local_files_only=True)
    print(json.dumps({"ok": True}))
except Exception as e:  # noqa: BLE001
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}))
"""


class OptimumExportError(RuntimeError):
    """The venv could not be built or the exporter failed; the message is one line."""


def _log(msg: str) -> None:
    print(f"optimum_export: {msg}", file=sys.stderr, flush=True)


def _python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def _offline_env() -> dict:
    env = dict(os.environ)
    # nothing is fetched from the Hugging Face Hub: the model is a local directory
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the main venv's packages must not leak into the Optimum venv
    env.pop("VIRTUAL_ENV", None)
    return env


def venv_versions(venv: Path = DEFAULT_VENV) -> dict | None:
    """Versions of torch, transformers, onnx, onnxruntime and optimum(-onnx) in the venv; None if it lacks them."""
    py = _python(venv)
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, env=_offline_env())
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _run_streamed(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[int, list[str]]:
    """Run ``cmd``, copying its stdout and stderr to our stderr; return its exit code and last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            bufsize=1, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))
    return proc.wait(), list(tail)


def _last_error_line(lines: list[str]) -> str:
    """The exporter's last error line: a traceback's closing ``SomeError: ...``, else the last line naming an error."""
    text = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(text):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", ln):
            return ln[:400]
    for ln in reversed(text):
        if re.search(r"error|failed|exception", ln, re.I):
            return ln[:400]
    return text[-1][:400] if text else "(no output)"


def _configured_constraints(py: Path) -> list[Path]:
    """The constraint files pip is configured with (pip config and PIP_CONSTRAINT)."""
    files: list[str] = []
    if os.environ.get("PIP_CONSTRAINT"):
        files += os.environ["PIP_CONSTRAINT"].split()
    else:
        r = subprocess.run([str(py), "-m", "pip", "config", "list"], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            m = re.match(r"^[\w:.-]*constraint\s*=\s*'?(.*?)'?$", line.strip())
            if m:
                files += m.group(1).split()
    return [Path(f) for f in dict.fromkeys(files) if f and f != "/dev/null"]


def _constraints_for_venv(py: Path, venv: Path) -> Path:
    """A constraint file for this venv: the configured ones less any line on a package pinned here."""
    kept, dropped = [], []
    for f in _configured_constraints(py):
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            name = re.split(r"[\s<>=!~;\[]", s, maxsplit=1)[0].lower().replace("_", "-")
            (dropped if name in _PINNED else kept).append(s)
    if dropped:
        _log(f"pip's global constraint(s) {', '.join(dropped)} left out for this venv only: it pins {TORCH} "
             f"and {TRANSFORMERS} itself")
    out = venv / "llmopt-constraints.txt"
    out.write_text("".join(f"{s}\n" for s in kept + [TORCH]))
    return out


def ensure_venv(venv: Path = DEFAULT_VENV) -> dict:
    """Build the Optimum venv at ``venv`` unless it already has Optimum's exporter; return its versions."""
    venv = Path(venv)
    have = venv_versions(venv)
    if have:
        missing = [x for x in EXTRAS if not have.get(x)]
        if missing:
            _log(f"adding {', '.join(missing)} to {venv}")
            env = _offline_env()
            env["PIP_CONSTRAINT"] = str(_constraints_for_venv(_python(venv), venv))
            rc, tail = _run_streamed([str(_python(venv)), "-m", "pip", "install", "-q", "--progress-bar", "off", TORCH,
                                      *missing], env=env)
            if rc != 0:
                _log(f"pip install {' '.join(missing)} failed ({_last_error_line(tail)}); exporting without")
            have = venv_versions(venv) or have
        return have
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _lock(venv.parent / f".{venv.name}.lock"):
        have = venv_versions(venv)  # another process may have built it while we waited
        if have:
            return have
        t0 = time.perf_counter()
        _log(f"building optimum venv at {venv} (one-time, a few minutes)")
        py = _python(venv)
        if not py.exists():
            base = shutil.which("python3.11") or (sys.executable if sys.version_info[:2] == (3, 11) else None)
            if base is None:
                raise OptimumExportError("python3.11 not found: it is needed to build the Optimum venv")
            r = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
            if r.returncode != 0:
                raise OptimumExportError(f"python3.11 -m venv {venv} failed: {_last_error_line((r.stdout + r.stderr).splitlines())}")
        env = _offline_env()
        env["PIP_CONSTRAINT"] = str(_constraints_for_venv(py, venv))
        pip = [str(py), "-m", "pip", "install", "-q", "--progress-bar", "off"]
        _log(f"installing {TORCH} (CPU build)")
        rc, tail = _run_streamed([*pip, TORCH], env=env)
        if rc != 0:
            raise OptimumExportError(f"pip install {TORCH} failed: {_last_error_line(tail)}")
        cuda = subprocess.run([str(py), "-c", "import torch; print(torch.version.cuda)"], capture_output=True, text=True)
        if cuda.stdout.strip() not in ("None", ""):
            raise OptimumExportError(f"pip installed a CUDA build of torch (CUDA {cuda.stdout.strip()}) in {venv}; "
                                     "the CPU build is expected from pip's find-links")
        err = "?"
        for optimum in OPTIMUM_CHOICES:
            _log(f"installing {TRANSFORMERS} {optimum}")
            rc, tail = _run_streamed([*pip, TORCH, TRANSFORMERS, optimum, *EXTRAS], env=env)
            if rc == 0:
                break
            err = _last_error_line(tail)
            _log(f"{optimum} did not install ({err})")
        else:
            raise OptimumExportError(f"pip could not install Optimum's ONNX exporter in {venv}: {err}")
        have = venv_versions(venv)
        if not have:
            raise OptimumExportError(f"{venv} was built but does not import optimum.exporters.onnx")
        _log(f"optimum venv ready in {time.perf_counter() - t0:.0f} s: "
             + ", ".join(f"{k} {v}" for k, v in have.items() if k != "cuda" and v))
        return have


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------- config


def _rope_from_parameters(cfg: dict) -> list[str]:
    """transformers 5 keeps RoPE settings in ``rope_parameters``; 4.57 reads ``rope_theta`` and
    ``rope_scaling`` (and would silently fall back to its default theta). Rewrite in place."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return []
    if rp and all(isinstance(v, dict) for v in rp.values()):  # per layer type (Gemma 3 style)
        rp = rp.get("full_attention") or next(iter(rp.values()))
        if "rope_local_base_freq" not in cfg:
            local = cfg["rope_parameters"].get("sliding_attention", {}).get("rope_theta")
            if local is not None:
                cfg["rope_local_base_freq"] = local
    rp = dict(rp)
    changes = []
    theta = rp.pop("rope_theta", None)
    if theta is not None and cfg.get("rope_theta") != theta:
        cfg["rope_theta"] = theta
        changes.append(f"rope_theta={theta}")
    partial = rp.pop("partial_rotary_factor", None)
    if partial is not None and "partial_rotary_factor" not in cfg:
        cfg["partial_rotary_factor"] = partial
        changes.append(f"partial_rotary_factor={partial}")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default" and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = rp
        changes.append(f"rope_scaling={json.dumps(rp)}")
    del cfg["rope_parameters"]
    return ["rope_parameters -> " + (", ".join(changes) or "4.57 defaults (rope_type default)")]


def _symlinked_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name != "config.json":
            (dst / item.name).symlink_to(item.resolve())


def _check_config(py: Path, model_dir: Path) -> str | None:
    r = subprocess.run([str(py), "-c", _CONFIG_PROBE, str(model_dir)], capture_output=True, text=True,
                       env=_offline_env())
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return _last_error_line((r.stdout + r.stderr).splitlines())
    return None if out["ok"] else out["error"]


def prepare_source(hf_dir: Path, venv: Path, work: Path) -> Path:
    """``hf_dir`` itself if transformers 4.57 reads its config as it is; else a copy under ``work``
    (weights symlinked) whose config.json is patched, with stderr saying how."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    patched = json.loads(json.dumps(cfg))
    notes = _rope_from_parameters(patched)
    py = _python(venv)
    src = hf_dir
    if notes:
        src = work / "hf"
        _symlinked_copy(hf_dir, src)
        (src / "config.json").write_text(json.dumps(patched, indent=2))
    # then drop, one at a time, the keys that 4.57 rejects outright
    for _ in range(len(patched)):
        err = _check_config(py, src)
        if err is None:
            break
        bad = [k for k in patched if k != "model_type" and re.search(rf"\b{re.escape(k)}\b", err)]
        if not bad:
            raise OptimumExportError(f"transformers 4.57 cannot read {hf_dir / 'config.json'}: {err}")
        if src == hf_dir:
            src = work / "hf"
            _symlinked_copy(hf_dir, src)
        key = bad[0]
        notes.append(f"dropped {key}={json.dumps(patched.pop(key))} ({err[:160]})")
        (src / "config.json").write_text(json.dumps(patched, indent=2))
    else:
        raise OptimumExportError(f"transformers 4.57 cannot read {hf_dir / 'config.json'} even patched")
    if notes:
        _log(f"config.json patched for transformers 4.57 in a copy at {src}: " + "; ".join(notes))
    return src


# ---------------------------------------------------------------------------------------- export


def export_with_optimum(hf_dir: str | Path, out_dir: str | Path, venv: str | Path = DEFAULT_VENV,
                        task: str = DEFAULT_TASK) -> Path:
    """Export ``hf_dir`` (a Hugging Face model directory) to ``out_dir`` with Optimum's ONNX exporter,
    as ``optimum-cli export onnx --model hf_dir --task task out_dir`` does, run in the venv ``venv``
    (built on first use). Returns the path of ``out_dir/model.onnx``; raises OptimumExportError."""
    hf_dir, out_dir, venv = Path(hf_dir).resolve(), Path(out_dir).resolve(), Path(venv)
    if not (hf_dir / "config.json").is_file():
        raise OptimumExportError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    ensure_venv(venv)
    with tempfile.TemporaryDirectory(prefix="optimum-export-") as work:
        src = prepare_source(hf_dir, venv, Path(work))
        out_dir.mkdir(parents=True, exist_ok=True)
        # --library-name and --framework: no guessing from Hub metadata; with the task given, a
        # directory without a tokenizer needs none (Optimum copies one only if it finds one)
        cmd = [str(_python(venv)), "-m", "optimum.exporters.onnx", "--model", str(src), "--task", task,
               "--library-name", "transformers", "--framework", "pt", str(out_dir)]
        _log("running " + " ".join(cmd))
        t0 = time.perf_counter()
        rc, tail = _run_streamed(cmd, env=_offline_env(), cwd=work)
        if rc != 0:
            raise OptimumExportError(f"optimum's exporter failed on {hf_dir} (exit {rc}): {_last_error_line(tail)}")
    onnx_path = out_dir / "model.onnx"
    if not onnx_path.is_file():
        found = sorted(p.name for p in out_dir.glob("*.onnx"))
        raise OptimumExportError(f"optimum's exporter wrote no model.onnx in {out_dir} (found: {found or 'none'}); "
                                 f"last line: {_last_error_line(tail)}")
    _log(f"exported in {time.perf_counter() - t0:.0f} s")
    _copy_tokenizer_files(hf_dir, out_dir)
    return onnx_path


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json")


def _copy_tokenizer_files(hf_dir: Path, out_dir: Path) -> None:
    """Optimum saves the tokenizer only if transformers 4.57 loads it, and drops it silently if not (as
    for one saved by transformers 5, ``"tokenizer_class": "TokenizersBackend"``): copy the originals then."""
    missing = [n for n in _TOKENIZER_FILES if (hf_dir / n).is_file() and not (out_dir / n).exists()]
    if not missing or any((out_dir / n).exists() for n in _TOKENIZER_FILES):
        return  # no tokenizer there, or Optimum saved its own
    for n in missing:
        shutil.copy2(hf_dir / n, out_dir / n)
    _log(f"optimum saved no tokenizer (transformers 4.57 did not load it): copied {', '.join(missing)} from {hf_dir}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, type=Path, help="Hugging Face model directory (save_pretrained)")
    ap.add_argument("--out", required=True, type=Path, help="output directory (model.onnx, config, tokenizer files)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"the Optimum venv (default {DEFAULT_VENV})")
    ap.add_argument("--task", default=DEFAULT_TASK, help=f"Optimum task (default {DEFAULT_TASK})")
    args = ap.parse_args(argv)
    try:
        path = export_with_optimum(args.hf_dir, args.out, venv=args.venv, task=args.task)
    except OptimumExportError as e:
        print(f"optimum_export: error: {e}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError) as e:
        print(f"optimum_export: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
