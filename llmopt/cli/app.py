"""The `llmopt` command line (typer).

An ``LlmoptError`` is printed as one line (``error: ...``) with its exit code
(2 for bad input, 1 for a missed accuracy budget); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from llmopt.errors import LlmoptError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="llmopt: compile LLMs (ONNX or Hugging Face) into fast, verified ONNX Runtime artifacts.",
)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory (config.json + weights), or 'reference'"),
    output: Path = typer.Option(..., "-o", "--output", help="the .onnx file to write (weights go to <file>.data)"),
    with_past: bool = typer.Option(False, "--with-past", help="add KV-cache inputs/outputs (past_key_values.*, present.*)"),
    verbose: bool = typer.Option(False, "--verbose", help="show the exporter's own log"),
):
    """Export a Hugging Face causal LM to ONNX (torch.onnx dynamo), logits output."""
    from llmopt.frontend.exporter import export as do_export

    path = do_export(model_dir, output, with_past=with_past, verbose=verbose)
    print(f"wrote {path} (+ {path.name}.data)")


@app.command()
def compile(  # noqa: A001
    model: str = typer.Argument(..., help="an .onnx file, a directory holding model.onnx, a Hugging Face model directory, or 'reference'"),
    target: str = typer.Option("cpu-int8", "--target", "-t", help="see `llmopt targets`"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="artifact directory (default: <model>-<target>)"),
    passes: Optional[str] = typer.Option(None, "--passes", help="pipeline replacing the target's, e.g. 'fold,cleanup,quantize-dynamic'"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="TOML recipe replacing the target's pipeline"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="compare compiled vs source in ONNX Runtime"),
    verify_each: bool = typer.Option(False, "--verify-each", help="checker + numeric check after every pass"),
    with_past: bool = typer.Option(True, "--with-past/--no-past", help="for Hugging Face inputs: export with KV-cache I/O"),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="text for perplexity (default: the model's eval.txt if it has one)"),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", help="tokens of the eval text to use"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure single-token latency, source vs compiled"),
    threshold: list[str] = typer.Option([], "--threshold", help="override a verify threshold, e.g. --threshold min_cosine=0.999 (repeatable)"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write the report JSON here (written on failure too)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON instead of a summary"),
    explain: list[str] = typer.Option([], "--explain", help="say why a pass's rules did not fire, e.g. --explain fuse (repeatable)"),
    plugin: list[Path] = typer.Option([], "--plugin", help="a Python file defining passes to use in --passes (repeatable)"),
    trust_plugins: bool = typer.Option(False, "--trust-plugins", help="skip the checks run after each plugin pass (checker, ORT, logits)"),
    max_ppl_increase: Optional[str] = typer.Option(None, "--max-ppl-increase", help="gate: fail (exit 1) if perplexity rises more, e.g. 1% (needs --eval-text)"),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="gate: fail (exit 1) if single-token speedup vs source is lower, e.g. 2.0"),
):
    """Compile a model for a target: run the pipeline, write the artifact, verify it."""
    from llmopt.compiler.driver import compile as do_compile
    from llmopt.compiler.gates import parse_fraction
    from llmopt.compiler.options import CompileOptions
    from llmopt.errors import VerificationError

    options = CompileOptions(
        target=target, out=output, passes=passes, recipe=recipe, verify_model=verify, verify_each=verify_each,
        with_past=with_past, eval_text=eval_text, eval_tokens=eval_tokens, measure_speed=speed,
        report_path=report, thresholds=_parse_thresholds(threshold), progress=None if as_json else _progress,
        explain=tuple(explain), plugins=tuple(plugin), check_plugins=not trust_plugins,
        max_ppl_increase=None if max_ppl_increase is None else parse_fraction(max_ppl_increase),
        min_speedup=min_speedup,
    )
    try:
        art = do_compile(model, options=options)
    except VerificationError as exc:
        if as_json and exc.report is not None:
            print(json.dumps(exc.report, indent=2, default=str))
        raise
    if as_json:
        print(json.dumps(art.manifest, indent=2, default=str))
    else:
        from llmopt.reporting.summary import format_compile_report

        print(format_compile_report(art.manifest, art.path))


def _parse_thresholds(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise LlmoptError(f"--threshold '{item}' is not KEY=NUMBER (e.g. min_cosine=0.999)")
    return out


@app.command()
def passes(
    as_json: bool = typer.Option(False, "--json"),
    plugin: list[Path] = typer.Option([], "--plugin", help="also load the passes of this Python file (repeatable)"),
):
    """List every registered pass: name, summary, options with defaults, and where plugins come from."""
    from llmopt.core.plugins import load_plugin_file
    from llmopt.core.registry import BUILTIN, all_passes, origin

    for p in plugin:
        load_plugin_file(p)
    table = {name: {"summary": cls.summary, "module": cls.__module__, "origin": origin(name),
                    "options": cls.describe_options()} for name, cls in all_passes().items()}
    if as_json:
        print(json.dumps(table, indent=2, default=str))
        return
    for name, info in table.items():
        print(f"{name:<18} {info['summary']}" + ("" if info["origin"] == BUILTIN else f"  [{info['origin']}]"))
        for o in info["options"]:
            default = ";".join(map(str, o["default"])) if isinstance(o["default"], tuple) else o["default"]
            print(f"    {o['name'] + '=' + str(default):<28} {o['help']} ({o['type']})")


@app.command()
def targets(as_json: bool = typer.Option(False, "--json")):
    """List every target: name, provider, pipeline, what it emits."""
    from llmopt.core.registry import all_targets

    table = {name: t.as_dict() for name, t in all_targets().items()}
    if as_json:
        print(json.dumps(table, indent=2))
        return
    for name, t in table.items():
        print(f"{name:<12} {t['description']}")
        print(f"    provider:  {t['provider']}")
        print(f"    pipeline:  {t['pipeline']}")
        th = ", ".join(f"{k}={v}" for k, v in t["thresholds"].items() if v is not None)
        print(f"    verify:    {th} (on {', '.join(t['verify_providers'])})")
        print(f"    emits:     {', '.join(t['emits'])}")


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="an .onnx file or a directory holding model.onnx"),
    as_json: bool = typer.Option(False, "--json"),
    sparsity: bool = typer.Option(False, "--sparsity", help="also read the weights and report zeros per tensor"),
):
    """Op histogram, parameters by dtype, I/O signature, KV-cache bytes/token (weights are not read unless --sparsity)."""
    from llmopt.frontend.inspector import format_inspection, inspect_model

    info = inspect_model(model, sparsity=sparsity)
    print(json.dumps(info, indent=2) if as_json else format_inspection(info))


@app.command()
def generate(
    artifact: Path = typer.Argument(..., help="a compiled artifact (directory) or an .onnx file with KV-cache I/O"),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="prompt text (repeat for a batch; needs the artifact's tokenizer)"),
    prompt_ids: list[str] = typer.Option([], "--prompt-ids", help="comma-separated token ids (repeat for a batch)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    greedy: bool = typer.Option(True, "--greedy/--sample", help="argmax, or sample with --temperature/--top-k/--top-p"),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    as_json: bool = typer.Option(False, "--json", help="print tokens, text and timings as JSON"),
):
    """Generate text with a compiled decoder (KV cache kept in ONNX Runtime between steps)."""
    from llmopt.cli.generate import run_generate

    run_generate(artifact, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_k, top_p, seed, threads, as_json)


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="a compiled artifact (directory) or an .onnx file with KV-cache I/O"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="a model or artifact to measure alternately (an uncompiled .onnx runs in a naive loop)"),
    prompt_len: int = typer.Option(128, "--prompt-len"),
    new_tokens: int = typer.Option(100, "--new-tokens"),
    batch: str = typer.Option("1", "--batch", help="batch sizes, e.g. 1,4,8"),
    repeats: int = typer.Option(3, "--repeats"),
    threads: int = typer.Option(2, "--threads"),
    as_json: bool = typer.Option(False, "--json"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write latency per token vs position (needs matplotlib)"),
):
    """Load time, prefill and decode tokens/s, ms/token p50/p90, KV-cache bytes, peak RSS, roofline."""
    from llmopt.ort.bench import BenchSettings, benchmark, format_bench, plot_steps, progress_bar

    try:
        sizes = tuple(int(b) for b in batch.split(","))
    except ValueError:
        raise LlmoptError(f"--batch '{batch}' is not comma-separated integers (e.g. 1,4,8)") from None
    settings = BenchSettings(prompt_len=prompt_len, new_tokens=new_tokens, batches=sizes, repeats=repeats, threads=threads)
    if plot is not None:
        from llmopt.compiler import preflight
        from llmopt.core import model_io

        models = [artifact] + ([baseline] if baseline is not None else [])
        preflight.check([("model", f) for m in models for f in model_io.model_files(m)], [preflight.Output("--plot", plot)])
        plot_steps(None, plot)  # fail before measuring if matplotlib is missing
    report = benchmark(artifact, baseline, settings, progress=None if as_json else progress_bar())  # == llmopt.benchmark().to_dict()
    if not as_json:
        print(file=sys.stderr)
    if plot is not None:
        plot_steps(report, plot)
    print(json.dumps(report, indent=2) if as_json else format_bench(report))


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="a compiled artifact (directory) or an .onnx file"),
    text: Path = typer.Option(..., "--text", help="a UTF-8 text file (tokenized with the model's tokenizer)"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="another model (e.g. the source) to evaluate on the same tokens"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="directory with tokenizer.json (default: the model's)"),
    tokens: int = typer.Option(8192, "--tokens", help="tokens of the text to use"),
    window: int = typer.Option(128, "--window", help="tokens per window (non-overlapping)"),
    max_ppl_increase: Optional[str] = typer.Option(None, "--max-ppl-increase", help="gate vs --baseline: exit 1 if perplexity rises more, e.g. 1%"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Perplexity on a text, computed in ONNX Runtime (and a baseline's, on the same tokens)."""
    from llmopt.api import evaluate
    from llmopt.compiler.gates import GateError, parse_fraction
    from llmopt.reporting.format import fmt_fixed, fmt_pct

    result = evaluate(model, text, baseline=baseline, tokenizer=tokenizer, tokens=tokens, window=window,
                      max_ppl_increase=None if max_ppl_increase is None else parse_fraction(max_ppl_increase))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        line = f"perplexity {fmt_fixed(result.perplexity, 4)} over {result.tokens} tokens ({model})"
        if result.baseline is not None:
            line += (f"; baseline {fmt_fixed(result.baseline_perplexity, 4)} ({result.baseline}), "
                     f"change {fmt_pct(result.perplexity_change)}")
        print(line)
    if not result.passed:
        raise GateError("; ".join(g["text"] for g in result.gates if not g["passed"]), result.to_dict())


@app.command()
def report(
    artifact: Path = typer.Argument(..., help="a compiled artifact (directory), or a compile report .json (e.g. a failed compile's --report)"),
    html: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML report here"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="write a Markdown report here"),
    bench_json: Optional[Path] = typer.Option(None, "--bench", help="a `llmopt bench ARTIFACT --json` output: adds latency per token vs position"),
):
    """A report to read: pass timeline, size/speed/accuracy, op histogram before/after, plots."""
    from llmopt.reporting.html_report import write_report

    for path in write_report(artifact, html, markdown, bench_json):
        print(f"wrote {path}")


@app.command()
def compare(
    a: Path = typer.Argument(..., help="a compiled artifact (directory)"),
    b: Path = typer.Argument(..., help="another compiled artifact"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Two artifacts' reports side by side: size, speed, accuracy, verification, op counts."""
    from llmopt.reporting.compare import compare_artifacts

    text, table = compare_artifacts(a, b)
    print(json.dumps(table, indent=2, default=str) if as_json else text)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that cleanup (``finally``) runs as for Ctrl-C."""


_signalled: list[int] = []  # the signals this process received (a library may turn Ctrl-C into another error)


def _on_signal(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()


INTERRUPTED = "interrupted; nothing was written (a previous output at that path is unchanged)"


def _after_interrupt() -> None:
    """What a second signal inside a ``finally`` could have left: this process's temporary folders."""
    from llmopt.core import atomic

    if not threading_main():
        atomic.remove_own_work_dirs()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut this short
    try:
        atomic.remove_own_work_dirs()
    finally:
        signal.signal(signal.SIGINT, previous)


def _install_signal_handlers() -> None:
    if not threading_main():
        return
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the shell ignores it (nohup, &)
        signal.signal(signal.SIGINT, _on_signal)


def main(argv: list[str] | None = None) -> None:
    import logging

    _install_signal_handlers()
    # onnx_ir's shape inference logs a traceback when ONNX's inference gives up (it then leaves the
    # model as it was, and so does llmopt); a user should not read that as a crash
    logging.getLogger("onnx_ir.passes.common.shape_inference").setLevel(logging.ERROR)
    try:
        code = app(args=argv, standalone_mode=False)  # typer turns Ctrl-C into a returned 130
        if code == 130:
            raise KeyboardInterrupt
    except LlmoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt, Terminated):  # click turns Ctrl-C into Abort
        _after_interrupt()
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors (typer may bundle its own click) carry their own exit code
        if _signalled:  # e.g. Ctrl-C while onnxruntime's extension initializes surfaces as ImportError
            _after_interrupt()
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(130)
        if _is_usage_error(exc):
            if exc.exit_code == 0:  # --help and friends
                exc.show()
                sys.exit(0)
            ctx = getattr(exc, "ctx", None)
            command = f"llmopt {ctx.info_name} --help" if ctx is not None and ctx.parent is not None else "llmopt --help"
            print(f"error: {exc.format_message()} (see `{command}`)", file=sys.stderr)
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _is_usage_error(exc: BaseException) -> bool:
    classes = []
    try:
        import click

        classes.append(click.exceptions.ClickException)
    except ImportError:
        pass
    try:
        from typer._click import exceptions as bundled  # typer >= 0.20 vendors click

        classes.append(bundled.ClickException)
    except ImportError:
        pass
    return isinstance(exc, tuple(classes))


if __name__ == "__main__":
    main()
