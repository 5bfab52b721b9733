import pytest

from llmopt.errors import PipelineError
from llmopt.core.pipeline import FixedPoint, PassSpec, load_recipe, parse, to_toml


def test_parse_names_and_options():
    p = parse("fold, cleanup{cse=false} ,quantize-dynamic{per_channel=true,min_elements=10}")
    assert p.items == (
        PassSpec("fold"),
        PassSpec("cleanup", (("cse", "false"),)),
        PassSpec("quantize-dynamic", (("per_channel", "true"), ("min_elements", "10"))),
    )
    assert str(p) == "fold,cleanup{cse=false},quantize-dynamic{per_channel=true,min_elements=10}"


def test_parse_fixpoint_nested():
    p = parse("fixpoint{max_iterations=3}(fold,cleanup),quantize-dynamic")
    assert p.items[0] == FixedPoint((PassSpec("fold"), PassSpec("cleanup")), 3)
    assert [s.name for s in p.pass_specs()] == ["fold", "cleanup", "quantize-dynamic"]
    assert parse(str(p)) == p


@pytest.mark.parametrize(
    "text, column",
    [("fold,,cleanup", 6), ("fold{a=1", 9), ("fold{=1}", 6), ("fold cleanup", 6), ("fixpoint(fold", 14), ("{x=1}", 1)],
)
def test_malformed_pipeline_points_at_column(text, column):
    with pytest.raises(PipelineError, match=rf"at column {column}:"):
        parse(text)


@pytest.mark.parametrize("text", ["", "   ", "fixpoint{max_iterations=0}(fold)", "fold{a=1,a=2}", "fixpoint{n=2}(fold)"])
def test_bad_pipelines(text):
    with pytest.raises(PipelineError):
        parse(text)


def test_validate_unknown_pass_and_option():
    with pytest.raises(PipelineError, match="unknown pass 'fodl' \\(did you mean 'fold'\\?\\)"):
        parse("fodl").validate()
    with pytest.raises(PipelineError, match="pass 'fold' has no option 'bogus'"):
        parse("fold{bogus=1}").validate()
    with pytest.raises(PipelineError, match="must be an integer, got 'many'"):
        parse("fold{input_size_limit=many}").validate()
    with pytest.raises(PipelineError, match="must be true or false"):
        parse("cleanup{cse=maybe}").validate()
    parse("fold{input_size_limit=10},cleanup{cse=off}").validate()


def test_recipe_round_trip(tmp_path):
    p = parse("fold,fixpoint{max_iterations=4}(cleanup{cse=false},fold),quantize-dynamic{exclude=lm_head*;*embed*}")
    f = tmp_path / "r.toml"
    f.write_text(to_toml(p))
    q = load_recipe(f)
    assert str(q) == str(p)
    q.validate()


def test_recipe_typed_values(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[[passes]]\nname = "quantize-dynamic"\noptions = { per_channel = false, min_elements = 16 }\n')
    p = load_recipe(f)
    p.validate()
    assert p.items[0].options == (("per_channel", False), ("min_elements", 16))


@pytest.mark.parametrize(
    "content, match",
    [
        ("not toml [", "not valid TOML"),
        ("x = 1", "needs a \\[\\[passes\\]\\]"),
        ("[[passes]]\nopts = 1", "has no name"),
        ('[[passes]]\nname = "fold"\nextra = 1', "unknown key"),
    ],
)
def test_bad_recipes(tmp_path, content, match):
    f = tmp_path / "r.toml"
    f.write_text(content)
    with pytest.raises(PipelineError, match=match):
        load_recipe(f)
