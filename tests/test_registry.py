"""Plugins: a pass installed by another distribution appears through the entry-point group."""

import json
import subprocess
import sys
import textwrap


def test_entry_point_plugin_pass_is_listed_and_runs(tmp_path, exported):
    (tmp_path / "my_llmopt_plugin.py").write_text(textwrap.dedent('''
        import onnx_ir as ir
        from llmopt.core.pass_base import Pass

        class CountNodes(Pass):
            name = "count-nodes"
            summary = "Count nodes (a plugin pass)."

            def run(self, model: ir.Model) -> bool:
                self.count("nodes", len(list(model.graph)))
                return False
    '''))
    dist = tmp_path / "my_llmopt_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-llmopt-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmopt.passes]\ncount-nodes = my_llmopt_plugin:CountNodes\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "llmopt", "passes"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "count-nodes" in res.stdout and "Count nodes (a plugin pass)." in res.stdout
    res = subprocess.run([sys.executable, "-m", "llmopt", "compile", str(exported("llama", False)), "-o", str(tmp_path / "o"),
                          "--passes", "count-nodes", "--no-speed", "--json"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    record = next(r for r in json.loads(res.stdout)["passes"] if r["name"] == "count-nodes")
    assert record["counters"] == {"nodes": record["nodes_before"]} and record["nodes_before"] > 0
    assert record["modified"] is False and record["nodes_after"] == record["nodes_before"]
