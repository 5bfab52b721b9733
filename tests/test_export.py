"""torch.onnx (dynamo) export of every architecture, checked against transformers in ORT."""

import numpy as np
import pytest
import torch

import llmopt
from llmopt import verify
from llmopt.errors import InputError, OutputError
from llmopt.exporter import export, load_hf_model
from llmopt.models.architectures import ARCHITECTURES


@pytest.mark.parametrize("with_past", [False, True], ids=["no-past", "past"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_matches_transformers(hf_dirs, exported, arch, with_past):
    path = exported(arch, with_past)
    assert path.with_name(path.name + ".data").is_file()
    model = llmopt.load(path)
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    layers = 2
    if with_past:
        past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        assert inputs == ["input_ids", "attention_mask", "position_ids", *past]
        assert outputs == ["logits", *[n.replace("past_key_values", "present") for n in past]]
    else:
        assert inputs == ["input_ids", "attention_mask"] and outputs == ["logits"]
    hf = load_hf_model(hf_dirs(arch))
    sess = verify.make_session(path)
    for shape in verify.default_shapes(with_past):
        feeds = verify.sample_inputs(model, shape, seed=3)
        got = verify.run(sess, feeds)
        kwargs = {"input_ids": torch.from_numpy(feeds["input_ids"]), "attention_mask": torch.from_numpy(feeds["attention_mask"])}
        if with_past:
            from transformers import DynamicCache

            cache = DynamicCache(config=hf.config)
            for i in range(layers):
                cache.update(torch.from_numpy(feeds[f"past_key_values.{i}.key"]), torch.from_numpy(feeds[f"past_key_values.{i}.value"]), i)
            kwargs.update(position_ids=torch.from_numpy(feeds["position_ids"]), past_key_values=cache, use_cache=True)
        with torch.no_grad():
            want = hf(**kwargs)
        np.testing.assert_allclose(got["logits"], want.logits.numpy(), atol=1e-4, rtol=1e-4)
        if with_past:
            np.testing.assert_allclose(got["present.1.value"], want.past_key_values.layers[1].values.numpy(), atol=1e-5)


def test_export_errors(tmp_path, hf_dirs):
    with pytest.raises(InputError, match="no such directory"):
        export(tmp_path / "missing", tmp_path / "m.onnx")
    with pytest.raises(InputError, match="not a Hugging Face model directory"):
        export(tmp_path, tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="ending in .onnx"):
        export(hf_dirs("llama"), tmp_path / "m.txt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InputError, match="no weights"):
        export(tmp_path / "bad", tmp_path / "m.onnx")
    assert not list(tmp_path.glob("*.onnx*"))
