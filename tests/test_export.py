"""torch.onnx (dynamo) export of every architecture, checked against transformers in ORT."""

import numpy as np
import pytest
import torch

import llmopt
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.errors import InputError, OutputError
from llmopt.frontend.exporter import export, load_hf_model
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
    sess = sessions.make_session(path)
    for shape in verify.default_shapes(with_past):
        feeds = verify.sample_inputs(model, shape, seed=3)
        got = sessions.run(sess, feeds)
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


@pytest.mark.parametrize("kw, kv_heads", [({}, 1), ({"multi_query": False}, 4),
                                          ({"new_decoder_architecture": True, "num_kv_heads": 2}, 4)])
def test_kv_geometry_of_multi_query_models(kw, kv_heads):
    """Falcon and GPTBigCode say how many heads their cache holds with their own switches (no num_key_value_heads);
    the exported past inputs must match what its attention caches, or torch.export refuses them."""
    from transformers import AutoConfig

    from llmopt.frontend.exporter import kv_geometry

    cfg = AutoConfig.for_model("falcon", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, **kw)
    assert kv_geometry(cfg) == (2, kv_heads, 16)
    bigcode = AutoConfig.for_model("gpt_bigcode", n_embd=64, n_head=4, n_layer=2, multi_query=kw.get("multi_query", True))
    assert kv_geometry(bigcode)[1] == (1 if kw.get("multi_query", True) else 4)


def test_every_known_architecture_has_a_tiny_config():
    """The coverage sweep's architectures (some with no changes from the tiny defaults: an empty
    EXTRA entry) and the mixture-of-experts ones all give a config; a regression here once broke
    the slow sweep for every architecture without overrides."""
    from llmopt.models.architectures import ARCHITECTURES, EXTRA, MOE, config

    for arch in ARCHITECTURES + tuple(EXTRA) + tuple(MOE):
        cfg = config(arch)
        assert cfg.model_type == arch or arch in ("gemma3_text",), (arch, cfg.model_type)
