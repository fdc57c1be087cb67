"""The `stepimage` command: `serve` runs the API server, `weights` manages checkpoints.

Every `serve` flag is generated from a `Settings` field, so each one also has its STEPIMAGE_<NAME>
environment variable and the two can never drift apart. Flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from pydantic import ValidationError

from server.config import Settings

# List settings take one value per flag, repeated; their flag is the singular name.
_LIST_FLAGS = {"api_keys": "--api-key", "model_aliases": "--model-alias", "extra_sizes": "--extra-size"}
# Lists that also read naturally as one comma-separated flag value.
_COMMA_FLAGS = {"devices": "--devices"}


def _flag(name: str) -> str:
    return _LIST_FLAGS.get(name) or _COMMA_FLAGS.get(name) or "--" + name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for name, info in Settings.model_fields.items():
        env = f"STEPIMAGE_{name.upper()}"
        default = info.get_default(call_default_factory=True)
        # argparse %-formats help text.
        help_text = f"{info.description} [env {env}; default {default!r}]".replace("%", "%%")
        annotation = info.annotation
        if name in _LIST_FLAGS:
            parser.add_argument(_flag(name), dest=name, action="append", help=help_text + " (repeatable)")
        elif annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(_flag(name), dest=name, choices=typing.get_args(annotation), help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


logger = logging.getLogger("stepimage")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # diffusers/transformers progress bars and advice are noise in a server log.
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for problem in exc.errors():
            field = ".".join(str(part) for part in problem["loc"])
            sys.stderr.write(f"stepimage serve: {_flag(field)}: {problem['msg']}\n")
        return 2
    _configure_logging(settings.log_level)
    from server.app import create_app
    from server.storage import StorageConfigError

    try:
        app = create_app(settings, exit_on_load_failure=True)
    except StorageConfigError as exc:  # checked before any model work; one line, no traceback
        sys.stderr.write(f"stepimage serve: {exc}\n")
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # Our middleware logs each request with its id; uvicorn's access log would duplicate it.
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout) + 5,
    )
    DrainingServer(config, drain=app.state.stepimage.drain).run()
    # A model that could not load stops the server (app.py, load()): that must stay a failure.
    return 1 if app.state.stepimage.load_error is not None else 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a first SIGTERM/SIGINT that drains before it stops listening.

    Plain uvicorn closes its sockets at once, so clients of a draining server see refused connections.
    Here the first signal turns /ready to 503 and new image requests to 503 + Retry-After (a load
    balancer moves on), lets queued and running requests finish (up to --drain-timeout), then lets
    uvicorn shut down as usual; the process exits 0. A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit or self._drain_task is not None:
            super().handle_exit(sig, frame)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving yet: nothing to drain
            super().handle_exit(sig, frame)
            return
        logger.info("signal %d: draining (a second signal stops at once)", sig)
        self._drain_task = loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the image API server")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=serve)
    from benchmarks.cli import add_bench_arguments
    from weights.cli import add_weights_arguments

    add_weights_arguments(commands)
    add_bench_arguments(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
