"""A plain pass with typed options: stamp build information into the model's metadata."""

import dataclasses

import onnx_ir as ir

from llmopt import Pass, option


@dataclasses.dataclass(frozen=True)
class StampOptions:
    key: str = option("llmopt.build", "metadata key to set")
    value: str = option("", "the value (e.g. a CI build id)")

    def __post_init__(self):
        if not self.key:
            raise ValueError("key must not be empty")


class Stamp(Pass):
    name = "stamp"
    summary = "Set a metadata property on the model, e.g. stamp{key=build,value=1234} (example plugin)"
    Options = StampOptions

    def run(self, model: ir.Model) -> bool:
        if model.metadata_props.get(self.options.key) == self.options.value:
            return False  # `modified` is exact: setting the same value again changes nothing
        model.metadata_props[self.options.key] = self.options.value
        self.count("stamped")
        return True
