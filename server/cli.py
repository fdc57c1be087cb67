"""The `stepimage` command: `serve` runs the API server, `weights` manages checkpoints.

Every `serve` flag is generated from a `Settings` field, so each one also has its STEPIMAGE_<NAME>
environment variable and the two can never drift apart. Flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import typing
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from server.config import Settings
from weights.manifest import checkpoint_names

if TYPE_CHECKING:
    from server.app import AppState

# List settings take one value per flag, repeated; their flag is the singular name.
_LIST_FLAGS = {"api_keys": "--api-key", "model_aliases": "--model-alias", "extra_sizes": "--extra-size"}
# Lists that also read naturally as one comma-separated flag value.
_COMMA_FLAGS = {"devices": "--devices"}
# Free-text settings whose valid values are known: the flag lists them (Settings checks the environment's).
_CHOICES = {"checkpoint": checkpoint_names}


def _flag(name: str) -> str:
    return _LIST_FLAGS.get(name) or _COMMA_FLAGS.get(name) or "--" + name.replace("_", "-")


def _human_default(value: object) -> str | None:
    """A default as an operator writes it on a command line, or None when the description says it."""
    if value is None or value == []:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Path):
        home = Path.home()
        return f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for name, info in Settings.model_fields.items():
        env = f"STEPIMAGE_{name.upper()}"
        default = _human_default(info.get_default(call_default_factory=True))
        where = f"env {env}" + (f"; default {default}" if default is not None else "")
        # argparse %-formats help text.
        help_text = f"{info.description} [{where}]".replace("%", "%%")
        annotation = info.annotation
        if name in _LIST_FLAGS:
            parser.add_argument(_flag(name), dest=name, action="append", help=help_text + " (repeatable)")
        elif annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif name in _CHOICES:
            parser.add_argument(_flag(name), dest=name, choices=_CHOICES[name](), help=help_text)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(
                _flag(name), dest=name, choices=typing.get_args(annotation), type=str.lower, help=help_text
            )
        else:
            parser.add_argument(_flag(name), dest=name, help=help_text)


# Settings whose values must never be echoed back, even to the operator's terminal (logs collect it).
SECRET_SETTINGS = frozenset({"api_keys"})


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


logger = logging.getLogger("stepimage")

# Exit statuses of `stepimage serve` (README, "Shutdown").
EXIT_OK = 0  # stopped, and every accepted request finished
EXIT_LOAD_FAILED = 1  # the model could not be loaded
EXIT_USAGE = 2  # an invalid option (argparse uses 2 as well)
EXIT_CANNOT_LISTEN = 3  # uvicorn could not bind the address (its STARTUP_FAILURE)
EXIT_CUT_SHORT = 4  # stopped before every accepted request finished; those got 503 + Retry-After
# Once the engine is idle (or its work was answered 503), requests still open are given this long to finish what
# they are doing (encoding and sending a result, an upload that will then be refused) before they are answered
# 503 and the process exits.
SHUTDOWN_GRACE_S = 5


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Library advice is noise in a server log: diffusers/transformers tips, and with torchao installed (the fp8
    # extra) the kernels it cannot load on this machine and torch's notes on the enums it registers, about seven
    # lines at every start. diffusers and transformers set their own level when first imported (later, on the
    # loading thread), so their verbosity variables are the switch that holds.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for noisy in ("diffusers", "transformers", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _quiet_progress_bars() -> None:
    """No tqdm progress bars in the server log (loading shards, pipeline components, saving the tiny model).

    Both variables are read when the libraries are first imported, which happens later, on the loading thread.
    TQDM_DISABLE covers every tqdm bar, including diffusers' own, which has no switch of its own short of
    importing diffusers (and torch) here, seconds before the server could start listening.
    """
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for problem in exc.errors():
            field = ".".join(str(part) for part in problem["loc"])
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            if isinstance(given, str) and repr(given) not in message and field not in SECRET_SETTINGS:
                message += f", got {given[:100]!r}"
            sys.stderr.write(f"stepimage serve: {_flag(field)}: {message}\n")
        return EXIT_USAGE
    _configure_logging(settings.log_level)
    _quiet_progress_bars()
    from server.app import create_app
    from server.connections import MAX_HEAD_BYTES, protocol_factory
    from server.storage import StorageConfigError

    try:
        app = create_app(settings, exit_on_load_failure=True)
    except StorageConfigError as exc:  # checked before any model work; one line, no traceback
        sys.stderr.write(f"stepimage serve: {exc}\n")
        return EXIT_USAGE
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's lines in the same format as ours, through the root logger.
        log_config=None,
        # Our middleware logs each request with its id; uvicorn's access log would duplicate it.
        access_log=False,
        # "on": a failing lifespan is reported as what it is ("auto" would call it unsupported and go on).
        lifespan="on",
        # h11 explicitly (not "auto", which switches to httptools when that happens to be installed): the header
        # timeout, connection cap and enveloped protocol errors are built on it (server/connections.py).
        http=protocol_factory(header_timeout=settings.header_timeout, max_connections=settings.max_connections),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = DrainingServer(config, app.state.stepimage)
    try:
        server.run()
    except SystemExit as exc:
        # uvicorn could not start (the address is taken, say) and exits with its status: do not wait for the model
        # load going on in its thread first.
        if not app.state.stepimage.loaded:
            _exit_now(exc.code if isinstance(exc.code, int) else EXIT_CANNOT_LISTEN)
        raise
    return server.exit_code()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with our shutdown: a first SIGTERM/SIGINT drains, a second stops at once, a third exits.

    Plain uvicorn closes its sockets at once, so clients of a draining server see refused connections, and its
    second signal only skips waiting for connections to close. Here:

    1. The first signal turns /ready to 503 and new image requests to 503 + Retry-After (a load balancer moves
       on) while the server keeps listening, and lets queued and running requests finish, for up to
       --drain-timeout seconds; whatever is unfinished then is answered 503 + Retry-After.
    2. A second signal answers every queued and running request 503 + Retry-After at once; running work stops at
       its next denoising step.
    Then requests still open (a result being sent, an upload) get SHUTDOWN_GRACE_S seconds, after which they too
    are answered 503 (server/app.py, ShutdownAnswerMiddleware), and the process exits with EXIT_OK, or
    EXIT_CUT_SHORT when any request was answered 503 that way.
    3. A third signal exits at once with EXIT_CUT_SHORT, answering nothing more.

    A signal while the model is still loading stops at once: nothing was accepted yet.
    """

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self._signals = 0
        self._tasks: set[asyncio.Task] = set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Called by signal.signal between two bytecodes of the event loop's thread: only count and schedule here.
        self._signals += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:  # not serving (yet, or any more): nothing to drain
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name, self._signals)

    def _on_signal(self, name: str, count: int) -> None:
        if count >= 3:
            logger.warning("%s a third time: exiting now", name)
            _exit_now(EXIT_CUT_SHORT)
        if not self.state.loaded:
            logger.info("%s: stopping (the model was still loading; nothing to drain)", name)
            self.state.begin_drain()
            self.should_exit = True
            return
        if count == 1:
            logger.info(
                "%s: draining: %d request(s) queued or running may finish within %g s; a second signal stops "
                "at once, answering them 503",
                name,
                self.state.engine.outstanding,
                self.state.settings.drain_timeout,
            )
            self._start(self._then_exit(self.state.drain()))
        else:
            logger.warning(
                "%s again: stopping now; %d request(s) queued or running are answered 503",
                name,
                self.state.engine.outstanding,
            )
            self._start(self._then_exit(self.state.stop_now()))

    def _start(self, coroutine: typing.Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _then_exit(self, stopping: typing.Awaitable[None]) -> None:
        """Await the drain (or the stop) that a signal started, then let uvicorn shut down, whatever happened."""
        try:
            await stopping
        finally:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.stop_requested and not self.should_exit:
            logger.error("stopping: the model could not be loaded")
            # Requests still open (an upload) are answered 503 when the server stops, as after a signal.
            self.state.begin_drain()
            self.should_exit = True
        return await super().on_tick(counter)

    def exit_code(self) -> int:
        if self.state.load_error is not None:
            return EXIT_LOAD_FAILED
        if not self.state.loaded:
            # Stopped while the model was loading: the loading thread cannot be interrupted, and the interpreter
            # would wait for it at exit (minutes for the full-size model) before exiting.
            _exit_now(EXIT_OK)
        if self.state.cut_short:
            logger.warning("stopped with %d request(s) unfinished; they were answered 503", self.state.cut_short)
            return EXIT_CUT_SHORT
        return EXIT_OK


def _exit_now(code: int) -> typing.NoReturn:
    """Exit without waiting for worker threads (a model load, a denoising step) to return."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
