"""CUDA targets on a GPU: the artifact runs on the CUDA provider, matches the CPU provider's run of
the same graph, keeps perplexity within budget, and generates through the runtime.

Marked `gpu` (excluded from the default run: `pytest -m gpu`); each test skips unless ONNX Runtime
has the CUDA execution provider (`pip install onnxruntime-gpu` on a machine with a GPU). Not yet
run: no GPU has been lent to this project's sessions.
"""

import numpy as np
import pytest

import llmopt
from llmopt.ort import perplexity as pplx
from llmopt.ort import sessions
from llmopt.ort import verify
from llmopt.frontend.exporter import reference_model_dir
from llmopt.ort.generation import Generator

pytestmark = pytest.mark.gpu
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _need_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("ONNX Runtime has no CUDAExecutionProvider here")


@pytest.fixture(scope="module", params=["cuda-fp16", "cuda-int8"])
def artifact(request, tmp_path_factory):
    _need_cuda()
    return llmopt.compile("reference", request.param, tmp_path_factory.mktemp(request.param) / "art",
                          measure_speed=False, eval_tokens=2048)


def test_runs_on_cuda_like_on_cpu(artifact):
    model = llmopt.load(artifact.model_path)
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True))]
    cpu = sessions.run_path(artifact.model_path, feeds)
    gpu = sessions.run_path(artifact.model_path, feeds, providers=CUDA)
    figs = verify.worst([verify.compare(c, g) for c, g in zip(cpu, gpu)])
    assert figs.cosine > 0.999 and figs.top1 > 0.95, figs.as_dict()


def test_perplexity_on_cuda_within_budget(artifact):
    ref = reference_model_dir()
    ids = pplx.tokenize_file(pplx.load_tokenizer(ref), ref / "eval.txt", 2048)
    gpu = pplx.perplexity(sessions.make_session(artifact.model_path, CUDA), ids)["perplexity"]
    source = artifact.report["accuracy"]["source_perplexity"]
    assert gpu / source - 1 < 0.01


def test_generates_on_cuda_like_on_cpu(artifact):
    prompt = [[1, 450, 3186, 310]]
    cpu = Generator(artifact.path).generate(prompt, 16).tokens[0]
    gpu = Generator(artifact.path, providers=CUDA).generate(prompt, 16).tokens[0]
    agree = np.mean(np.asarray(cpu) == np.asarray(gpu))
    assert agree >= 0.75, (cpu, gpu)  # fp16 / int8 kernels may flip a late near-tie
