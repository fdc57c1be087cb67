"""`stepimage bench <tool>`: one entry point for the benchmark tools."""

from __future__ import annotations

import argparse
import importlib
import sys

# tool: (module, what it does, modules it needs beyond the server's own dependencies)
TOOLS = {
    "serving": (
        "benchmarks.serving",
        "latency and throughput of any OpenAI-style image endpoint",
        ("httpx", "tqdm", "matplotlib"),
    ),
    "pipeline": ("benchmarks.pipeline", "per-stage timings of the model backend, no HTTP", ("matplotlib",)),
    "memory": ("benchmarks.memory", "GPU memory per serving mode, on paper and measured", ()),
    "overhead": ("benchmarks.overhead", "what the HTTP server adds on top of the pipeline", ("httpx",)),
    "encode": ("benchmarks.encode_bench", "PNG/JPEG/WebP encoding cost", ()),
    "extensions": ("benchmarks.extensions", "what partial images and masks add per request", ()),
    "gpu-kit": (
        "benchmarks.gpu_kit",
        "prepare the GPU kit here, or run it all on a GPU (tests, pipeline, memory, serving)",
        ("httpx", "tqdm", "matplotlib"),
    ),
}
EXTRA_HINT = "pip install 'stepimage[bench]'"


def add_bench_arguments(subparsers) -> None:
    parser = subparsers.add_parser("bench", help=f"run a benchmark tool ({', '.join(TOOLS)})")
    parser.add_argument("tool", choices=sorted(TOOLS), help="; ".join(f"{k}: {v[1]}" for k, v in TOOLS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own options (see --help after the tool)")
    parser.set_defaults(func=lambda args: run(args.tool, args.args))


def missing_modules(tool: str) -> list[str]:
    """The modules `tool` needs that do not import here."""
    missing = []
    for name in TOOLS[tool][2]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run(tool: str, argv: list[str]) -> int:
    missing = missing_modules(tool)
    if missing:
        sys.stderr.write(
            f"stepimage bench {tool} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: {EXTRA_HINT}\n"
        )
        return 2
    module = importlib.import_module(TOOLS[tool][0])
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        sys.stderr.write(f"usage: python -m benchmarks {{{','.join(sorted(TOOLS))}}} [options]\n")
        return 2
    return run(argv[0], argv[1:])
