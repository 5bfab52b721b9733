"""The same rewrite as rules.py, written against onnx-graphsurgeon and run through llmopt's adapter.

torch's export guards softmax against all-masked rows with Where(IsNaN(p), 0, p); a causal mask
never masks a whole row, so the guard is dead weight in every attention block.
"""

from llmopt.core.graphsurgeon import GraphSurgeonPass


class DropNanGuardGS(GraphSurgeonPass):
    name = "drop-nan-guard-gs"
    summary = "Remove Where(IsNaN(p), 0, p) after attention softmax (example plugin, onnx-graphsurgeon)"

    def run_graph(self, graph):
        for where in [n for n in graph.nodes if n.op == "Where"]:
            cond, _zero, p = where.inputs
            guard = cond.inputs[0] if cond.inputs else None
            if guard is None or guard.op != "IsNaN" or guard.inputs[0] is not p:
                continue
            if not (p.inputs and p.inputs[0].op == "Softmax"):
                continue
            out = where.outputs[0]
            for consumer in list(out.outputs):  # rewire every reader of the guarded value to p
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = p
            graph.outputs = [p if t is out else t for t in graph.outputs]
            where.outputs.clear()
            self.count("guards_removed")
        graph.cleanup().toposort()
        return graph
