"""`stepimage bench <tool>`: one entry point for the benchmark tools."""

from __future__ import annotations

import argparse
import importlib
import sys

TOOLS = {
    "serving": ("benchmarks.serving", "latency and throughput of any OpenAI-style image endpoint"),
    "pipeline": ("benchmarks.pipeline", "per-stage timings of the model backend, no HTTP"),
    "overhead": ("benchmarks.overhead", "what the HTTP server adds on top of the pipeline"),
    "encode": ("benchmarks.encode_bench", "PNG/JPEG/WebP encoding cost"),
    "extensions": ("benchmarks.extensions", "what partial images and masks add per request"),
}


def add_bench_arguments(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark tool (serving, pipeline, overhead, encode, extensions)"
    )
    parser.add_argument("tool", choices=sorted(TOOLS), help="; ".join(f"{k}: {v[1]}" for k, v in TOOLS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own options (see --help after the tool)")
    parser.set_defaults(func=lambda args: run(args.tool, args.args))


def run(tool: str, argv: list[str]) -> int:
    module = importlib.import_module(TOOLS[tool][0])
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        sys.stderr.write(f"usage: python -m benchmarks {{{','.join(sorted(TOOLS))}}} [options]\n")
        return 2
    return run(argv[0], argv[1:])
