"""The `reparam` command line: export, explain, list, bench.

    python -m reparam.cli export fastvit_t12 --weights fastvit_t12.pth.tar   # -> fastvit_t12.onnx
    python -m reparam.cli export mypkg.nets:build --input-shape 1,3,224,224 --format pt2
    python -m reparam.cli export fastvit_t12 --format pte                    # ExecuTorch, XNNPACK
    python -m reparam.cli export fastvit_t12 --format coreml                 # .mlpackage
    python -m reparam.cli explain fastvit_t8
    python -m reparam.cli list
    python -m reparam.cli bench fastvit_t12 --batch-size 1 8 --json t12.json

This module only parses arguments, prints and chooses exit codes; models are built by
`reparam.resolve` and written by `reparam.export`. Exit codes: 0 success, 1 a check or the export
failed, 2 a usage error (bad arguments, unknown model, unreadable weights, an output that cannot
be written, an optional package to install...). No Python traceback reaches the user unless -v
(unexpected errors) or --debug (every error) asks for one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from typing import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_EPILOG = """\
MODEL is a registered name (see `reparam list`) or your own model as package.module:factory,
a callable returning an nn.Module (the current folder is importable), e.g. mynets:build_net.

examples:
  reparam export fastvit_t12 --weights fastvit_t12.pth.tar
  reparam export fastvit_t8 -o t8.pt2 --format pt2
  reparam export fastvit_t8 --format pte          # ExecuTorch (XNNPACK): pip install "reparam[executorch]"
  reparam export fastvit_t8 --format coreml       # Core ML .mlpackage: pip install "reparam[coreml]"
  reparam export mynets:build_net --input-shape 1,3,224,224
  reparam explain fastvit_t8
  reparam list
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with `error: ...` messages and exit code 2 (argparse's own convention)."""

    def error(self, message: str):  # noqa: D102
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .export.formats import DEFAULT_FORMAT, FORMATS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show progress and exporter messages; tracebacks of unexpected errors")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full Python traceback of any error")

    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("model", metavar="MODEL",
                            help="registered name (e.g. fastvit_t12) or package.module:factory")
    model_args.add_argument("--weights", metavar="PATH",
                            help="checkpoint to load (.pth, .pth.tar, .safetensors);"
                                 " without it the weights are randomly initialised")
    model_args.add_argument("--image-size", type=_positive_int, metavar="N",
                            help="square input size for models with a registered default"
                                 " (FastViT: 256)")
    model_args.add_argument("--input-shape", metavar="SHAPE",
                            help="full example input shape, batch first, e.g. 1,3,224,224;"
                                 " required for models without a registered input size")

    parser = _Parser(prog="reparam", description="Structural-reparameterization compiler for"
                     " PyTorch: fuse, explain and export models.", parents=[common],
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    formats = "\n".join(f"  {name:<7} .{m.SUFFIX:<10} {m.DESCRIPTION}" for name, m in FORMATS.items())
    exp = sub.add_parser("export", parents=[common, model_args],
                         help="fuse a model and write it as ONNX, torch.export, ExecuTorch or Core ML",
                         description="Fuse MODEL with reparam.fuse, write it in one of these formats,\n"
                         "check the output against the fused and the original model, and move it\n"
                         f"into place only if every check passed.\n\nformats:\n{formats}",
                         epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("-o", "--output", metavar="OUT",
                     help="output file (default: <model>.<format suffix> in this folder)")
    exp.add_argument("--format", choices=list(FORMATS),
                     help=f"output format (default: from the -o suffix, else {DEFAULT_FORMAT})")
    exp.add_argument("--batch-size", type=_positive_int, metavar="N",
                     help="fix the batch size of the output to N (default: a dynamic batch axis"
                          " for onnx and pt2; the example input's batch for pte and coreml)")
    exp.add_argument("--opset", type=_positive_int, metavar="N",
                     help="ONNX opset version (default: the exporter's recommended one)")
    exp.add_argument("--precision", choices=["float16", "float32"],
                     help="Core ML compute precision (default: float16, Core ML's default)")
    exp.add_argument("--deployment-target", metavar="TARGET",
                     help="Core ML minimum deployment target, e.g. iOS17 or macOS14 (default:"
                          " coremltools' default, iOS15)")
    exp.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                     help="ONNX exporter: torch.export + torch.onnx (dynamo, default), or the"
                          " legacy TorchScript tracer, which records only the control flow taken"
                          " for the example input")
    exp.add_argument("--no-verify", action="store_true",
                     help="skip every check (fusion verification, and the checks of the output)")
    exp.add_argument("--force", action="store_true",
                     help="replace an existing output (only once the new one passed its checks)")

    ex = sub.add_parser("explain", parents=[common, model_args],
                        help="show what reparam.fuse would fuse and refuse, with reasons",
                        description="Print the fusion report of MODEL: each fused region with"
                        " the original modules that went into it, each refusal with its reason,"
                        " and node/parameter/MAC counts before and after.")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")

    sub.add_parser("list", parents=[common], help="list the registered models",
                   description="List the registered models with their parameter counts (training"
                   " form) and default input sizes.")
    from .bench import add_bench_parser

    add_bench_parser(sub, parents=[common, model_args])
    return parser


# --------------------------------------------------------------------------------------------


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _load(args, *, batch_size=None):
    from . import resolve

    shape = resolve.parse_input_shape(args.input_shape) if args.input_shape is not None else None
    loaded = resolve.resolve_model(args.model, weights=args.weights, input_shape=shape,
                                   image_size=args.image_size, batch_size=batch_size)
    for note in loaded.notes:
        _warn(note)
    example = loaded.example_input()
    resolve.check_input_accepted(loaded.model, example, name=f"model {args.model!r}")
    return loaded, example


def _weights_notice(args) -> None:
    if args.weights is None:
        _warn(f"no --weights given: the weights of {args.model} are randomly initialised (seed"
              f" {_seed()}); to export a trained model pass a checkpoint, e.g.\n"
              f"  reparam export {args.model} --weights PATH/TO/checkpoint.pth.tar")


def _seed() -> int:
    from .resolve import INIT_SEED

    return INIT_SEED


def cmd_export(args) -> int:
    from . import export as ex

    t0 = time.perf_counter()
    fmt = ex.resolve_format(args.format, args.output)
    options = ex.formats.format_options(fmt, opset=args.opset, exporter=args.exporter,
                                        precision=args.precision,
                                        deployment_target=args.deployment_target)
    if args.input_shape is not None:  # malformed shapes are reported before anything else
        ex.parse_input_shape(args.input_shape)
    # Check the destination and the format's packages before any expensive work. A factory's
    # name is known only after import, so for package.module:factory the default name comes from
    # the spec.
    module = ex.FORMATS[fmt]
    stem = args.model.rpartition(":")[2] if ex.is_factory_spec(args.model) else args.model
    output = args.output if args.output is not None else ex.default_output_path(stem, module.SUFFIX)
    output = ex.check_output_path(output, force=args.force, directory=module.IS_FOLDER)
    ex.formats.require_extras(fmt)
    module.validate(**options)

    say = (lambda m: print(f"[reparam] {m}", file=sys.stderr)) if args.verbose else None
    if say:
        say(f"building {args.model}")
    loaded, example = _load(args, batch_size=args.batch_size)
    _weights_notice(args)
    shape = ",".join(str(d) for d in loaded.input_shape)
    print(f"model: {args.model} ({type(loaded.model).__name__}), example input {shape}, weights:"
          f" {loaded.weights or 'randomly initialised (no --weights)'}")
    result = ex.export_model(loaded.model, example, output, format=fmt, opset=args.opset,
                             batch_size=args.batch_size, verify=not args.no_verify,
                             force=args.force, exporter=args.exporter, precision=args.precision,
                             deployment_target=args.deployment_target, verbose=args.verbose,
                             log=say)
    result.seconds = time.perf_counter() - t0
    print(result.summary())
    norms = sum(n for op, n in result.op_counts.items()
                if op in ("BatchNormalization", "batch_norm"))
    if norms:
        _warn(f"{norms} batch norm operators remain in the output; `reparam explain` says why"
              " they were not fused")
    return EXIT_OK


def cmd_explain(args) -> int:
    from .export.core import quiet
    from .pipeline import explain
    from .resolve import parse_input_shape

    if args.input_shape is not None:
        parse_input_shape(args.input_shape)
    loaded, example = _load(args)
    with quiet(not args.verbose):
        report = explain(loaded.model, example)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        shape = ",".join(str(d) for d in loaded.input_shape)
        print(f"model: {args.model} ({type(loaded.model).__name__}), example input {shape}")
        print(report)
    return EXIT_OK


def cmd_list(args) -> int:
    from . import resolve
    from .export.core import quiet

    models = resolve.models_module()
    rows = []
    for name in resolve.registered_models():
        try:
            with quiet(not args.verbose):
                params = f"{models.num_params(name) / 1e6:.2f}M"
        except Exception:
            params = "?"
        size = resolve.registered_input_size(name)
        entry = getattr(models, "get_entry", lambda n: None)(name)
        rows.append([name, params, "x".join(str(d) for d in size) if size else "-",
                     str(getattr(entry, "description", "") or "")])
    if not rows:
        print("no registered models")
        return EXIT_OK
    header = ["model", "params (unfused)", "input size", "description"]
    if not any(r[3] for r in rows):
        header, rows = header[:3], [r[:3] for r in rows]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"\n{len(rows)} models; export one with `reparam export NAME [--weights PATH]`")
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import run_bench_command

    return run_bench_command(args)


_COMMANDS = {"export": cmd_export, "explain": cmd_explain, "list": cmd_list, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.debug = debug = bool(getattr(args, "debug", False))
    args.verbose = verbose = bool(getattr(args, "verbose", False)) or debug
    try:
        from .errors import InputError, ReparamError, first_line
        from .optional import MissingExtra
    except Exception as exc:  # pragma: no cover - broken installation
        _err(f"cannot import reparam: {exc}")
        return EXIT_FAILED
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # `reparam list | head -1`: the reader went away, not an error
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except (InputError, MissingExtra) as exc:
        if debug:
            traceback.print_exc()
        _err(str(exc))
        return EXIT_USAGE
    except ReparamError as exc:
        if debug:
            traceback.print_exc()
        _err(f"{_kind(exc)}{exc}")
        return EXIT_FAILED
    except MemoryError:
        if debug or verbose:
            traceback.print_exc()
        _err("out of memory; try a smaller --batch-size or --image-size")
        return EXIT_FAILED
    except Exception as exc:  # unexpected: one line, and how to see more
        if debug or verbose:
            traceback.print_exc()
        _err(f"unexpected {type(exc).__name__}: {first_line(exc)[:300]}")
        if not (debug or verbose):
            print("rerun with -v (or --debug) to see the traceback", file=sys.stderr)
        return EXIT_FAILED


def _kind(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "VerificationError":
        return "the fused model disagrees with the original: "
    if name == "TraceFailure":
        return "cannot trace the model: "
    return ""


if __name__ == "__main__":
    sys.exit(main())
