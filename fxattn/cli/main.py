"""The ``fxattn`` command line: ``inspect | transform | export | bench | demo``.

Errors end the command with one readable line on stderr and exit code 2 (1 for an unexpected
internal error); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..config import DEFAULT_ATOL, DEFAULT_RTOL
from ..errors import ConfigError, FxAttnError, ModelSpecError
from ..export.lowp import DIA_WEIGHT_MODES

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"fxattn: error: {one_line(message)} (see {self.prog} -h)\n")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(message: str) -> str:
    """``message`` as one readable line: no terminal colour codes, no line breaks."""
    return " ".join(_ANSI.sub("", message).split())


def _opset(text: str) -> int:
    import onnx

    value = _positive_int(text)
    newest = onnx.defs.onnx_opset_version()
    if not 7 <= value <= newest:
        raise argparse.ArgumentTypeError(f"expected an ONNX opset from 7 to {newest}, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"num_classes\": 10}'")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="torchvision:NAME, timm:NAME, package.module:factory "
                                      "(imports that module) or a file saved by fxattn")
    parser.add_argument("--model-kwargs", type=_json_object, default={},
                        help="JSON keyword arguments for the model factory")
    parser.add_argument("--input-shape", help="example input shape, e.g. 2,3,224,224 "
                                              "(default: the model's own input size, batch 2)")


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("methods")
    group.add_argument("--dia", action=argparse.BooleanOptionalAction, default=True,
                       help="insert DIA (default: yes)")
    group.add_argument("--ssia", action=argparse.BooleanOptionalAction, default=True,
                       help="attach SSIA to the training graph (default: yes)")
    group.add_argument("--module", choices=["lstm", "se"], default="lstm", help="DIA module")
    group.add_argument("--reduction", type=_positive_int, default=4, help="DIA reduction r")
    group.add_argument("--share", choices=["stage", "channels", "none"], default="stage")
    group.add_argument("--dia-init", choices=["paper", "identity"], default="paper",
                       help="DIA initialisation: paper (default, training from scratch) or "
                       "identity (exactly the original model at first; for trained weights)")
    group.add_argument("--include", action="append", default=[],
                       help="regex on module paths: only these sites get DIA (repeatable)")
    group.add_argument("--exclude", action="append", default=[],
                       help="regex on module paths: these sites get no DIA (repeatable)")
    group.add_argument("--ssia-weight", type=_non_negative_float, default=1.0)
    group.add_argument("--ssia-map", choices=["spatial", "channel"], default="spatial")


def _add_tolerance_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=_non_negative_float, default=DEFAULT_ATOL,
                        help="verification: absolute part of |ort - torch| <= atol + "
                        f"rtol*|torch| (default {DEFAULT_ATOL:g})")
    parser.add_argument("--rtol", type=_non_negative_float, default=DEFAULT_RTOL,
                        help=f"verification: relative part (default {DEFAULT_RTOL:g})")
    parser.add_argument("--no-float64-check", action="store_true",
                        help="do not judge failing outputs against a float64 PyTorch run")


def _methods(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..config import DIA, SSIA

    dia = DIA(args.module, args.reduction, args.share, tuple(args.include),
              tuple(args.exclude), init=args.dia_init) if args.dia else False
    ssia = SSIA(weight=args.ssia_weight, map=args.ssia_map) if args.ssia else False
    return dia, ssia


def _model_and_input(args: argparse.Namespace) -> tuple[Any, Any, str]:
    import torch

    from ..capture.specs import build_model, parse_shape, random_input
    from ..export.detection import detection_targets_for, is_detector, random_detection_batch

    if not args.model.strip():
        raise ModelSpecError("empty model spec; use e.g. torchvision:resnet18 or timm:resnet50")
    if Path(args.model).suffix in (".fxattn", ".pt", ".pth") and not Path(args.model).exists():
        raise ModelSpecError(f"no such file: {args.model}")
    if Path(args.model).suffix in (".fxattn", ".pt", ".pth") or Path(args.model).exists():
        raise ModelSpecError(
            f"{args.model} is a file; this command takes a model spec (torchvision:NAME, "
            "timm:NAME, package.module:factory)"
        )
    built = build_model(args.model, args.model_kwargs)
    shape = parse_shape(args.input_shape) if args.input_shape else built.input_shape
    if is_detector(built.model):  # its own training signature: (images, targets)
        batch, _, height, width = shape
        return built.model, random_detection_batch(
            batch, ((height, width), (width, height)), **detection_targets_for(built.model)
        ), built.spec
    example = random_input(shape)
    if not torch.is_floating_point(example):  # pragma: no cover - random_input is float
        raise ModelSpecError("example input must be floating point")
    return built.model, example, built.spec


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..transform import inspect

    model, example, _ = _model_and_input(args)
    dia, ssia = _methods(args)
    plan = inspect(model, example, dia=dia, ssia=ssia)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(plan)
    if args.correlation or args.heatmap:
        _print_correlation(args, model, example, dia)
    return 0


def _print_correlation(args: argparse.Namespace, model: Any, example: Any, dia: Any) -> None:
    """Attention correlation between the blocks of each stage, on the example batch.

    Per-block attention (``--share none``) is the DIA paper's diagnostic; with shared cells it
    shows how differently one cell attends at the sites it serves. Random weights and random
    inputs give random-model numbers: use it on a trained model for meaningful ones.
    """
    from ..diagnostics import attention_correlation
    from ..errors import AnalysisError
    from ..transform import transform

    if not dia:
        raise AnalysisError("--correlation measures DIA attention; drop --no-dia")
    report = attention_correlation(transform(model, example, dia=dia, ssia=False), example)
    print(report)
    if args.heatmap:
        print(f"heatmap: {report.save_heatmap(args.heatmap)}")


def cmd_transform(args: argparse.Namespace) -> int:
    from ..serialization import save
    from ..transform import strip_ssia, transform

    model, example, spec = _model_and_input(args)
    dia, ssia = _methods(args)
    net = transform(model, example, dia=dia, ssia=ssia)
    module = strip_ssia(net) if args.strip else net
    path = save(module, args.output, example, model_spec=spec, model_kwargs=args.model_kwargs,
                overwrite=args.force)
    kind = "stripped (lean)" if args.strip else "transformed (training)"
    plan = net.fxattn_scope.plan if hasattr(net, "fxattn_scope") else net.plan
    print(f"saved {kind} {spec} to {path}: {len(plan.sites)} DIA sites, "
          f"{len(plan.active_pairs)} SSIA pairs; load with fxattn.load({str(path)!r})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from ..capture.specs import parse_shape, random_input
    from ..export import export_onnx
    from ..serialization import load, read
    from ..transform import strip_ssia, transform

    if Path(args.model).exists() or Path(args.model).suffix in (".fxattn", ".pt", ".pth"):
        payload = read(args.model)
        module = load(args.model)
        shape = parse_shape(args.input_shape) if args.input_shape else (
            tuple(payload["inputs"][0][0]))
        example: Any = random_input(shape)
        if payload.get("scope") and payload.get("example"):  # a scoped model (a detector)
            from ..serialization import _example_from_plain

            example = _example_from_plain(payload["example"]).args
    else:
        model, example, _ = _model_and_input(args)
        if args.original:
            module = model.eval()
        else:
            dia, ssia = _methods(args)
            module = strip_ssia(transform(model, example, dia=dia, ssia=ssia))
    with torch.no_grad():
        report = export_onnx(module, args.output, example, opset=args.opset,
                             exporter=args.exporter, verify=not args.no_verify, atol=args.atol,
                             rtol=args.rtol, float64_check=not args.no_float64_check,
                             overwrite=args.force, dia_weights=args.dia_weights,
                             optimize=args.optimize,
                             outputs=None if args.all_outputs else (args.outputs or "auto"))
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """``fxattn compile``: a lean ONNX file compiled for onnxruntime's CPU provider."""
    from ..deploy import compile_ort_cpu

    module = _reference_module(args.reference) if args.reference and not args.no_verify \
        else None
    report = compile_ort_cpu(args.model, args.output, args.batch,
                             fold_weights=args.fold_weights, drop_copies=args.drop_copies,
                             verify=not args.no_verify, overwrite=args.force, module=module)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def _reference_module(path: str) -> Any:
    """The lean module of a file saved by fxattn (``fxattn transform``, ``fxattn.save``): the
    float64 reference of ``fxattn compile --reference``."""
    from ..errors import CheckpointError
    from ..serialization import load, read
    from ..transform import strip_ssia

    if not Path(path).is_file():
        raise CheckpointError(f"--reference {path}: no such file; give the .fxattn file the "
                              "ONNX model was exported from (fxattn transform --strip)")
    module = load(path)
    return strip_ssia(module) if read(path)["kind"] == "transformed" else module.eval()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(out_dir=Path(args.out), steps=args.steps, size=args.size)
    print(f"files are in {result.out_dir.resolve()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``fxattn bench``: original vs lean, written to ``--out`` as JSON, Markdown and PNG."""
    from ..bench import benchmark
    from ..config import Tolerance

    try:
        batches = [int(part) for part in str(args.batch).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--batch {args.batch!r} is not a comma-separated list of integers, "
                          "e.g. 1,8") from None
    model, example, spec = _model_and_input(args)
    dia, ssia = _methods(args)
    modes = [m for m in str(args.dia_weights or "").split(",") if m]
    engines = [e for e in str(args.engines).split(",") if e]
    result = benchmark(
        model, example, dia=dia, ssia=ssia, batch_sizes=batches, threads=args.threads,
        runs=args.runs, warmup=args.warmup, engines=engines, dia_weights=modes,
        unoptimized=args.unoptimized, spinning=args.spinning, compiled=args.compiled,
        exporter=args.exporter, out_dir=args.out,
        device=args.device, modes=_names(args.modes), precisions=_names(args.precisions),
        train_batch=args.train_batch, ops=args.ops, anchors=args.anchors,
        progress=sys.stderr.isatty(),
        tolerance=Tolerance(args.atol, args.rtol, not args.no_float64_check),
        title=f"{spec}: original vs lean (dia={bool(dia)}, ssia={bool(ssia)})",
        command="fxattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    print(result.to_markdown())
    print(f"wrote {Path(args.out) / 'bench.json'}, bench.md and bench.png")
    return 0


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list (``None``, the device's default, when not given)."""
    return None if text is None else [part for part in text.split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxattn", description="Free attention (DIA + SSIA) for any "
                     "PyTorch model: inspect, transform, export lean ONNX, benchmark.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")

    p = sub.add_parser("inspect", parents=[debug], help="show where DIA and SSIA would go")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--correlation", action="store_true",
                   help="also report the Pearson correlation of attention between the "
                        "blocks of each stage (use --share none for per-block attention)")
    p.add_argument("--heatmap", help="write the correlation heatmap to this PNG file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("transform", parents=[debug], help="transform a model and save it (.fxattn)")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("-o", "--output", required=True, help="output file (.fxattn)")
    p.add_argument("--strip", action="store_true", help="save the lean (SSIA-stripped) module")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=True,
                   help="replace an existing output file (default: yes, atomically)")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("export", parents=[debug],
                       help="export the lean model to ONNX and verify it")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--original", action="store_true", help="export the untransformed model")
    p.add_argument("--opset", type=_opset, default=None,
                   help="ONNX opset (default: the exporter's)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    p.add_argument("--dia-weights", choices=list(DIA_WEIGHT_MODES), default=None,
                   help="store DIA's matrices at this precision (verified with its looser "
                        "tolerance; default: fp32)")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="the exact DIA rewrites for onnxruntime (default: yes)")
    chosen = p.add_mutually_exclusive_group()
    chosen.add_argument("--outputs", nargs="+", metavar="NAME",
                        help="the entries of a mapping output (a Hugging Face ModelOutput) to "
                             "export (default: logits alone where it sits beside others)")
    chosen.add_argument("--all-outputs", action="store_true", help="export every output")
    _add_tolerance_args(p)
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--json", help="also write the export report as JSON to this file")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=True,
                   help="replace an existing output file (default: yes, atomically)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compile", parents=[debug],
                       help="compile a lean ONNX file for onnxruntime's CPU provider (DIA's "
                            "multiply fused into its blocked convolutions; fixed batch)")
    p.add_argument("model", help="the lean .onnx file (from `fxattn export`)")
    p.add_argument("-o", "--output", required=True,
                   help="output .onnx file (runs only in onnxruntime's CPU provider on this "
                        "kind of CPU)")
    p.add_argument("--batch", type=_positive_int, required=True,
                   help="the batch size the compiled model runs at")
    p.add_argument("--fold-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="fold h into the weights of the convolution before DIA's multiply "
                        "where that reads fewer bytes (default: yes)")
    p.add_argument("--drop-copies", action=argparse.BooleanOptionalAction, default=True,
                   help="drop onnxruntime's layout copies of DIA's small vectors (bit-exact; "
                        "default: yes)")
    p.add_argument("--reference", metavar="FILE.fxattn",
                   help="the model the ONNX file was exported from (a file saved by `fxattn "
                        "transform`): where the compiled and portable files differ beyond "
                        "atol + rtol*|ref|, both are compared with it run in float64 (without "
                        "it: with the portable file's own rounding spread)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check against the portable model in onnxruntime")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=True,
                   help="replace an existing output file (default: yes, atomically)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("bench", parents=[debug], help="latency of the original vs the lean model")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("--batch", default="1,8", help="batch sizes, e.g. 1,8")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--runs", type=_positive_int, default=30)
    p.add_argument("--warmup", type=_positive_int, default=5)
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("--engines", default="torch,onnxruntime",
                   help="comma-separated engines to time: torch, onnxruntime")
    _add_tolerance_args(p)
    p.add_argument("--dia-weights", default="",
                   help="also time lean ONNX models with DIA matrices stored as these "
                        "precisions, e.g. int4,int8,fp16 (onnxruntime only)")
    p.add_argument("--unoptimized", action="store_true",
                   help="also time the lean model exported without the exact DIA rewrites "
                        "of fxattn.export.optimize (lean-noopt)")
    p.add_argument("--spinning", action="store_true",
                   help="time onnxruntime with its default spinning worker threads, one live "
                        "session at a time in alternating blocks (default: interleaved "
                        "sessions without spinning)")
    p.add_argument("--compiled", action="store_true",
                   help="also time the lean models compiled for onnxruntime's CPU provider at "
                        "each batch size (<name>-ort-cpu; see `fxattn compile`)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="the ONNX exporter of every model (as `fxattn export`)")
    p.add_argument("--device", default="cpu",
                   help="where PyTorch runs: cpu, cuda or cuda:N (default: cpu); on a GPU, "
                        "onnxruntime runs through its CUDA / TensorRT providers where it has them")
    p.add_argument("--modes", default=None,
                   help="PyTorch modes, comma-separated: eager, cuda-graph, compile (default: "
                        "eager on cpu, all three on cuda)")
    p.add_argument("--precisions", default=None,
                   help="fp32, bf16 (autocast), comma-separated (default: fp32 on cpu, both "
                        "on cuda)")
    p.add_argument("--train-batch", type=_positive_int, default=None,
                   help="also time the training step (forward, loss, backward, SGD) of the "
                        "original, DIA and DIA + SSIA at this batch, with peak memory on a GPU")
    p.add_argument("--ops", action=argparse.BooleanOptionalAction, default=None,
                   help="the aten operators DIA adds per site and SSIA per tap, and on a GPU "
                        "the CUDA kernels per step (default: on for cuda)")
    p.add_argument("--anchors", action="store_true",
                   help="also time an SE-per-block model (DIA(module='se', share='none'))")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", parents=[debug], help="the whole pipeline on torchvision ResNet-18")
    p.add_argument("--out", default="fxattn-demo", help="folder for the ONNX files")
    p.add_argument("--steps", type=_positive_int, default=8, help="training steps")
    p.add_argument("--size", type=_positive_int, default=96, help="image size")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit code (0 ok, 2 bad input, 1 internal error, 130 ^C).

    Never raises (unless ``--debug``): a usage error, an :class:`FxAttnError` or an
    unexpected exception each become one line on stderr.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except FxAttnError as exc:
        if args.debug:
            raise
        print(f"fxattn: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fxattn: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # e.g. --json to a folder that does not exist
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fxattn: error: {where}{one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a traceback
        if args.debug:
            raise
        first = one_line((str(exc).strip().splitlines() or [type(exc).__name__])[0])
        print(f"fxattn: internal error: {type(exc).__name__}: {first} (rerun with --debug "
              "for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
