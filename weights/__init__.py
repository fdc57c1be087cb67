"""Model weights: the manifest of supported checkpoints, their bundled configs, and finding, pulling and
verifying local copies.

Data plus a small module with no torch dependency, so the server, the CLI and the benchmarks can ask where
the weights are (or build the architecture from the bundled configs) without loading a model.
The command line lives in `weights.cli` (`stepimage weights ...` or `python -m weights ...`).
"""

from .manifest import (
    CHECKPOINTS,
    CONFIG_COMPONENTS,
    DEFAULT_CHECKPOINT,
    Checkpoint,
    UnknownCheckpoint,
    checkpoint_names,
    get_checkpoint,
    load_bundled_config,
)
from .store import (
    PullFailed,
    VerificationFailed,
    VerifyReport,
    WeightsError,
    WeightsNotFound,
    checkpoint_dir,
    default_weights_dir,
    find_checkpoint,
    hf_cache_dir,
    list_checkpoints,
    pull,
    pull_command,
    verify,
)

__all__ = [
    "CHECKPOINTS",
    "CONFIG_COMPONENTS",
    "DEFAULT_CHECKPOINT",
    "Checkpoint",
    "PullFailed",
    "UnknownCheckpoint",
    "VerificationFailed",
    "VerifyReport",
    "WeightsError",
    "WeightsNotFound",
    "checkpoint_dir",
    "checkpoint_names",
    "default_weights_dir",
    "find_checkpoint",
    "get_checkpoint",
    "hf_cache_dir",
    "list_checkpoints",
    "load_bundled_config",
    "pull",
    "pull_command",
    "verify",
]
