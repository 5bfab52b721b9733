"""llama.cpp as the peer: build it from the ``llama-cpp-python`` sdist (cached outside the
repository), convert a Hugging Face directory to GGUF with its own converter, quantize, and run
``llama-bench``. Used by the benchmarks that put llmopt's artifacts side by side with it
(../shared/BENCHMARKING.md says why the build flags are what they are).

    python benchmarks/llamacpp.py build            # prints the bin directory (~10 min on 2 cores, once)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("LLMOPT_PEER_CACHE", Path.home() / ".cache" / "llmopt-peer"))
SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-batched-bench")


def _flags() -> list[str]:
    """AVX-512 where the CPU has it; AMX off (its tiles SIGILL on these VMs); never GGML_NATIVE."""
    cpu = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    on = lambda name, flag: [f"-D{name}={'ON' if flag in cpu else 'OFF'}"]  # noqa: E731
    return (["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]
            + on("GGML_AVX512", "avx512f") + on("GGML_AVX512_VBMI", "avx512vbmi") + on("GGML_AVX512_VNNI", "avx512_vnni")
            + on("GGML_AVX512_BF16", "avx512_bf16") + on("GGML_AVX_VNNI", "avx_vnni")
            + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"])


def source_dir() -> Path:
    """The vendored llama.cpp tree (downloaded and unpacked once)."""
    root = CACHE / "src"
    found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(root)],
                   check=True, capture_output=True)
    with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as tar:
        tar.extractall(root, filter="data")
    return sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def build() -> Path:
    """The bin directory holding llama-bench, llama-quantize and llama-batched-bench."""
    src = source_dir()
    out = CACHE / "build"
    bins = out / "bin"
    if all((bins / t).is_file() for t in TARGETS):
        return bins
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *_flags()], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(out), "-j", str(os.cpu_count() or 2), "--target", *TARGETS], check=True)
    return bins


def version() -> str:
    src = source_dir()
    return f"llama.cpp vendored in {src.parents[1].name}"


def with_tokenizer(hf_dir: Path, out: Path, vocab_size: int) -> Path:
    """A copy of ``hf_dir`` (weights linked) with a synthetic SentencePiece ``tokenizer.model`` of
    ``vocab_size`` pieces, for random-weight models that have no tokenizer of their own."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    out.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.is_file() and not f.name.startswith("tokenizer"):
            target = out / f.name
            if not target.exists():
                target.symlink_to(f.resolve())
    m = sp.ModelProto()
    m.trainer_spec.model_type = sp.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.byte_fallback = True
    for text, kind in (("<unk>", sp.ModelProto.SentencePiece.UNKNOWN), ("<s>", sp.ModelProto.SentencePiece.CONTROL),
                       ("</s>", sp.ModelProto.SentencePiece.CONTROL)):
        m.pieces.add(piece=text, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=sp.ModelProto.SentencePiece.BYTE)
    i = 0
    while len(m.pieces) < vocab_size:
        m.pieces.add(piece=f"▁t{i}", score=-float(i), type=sp.ModelProto.SentencePiece.NORMAL)
        i += 1
    (out / "tokenizer.model").write_bytes(m.SerializeToString())
    return out


def convert(hf_dir: Path, gguf: Path, outtype: str = "f32") -> Path:
    """``convert_hf_to_gguf.py`` on ``hf_dir`` (the directory must have a tokenizer)."""
    src = source_dir()
    if gguf.is_file():
        return gguf
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(gguf),
                    "--outtype", outtype], check=True, env=env, capture_output=True)
    return gguf


def quantize(gguf: Path, out: Path, kind: str) -> Path:
    if not out.is_file():
        subprocess.run([str(build() / "llama-quantize"), str(gguf), str(out), kind], check=True, capture_output=True)
    return out


def _run_bench(gguf: Path, args: list[str], threads: int, repetitions: int) -> dict:
    out = subprocess.run([str(build() / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(repetitions),
                          "-o", "json", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def bench(gguf: Path, prompt: int, new_tokens: int, threads: int = 2, repetitions: int = 1) -> dict:
    """llama-bench's prefill tokens/s (``prompt`` tokens from an empty context) and decode
    tokens/s (``new_tokens`` generated after ``prompt`` tokens of context, ``-d``), as llmopt's
    loop measures them."""
    prefill = _run_bench(gguf, ["-p", str(prompt), "-n", "0"], threads, repetitions)
    decode = _run_bench(gguf, ["-p", "0", "-n", str(new_tokens), "-d", str(prompt)], threads, repetitions)
    return {"prefill_tokens_per_s": prefill["avg_ts"], "decode_tokens_per_s": decode["avg_ts"],
            "build": prefill.get("build_commit"), "cpu": prefill.get("cpu_info")}


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(build())
    else:
        sys.exit(__doc__)
