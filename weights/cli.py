"""The `stepimage weights` commands: pull, verify and list checkpoints from a terminal.

`add_weights_arguments` plugs them into the main `stepimage` parser; `main` runs them on their own
(`python -m weights list`). Each command returns an exit code: 0 success, 1 weights missing or incomplete,
2 the pull failed (Hub unreachable, access refused, disk).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .manifest import DEFAULT_CHECKPOINT, checkpoint_names, get_checkpoint
from .store import (
    PullFailed,
    VerificationFailed,
    WeightsNotFound,
    checkpoint_dir,
    default_weights_dir,
    find_checkpoint,
    list_checkpoints,
    pull,
    verify,
)

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_PULL_FAILED = 2


def add_weights_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `weights` command, with its pull/verify/list subcommands, to an existing subparsers object."""
    parser = subparsers.add_parser(
        "weights",
        help="pull, verify and list model weights",
        description="Fetch checkpoints from the Hugging Face Hub, or check a copy brought in by hand.",
    )
    _add_commands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights",
        description="Fetch checkpoints from the Hugging Face Hub, or check a copy brought in by hand.",
    )
    _add_commands(parser)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def cmd_pull(args: argparse.Namespace) -> int:
    checkpoint = get_checkpoint(args.name)
    weights_dir = _weights_dir(args)
    target = checkpoint_dir(weights_dir, checkpoint)
    print(
        f"Pulling {checkpoint.name} ({checkpoint.repo_id} at {checkpoint.revision[:12]}, about "
        f"{checkpoint.download_size}) into {target}.\n"
        "An interrupted pull resumes where it stopped when run again."
    )
    try:
        path = pull(checkpoint, weights_dir, token=args.token, progress=not args.quiet)
    except PullFailed as exc:
        print(f"pull failed: {exc}", file=sys.stderr)
        return EXIT_PULL_FAILED
    except VerificationFailed as exc:
        print(f"{checkpoint.name} downloaded but is {exc.report.summary()}", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"{checkpoint.name} is ready at {path}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    checkpoint = get_checkpoint(args.name)
    try:
        path = find_checkpoint(checkpoint, _weights_dir(args))
    except WeightsNotFound as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INCOMPLETE
    report = verify(path, checkpoint)
    print(f"{checkpoint.name}: {report.summary()}")
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


def cmd_list(args: argparse.Namespace) -> int:
    rows = list_checkpoints(_weights_dir(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(len(row["name"]) for row in rows)
    print(f"{'NAME':<{width}}  {'STATUS':<10}  {'SIZE':>8}  PATH")
    for row in rows:
        name = row["name"] + (" *" if row["default"] else "")
        print(f"{name:<{width + 2}}{row['status']:<10}  {row['size']:>8}  {row['path']}")
        print(f"{'':<{width + 2}}{row['repo_id']} @ {row['revision'][:12]}: {row['description']}")
    print("* default checkpoint")
    return EXIT_OK


def _add_name_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "name",
        nargs="?",
        default=DEFAULT_CHECKPOINT,
        choices=checkpoint_names(),
        metavar="NAME",
        help=f"{what} (default: {DEFAULT_CHECKPOINT})",
    )


def _add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="weights_command", metavar="COMMAND", required=True)
    names = checkpoint_names()
    dir_help = f"weights directory (default: $STEPIMAGE_WEIGHTS_DIR or {default_weights_dir()})"

    pull_parser = commands.add_parser("pull", help="download a checkpoint at its pinned revision, then verify it")
    _add_name_argument(pull_parser, f"checkpoint to fetch: {', '.join(names)}")
    pull_parser.add_argument("--weights-dir", type=Path, default=None, metavar="DIR", help=dir_help)
    pull_parser.add_argument(
        "--token",
        default=None,
        help="Hugging Face token for gated repositories (default: $HF_TOKEN or the saved login)",
    )
    pull_parser.add_argument("--quiet", action="store_true", help="no download progress bars")
    pull_parser.set_defaults(func=cmd_pull)

    verify_parser = commands.add_parser("verify", help="check that a local copy is complete, without loading it")
    _add_name_argument(verify_parser, "checkpoint to check")
    verify_parser.add_argument("--weights-dir", type=Path, default=None, metavar="DIR", help=dir_help)
    verify_parser.set_defaults(func=cmd_verify)

    list_parser = commands.add_parser("list", help="list supported checkpoints and whether they are here")
    list_parser.add_argument("--weights-dir", type=Path, default=None, metavar="DIR", help=dir_help)
    list_parser.add_argument("--json", action="store_true", help="machine-readable output")
    list_parser.set_defaults(func=cmd_list)


def _weights_dir(args: argparse.Namespace) -> Path:
    # Resolved when the command runs, not when the parser is built, so the environment at run time counts.
    return Path(args.weights_dir) if args.weights_dir is not None else default_weights_dir()


if __name__ == "__main__":
    sys.exit(main())
