import dataclasses
from typing import Literal

import pytest

from llmopt.errors import PipelineError
from llmopt.core.pass_base import Pass, make_options, option
from llmopt.core.registry import all_passes, get_pass, register_pass


@dataclasses.dataclass(frozen=True)
class Opts:
    n: int = option(1, "a count")
    f: float = option(0.5, "a ratio")
    mode: Literal["a", "b"] = option("a", "a choice")
    names: tuple[str, ...] = option((), "patterns")
    limit: int | None = option(None, "optional")

    def __post_init__(self):
        if self.n < 0:
            raise ValueError("n must be >= 0")


def test_make_options_coerces_strings():
    o = make_options(Opts, {"n": "3", "f": "0.25", "mode": "b", "names": "x*;y", "limit": "7"})
    assert o == Opts(3, 0.25, "b", ("x*", "y"), 7)
    assert make_options(Opts, {"limit": "none"}).limit is None


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"n": "1.5"}, "must be an integer"),
        ({"mode": "c"}, "must be one of a, b"),
        ({"n": "-1"}, "n must be >= 0"),
        ({"nope": 1}, "has no option 'nope'"),
        ({"f": "x"}, "must be a number"),
    ],
)
def test_make_options_errors(raw, match):
    with pytest.raises(PipelineError, match=match):
        make_options(Opts, raw, "demo")


def test_builtins_registered_with_summaries_and_options():
    passes = all_passes()
    assert {"fold", "cleanup", "quantize-dynamic"} <= set(passes)
    for name, cls in passes.items():
        assert cls.name == name and cls.summary
        for o in cls.describe_options():
            assert o["help"], f"{name}.{o['name']} has no help"


def test_register_rejects_name_clash():
    class Other(Pass):
        name = "fold"
        summary = "clash"

    with pytest.raises(ValueError, match="taken"):
        register_pass(Other)
    assert get_pass("fold") is not Other
