"""Where checkpoint weights live on disk: finding them without the network, fetching them, checking a copy is whole.

Three places can hold a checkpoint, searched in this order: `<weights_dir>/<name>` (where `pull` puts it),
`<weights_dir>` itself when it is a diffusers folder (so `--weights-dir /data/FLUX.2-klein-4B` works), and the
Hugging Face cache (what `from_pretrained` filled on this machine before). Finding and verifying never open a
network connection; only `pull` does. No torch: verification reads safetensors headers, never tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import CHECKPOINTS, Checkpoint, get_checkpoint

logger = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "STEPIMAGE_WEIGHTS_DIR"
PIPELINE_CLASS = "Flux2KleinPipeline"

# The transformer fields that decide which architecture diffusers builds. A snapshot of another FLUX.2 size
# (9B, dev) loads into the same class without complaint until shapes clash deep inside load_state_dict, so
# these are compared up front against the bundled config.
TRANSFORMER_GEOMETRY = (
    "num_layers",
    "num_single_layers",
    "num_attention_heads",
    "attention_head_dim",
    "joint_attention_dim",
    "in_channels",
)

# The safetensors format itself refuses headers above 100 MB; a bigger length field means garbage bytes.
_MAX_HEADER_BYTES = 100_000_000

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class WeightsError(Exception):
    """Base class for the errors of this package."""


class WeightsNotFound(WeightsError, FileNotFoundError):
    """No copy of a checkpoint in any place searched; the message says where it looked and how to fetch it."""

    def __init__(self, message: str, *, searched: list[str], command: str) -> None:
        super().__init__(message)
        self.searched = searched
        self.command = command

    def __str__(self) -> str:
        return str(self.args[0])


class PullFailed(WeightsError):
    """The download did not complete: the Hub unreachable, access refused, or the disk would not take it."""


class VerificationFailed(WeightsError):
    """The files arrived (or were there) but do not make a complete, consistent checkpoint."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(report.summary())
        self.report = report


@dataclass
class VerifyReport:
    """What `verify` found. `missing` and `problems` hold full file paths so a reader can go and look."""

    ok: bool
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    path: Path | None = None
    checked: int = 0

    def summary(self) -> str:
        where = f" at {self.path}" if self.path is not None else ""
        if self.ok:
            return f"complete{where} ({self.checked} files checked)"
        lines = [f"incomplete{where}: {len(self.missing)} missing, {len(self.problems)} problem(s)"]
        lines += [f"  missing: {item}" for item in self.missing]
        lines += [f"  problem: {item}" for item in self.problems]
        return "\n".join(lines)


def default_weights_dir() -> Path:
    """`$STEPIMAGE_WEIGHTS_DIR` if set, else `~/.cache/stepimage/weights`; read at call time, not import time."""
    configured = os.environ.get(ENV_WEIGHTS_DIR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "stepimage" / "weights"


def checkpoint_dir(weights_dir: Path | str, checkpoint: Checkpoint | str) -> Path:
    """Where `pull` puts a checkpoint: one folder per manifest name."""
    return Path(weights_dir).expanduser() / _as_checkpoint(checkpoint).name


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment now.

    huggingface_hub computes this once at import; reading the variables again lets a caller (or a test) that
    sets HF_HUB_CACHE / HF_HOME afterwards be honoured. The precedence is the library's own.
    """
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def pull_command(checkpoint: Checkpoint | str, weights_dir: Path | str) -> str:
    """The exact shell command that fetches `checkpoint` into `weights_dir`."""
    name = _as_checkpoint(checkpoint).name
    return f"stepimage weights pull {name} --weights-dir {shlex.quote(str(weights_dir))}"


def find_checkpoint(
    checkpoint: Checkpoint | str,
    weights_dir: Path | str | None = None,
    *,
    hf_cache: bool = True,
) -> Path:
    """The folder holding `checkpoint`'s diffusers layout. Never touches the network.

    Finding is not verifying: a folder is accepted once it has a model_index.json; `verify` says whether the
    rest is there. Raises WeightsNotFound listing every place searched and the command that fetches them.
    """
    ckpt = _as_checkpoint(checkpoint)
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    searched: list[str] = []

    named = checkpoint_dir(root, ckpt)
    if (named / "model_index.json").is_file():
        logger.debug("found %s at %s", ckpt.name, named)
        return named
    searched.append(f"{named}: no model_index.json")

    index = root / "model_index.json"
    if index.is_file():
        distilled = _index_is_distilled(index)
        # A folder of the other klein variant must not stand in for this one; an unreadable index is
        # accepted here so that verify can say what is wrong with it.
        if distilled is None or distilled == ckpt.is_distilled:
            logger.debug("found %s as the diffusers folder %s", ckpt.name, root)
            return root
        searched.append(
            f"{root}: a diffusers folder, but its model_index.json says is_distilled={str(distilled).lower()}, "
            f"so it is not {ckpt.name}"
        )
    else:
        searched.append(f"{root}: no model_index.json")

    if hf_cache:
        cached, note = _find_in_hf_cache(ckpt)
        if cached is not None:
            return cached
        searched.append(note)

    command = pull_command(ckpt, root)
    message = "\n".join(
        [f"weights for {ckpt.name} ({ckpt.repo_id} at {ckpt.revision[:12]}) not found. Looked in:"]
        + [f"  - {place}" for place in searched]
        + [
            f"Fetch them (about {ckpt.download_size}) on a machine that can reach the Hugging Face Hub with:",
            f"  {command}",
        ]
    )
    raise WeightsNotFound(message, searched=searched, command=command)


def verify(path: Path | str, checkpoint: Checkpoint | str) -> VerifyReport:
    """Check that `path` holds a complete, uncorrupted copy of `checkpoint` without loading any tensor.

    Every expected file must be present and non-empty, every shard named by a `*.safetensors.index.json`
    present, every safetensors header readable and consistent with its file's size (which catches an
    interrupted download), and the pipeline class, distillation flag and transformer geometry must be those
    of `checkpoint`.
    """
    ckpt = _as_checkpoint(checkpoint)
    root = Path(path).expanduser()
    missing: list[str] = []
    problems: list[str] = []
    if not root.is_dir():
        return VerifyReport(ok=False, problems=[f"{root}: not a directory"], path=root)

    checked = 0
    for relative in ckpt.expected_files:
        target = root / relative
        if not target.is_file():
            missing.append(str(target))
            continue
        checked += 1
        if target.stat().st_size == 0:
            problems.append(f"{target}: empty file")
            continue
        if relative.endswith(".safetensors.index.json"):
            checked += _check_sharded(target, missing, problems)
        elif relative.endswith(".safetensors"):
            try:
                _read_safetensors_header(target)
            except ValueError as exc:
                problems.append(f"{target}: {exc}")

    index = root / "model_index.json"
    if index.is_file() and index.stat().st_size:
        _check_model_index(index, ckpt, problems)
    transformer_config = root / "transformer" / "config.json"
    if transformer_config.is_file() and transformer_config.stat().st_size:
        _check_transformer_geometry(transformer_config, ckpt, problems)

    return VerifyReport(ok=not missing and not problems, missing=missing, problems=problems, path=root, checked=checked)


def pull(
    checkpoint: Checkpoint | str,
    weights_dir: Path | str,
    *,
    token: str | None = None,
    progress: bool = True,
) -> Path:
    """Download `checkpoint` at its pinned revision into `<weights_dir>/<name>`, then verify it.

    snapshot_download resumes: files already complete are skipped and partial ones continue, so re-running
    after an interruption costs only what is left. HF_TOKEN and HF_ENDPOINT apply as they do for
    huggingface_hub (HF_ENDPOINT read now, so a mirror set after import still counts). Raises PullFailed when
    the download does not complete and VerificationFailed when it completes but the copy is not whole.
    """
    from huggingface_hub import snapshot_download

    ckpt = _as_checkpoint(checkpoint)
    root = Path(weights_dir).expanduser()
    target = checkpoint_dir(root, ckpt)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        with _progress_bars(progress):
            snapshot_download(
                ckpt.repo_id,
                revision=ckpt.revision,
                local_dir=target,
                allow_patterns=list(ckpt.allow_patterns),
                token=token,
                endpoint=endpoint,
            )
    except Exception as exc:
        reason = _explain_pull_failure(exc, ckpt, root, target)
        if reason is None:
            raise
        raise PullFailed(reason) from exc

    report = verify(target, ckpt)
    if not report.ok:
        raise VerificationFailed(report)
    return target


def list_checkpoints(weights_dir: Path | str | None = None) -> list[dict[str, Any]]:
    """Every manifest checkpoint with its local status: "present", "incomplete" or "absent", and its path.

    For an absent checkpoint the path is where `pull` would put it.
    """
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    rows: list[dict[str, Any]] = []
    for ckpt in CHECKPOINTS:
        try:
            path = find_checkpoint(ckpt, root)
        except WeightsNotFound:
            status, path = "absent", checkpoint_dir(root, ckpt)
        else:
            status = "present" if verify(path, ckpt).ok else "incomplete"
        rows.append(
            {
                "name": ckpt.name,
                "repo_id": ckpt.repo_id,
                "revision": ckpt.revision,
                "default": ckpt.is_default,
                "description": ckpt.description,
                "size": ckpt.download_size,
                "size_bytes": ckpt.download_bytes,
                "status": status,
                "path": str(path),
            }
        )
    return rows


def _as_checkpoint(checkpoint: Checkpoint | str) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else get_checkpoint(checkpoint)


def _load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _index_is_distilled(index: Path) -> bool | None:
    """model_index.json's is_distilled; absent means False, the pipeline's default. None if unreadable."""
    try:
        data = _load_json(index)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return bool(data.get("is_distilled", False))


def _find_in_hf_cache(ckpt: Checkpoint) -> tuple[Path | None, str]:
    """A snapshot of `ckpt.repo_id` in the Hugging Face cache, read from its on-disk layout only.

    The pinned revision is preferred; failing that the snapshot `refs/main` points at, then any other. A
    machine that ran `from_pretrained` before the pin moved still has usable weights, and verify checks their
    geometry, so refusing them would only force a needless 16 GB download.
    """
    repo_folder = hf_cache_dir() / ("models--" + ckpt.repo_id.replace("/", "--"))
    snapshots = repo_folder / "snapshots"
    if not snapshots.is_dir():
        return None, f"Hugging Face cache {repo_folder}: not cached"

    candidates = [snapshots / ckpt.revision]
    ref = repo_folder / "refs" / "main"
    with contextlib.suppress(OSError):
        candidates.append(snapshots / ref.read_text(encoding="utf-8").strip())
    others = [entry for entry in snapshots.iterdir() if entry.is_dir() and entry not in candidates]
    candidates += sorted(others, key=lambda entry: entry.stat().st_mtime, reverse=True)

    for candidate in candidates:
        if (candidate / "model_index.json").is_file():
            if candidate.name != ckpt.revision:
                logger.warning(
                    "using cached snapshot %s of %s, not the pinned revision %s",
                    candidate.name,
                    ckpt.repo_id,
                    ckpt.revision,
                )
            return candidate, ""
    return None, f"Hugging Face cache {snapshots}: no snapshot with a model_index.json (pinned {ckpt.revision})"


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check it against the file's size; no tensor is read.

    Layout: 8 bytes little-endian u64 header length, that many bytes of JSON, then the tensor data, whose extent
    the header's data_offsets give. A file shorter than header + data is a truncated download. Raises
    ValueError naming the first inconsistency.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"only {size} bytes, too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"corrupt safetensors header: its length field says {header_len} bytes")
        if 8 + header_len > size:
            raise ValueError(f"truncated: the header alone needs {8 + header_len} bytes, the file holds {size}")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt safetensors header: not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("corrupt safetensors header: not a JSON object")

    data_end = 0
    tensors = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        data_end = max(data_end, _tensor_extent(name, entry))
        tensors += 1
    if tensors == 0:
        raise ValueError("the safetensors header lists no tensors")
    expected = 8 + header_len + data_end
    if size < expected:
        raise ValueError(
            f"truncated: the header describes {expected} bytes, the file holds {size} (interrupted download?)"
        )
    if size > expected:
        raise ValueError(f"the header describes {expected} bytes, but the file holds {size}")
    return header


def _tensor_extent(name: str, entry: Any) -> int:
    """The end offset of one header entry, after checking its fields agree with each other."""
    if not isinstance(entry, dict):
        raise ValueError(f"corrupt safetensors header: entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (
        not isinstance(dtype, str)
        or not isinstance(shape, list)
        or not all(isinstance(dim, int) and dim >= 0 for dim in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(offset, int) for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"corrupt safetensors header: entry {name!r} is malformed")
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None:
        count = 1
        for dim in shape:
            count *= dim
        if count * itemsize != offsets[1] - offsets[0]:
            raise ValueError(f"corrupt safetensors header: {name!r} ({dtype} {shape}) does not fit its offsets")
    return int(offsets[1])


def _check_sharded(index: Path, missing: list[str], problems: list[str]) -> int:
    """Check every shard a `*.safetensors.index.json` names, and that each holds the tensors assigned to it."""
    try:
        data = _load_json(index)
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("empty weight_map")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"{index}: unreadable shard index ({exc})")
        return 0

    checked = 0
    for shard in sorted({str(name) for name in weight_map.values()}):
        # An index is data from the network: a shard name must stay inside the component's folder.
        if Path(shard).name != shard:
            problems.append(f"{index}: shard name {shard!r} is not a plain file name")
            continue
        target = index.parent / shard
        if not target.is_file():
            missing.append(str(target))
            continue
        checked += 1
        try:
            header = _read_safetensors_header(target)
        except ValueError as exc:
            problems.append(f"{target}: {exc}")
            continue
        absent = [tensor for tensor, owner in weight_map.items() if owner == shard and tensor not in header]
        if absent:
            problems.append(
                f"{target}: {len(absent)} tensor(s) that {index.name} assigns to it are not in it (first: {absent[0]})"
            )
    return checked


def _json_object_or_problem(path: Path, problems: list[str]) -> dict | None:
    """The JSON object in `path`, or None with the reason recorded in `problems`."""
    try:
        data = _load_json(path)
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: not readable JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return data


def _check_model_index(index: Path, ckpt: Checkpoint, problems: list[str]) -> None:
    data = _json_object_or_problem(index, problems)
    if data is None:
        return
    class_name = data.get("_class_name")
    if class_name != PIPELINE_CLASS:
        problems.append(f"wrong model: model_index.json says {class_name} ({index}); expected {PIPELINE_CLASS}")
    if "is_distilled" in data and bool(data["is_distilled"]) != ckpt.is_distilled:
        kind = "distilled" if data["is_distilled"] else "non-distilled"
        problems.append(
            f"{index}: is_distilled is {str(data['is_distilled']).lower()}, a {kind} checkpoint, "
            f"but {ckpt.name} is {'distilled' if ckpt.is_distilled else 'non-distilled'}"
        )


def _check_transformer_geometry(config_path: Path, ckpt: Checkpoint, problems: list[str]) -> None:
    actual = _json_object_or_problem(config_path, problems)
    if actual is None:
        return
    expected = ckpt.config("transformer")
    for name in TRANSFORMER_GEOMETRY:
        if name not in actual:
            problems.append(f"{config_path}: {name} is absent, expected {expected[name]} for {ckpt.name}")
        elif actual[name] != expected[name]:
            problems.append(f"{config_path}: {name} is {actual[name]}, expected {expected[name]} for {ckpt.name}")


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence huggingface_hub's progress bars for the duration, restoring the previous global setting."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _explain_pull_failure(exc: BaseException, ckpt: Checkpoint, root: Path, target: Path) -> str | None:
    """A sentence for a failed download, or None when `exc` is not a download failure (a bug: let it raise)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    offline_hint = (
        f"on an offline machine copy a snapshot into {target}, then run "
        f"`stepimage weights verify {ckpt.name} --weights-dir {shlex.quote(str(root))}`"
    )
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)

    if isinstance(exc, GatedRepoError) or status in (401, 403):
        return (
            f"the Hugging Face Hub refused access to {ckpt.repo_id} (HTTP {status}): the repository may be gated "
            f"or need a token. Accept its terms on the Hub, then set HF_TOKEN or pass --token."
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {ckpt.revision} of {ckpt.repo_id} is not on {endpoint}; is HF_ENDPOINT a complete mirror?"
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"{ckpt.repo_id} was not found on {endpoint} (HTTP {status}); if it is private or gated, set HF_TOKEN "
            f"or pass --token"
        )
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, OfflineModeIsEnabled) or isinstance(cause, OfflineModeIsEnabled):
        return f"downloads are disabled because HF_HUB_OFFLINE is set; unset it, or {offline_hint}"
    if isinstance(exc, (LocalEntryNotFoundError, HfHubHTTPError, ConnectionError, TimeoutError)) or _is_transport_error(
        exc
    ):
        detail = _short(cause if isinstance(exc, LocalEntryNotFoundError) and cause is not None else exc)
        return f"could not reach the Hugging Face Hub at {endpoint} ({detail}); {offline_hint}"
    if isinstance(exc, OSError):
        return f"could not write the weights to {target} ({_short(exc)})"
    return None


def _is_transport_error(exc: BaseException) -> bool:
    # huggingface_hub has used requests and two generations of httpx; their transport errors share no base
    # class with OSError, so they are recognised by the package that raised them.
    return type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3"}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
