"""The server's one Settings object: every option, its default, and its STEPIMAGE_<NAME> variable.

Built once (by the CLI from flags and the environment, or by a test directly) and passed down;
nothing reads the environment anywhere else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.protocol import DEFAULT_SIZES
from weights.manifest import get_checkpoint

_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


def _split_list(value: object) -> object:
    # Lists come from the environment as comma-separated text, from flags as Python lists.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def default_storage_dir() -> Path:
    return Path.home() / ".cache" / "stepimage" / "files"


class Settings(BaseSettings):
    # Infinity would pass every range check, then fail where a size or a duration becomes an integer.
    model_config = SettingsConfigDict(
        env_prefix="STEPIMAGE_", extra="ignore", populate_by_name=True, allow_inf_nan=False
    )

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    backend: Literal["auto", "tiny", "flux2-klein"] = Field(
        "auto", description="auto: flux2-klein when CUDA and weights are present, else tiny."
    )
    device: str | None = Field(None, description="torch device, e.g. cuda:0 or cpu; default cuda:0 if present.")
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Devices to serve from, one model replica each (e.g. cuda:0,cuda:1); default: --device, "
        "else every visible GPU, else cpu.",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights dtype; auto: bf16 on GPUs that support it, else fp16; fp32 on CPU."
    )
    checkpoint: str = Field("flux2-klein-4b", description="Which manifest checkpoint flux2-klein serves.")
    weights_dir: Path | None = Field(
        None, description="Where checkpoints live (default ~/.cache/stepimage/weights, then the HF cache)."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "STEPIMAGE_API_KEYS", "STEPIMAGE_API_KEY"),
        description="Accepted bearer keys (printable ASCII, no spaces); none means an open server.",
    )
    random_weights: bool = Field(
        False, description="flux2-klein: build the full-size architecture with random weights (benchmarks only)."
    )
    compile: bool | None = Field(
        None, description="torch.compile transformer blocks and VAE decoder; default: on for CUDA."
    )
    attention_backend: str | None = Field(None, description="diffusers attention backend, e.g. flash or _native_cudnn.")
    prompt_cache_size: int = Field(32, ge=0, description="Prompt embeddings kept for repeated prompts (0: off).")
    trim_text_encoder: bool = Field(
        False, description="Drop the text-encoder layers the pipeline never reads (exact; saves ~25% of it)."
    )
    quantize: Literal["none", "fp8"] = Field(
        "none",
        description="fp8: the transformer's linear layers in float8 with per-row scales (torchao; needs a GPU of "
        "compute capability 8.9+, bf16 and the fp8 extra).",
    )
    text_encoder_placement: Literal["device", "offload", "cpu"] = Field(
        "device",
        description="Where the text encoder lives: device; offload (CPU memory, moved in only to encode a prompt "
        "not in the prompt cache); cpu (encodes on the CPU). offload/cpu keep its 8.0 GB (6.4 trimmed) off the GPU "
        "between prompts.",
    )
    public_url: str | None = Field(None, description="Origin used in result URLs; default: the request's own.")
    storage_dir: Path = Field(default_factory=default_storage_dir, description="Where url results are kept.")
    url_ttl: int = Field(7200, ge=1, description="Seconds a stored result stays downloadable.")
    storage: Literal["local", "s3"] = Field(
        "local",
        description="Where url results go: local (--storage-dir, this process only) or s3 (--s3-bucket, shared by "
        "every replica; credentials from the usual AWS environment variables, config files or instance role).",
    )
    s3_bucket: str | None = Field(None, validate_default=True, description="Bucket for url results (--storage s3).")
    s3_prefix: str = Field(
        "stepimage/", description="Key prefix of url results in the bucket; the sweep touches nothing outside it."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, SeaweedFS, Ceph, ...), e.g. http://minio:9000; default AWS."
    )
    s3_region: str | None = Field(None, description="The bucket's region; default: from the AWS configuration.")
    storage_min_free_mb: float = Field(
        512.0,
        ge=0,
        description="Local storage: with less free space, url requests get 507 and /ready 503 (0: no threshold).",
    )
    storage_check_interval: float = Field(
        10.0, gt=0, description="Seconds between storage health checks (free space, bucket reachable)."
    )
    max_body_mb: float = Field(64.0, gt=0, description="Largest request body accepted, in MiB.")
    model_name: str = Field("step-image-edit-2", min_length=1, description="The served model name.")
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More names accepted for the same model."
    )
    max_n: int = Field(4, ge=1, description="Most images one request may ask for.")
    max_output_pixels: int = Field(
        4096 * 4096,
        ge=64 * 64,
        description="Most output pixels one request may ask for (n x width x height), refused with 400 before any "
        "work; the default fits one edit of the largest input, 4096x4096, or four 2048x2048.",
    )
    max_edit_images: int = Field(
        4, ge=1, description="Most input images one edit may send (the edited image plus references)."
    )
    extra_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More HEIGHTxWIDTH sizes for generations (multiples of 16)."
    )
    max_queue: int = Field(16, ge=1, description="Requests waiting or running before new ones get 429.")
    max_batch_size: int = Field(4, ge=1, description="Most images one pipeline call makes from compatible requests.")
    batch_wait_ms: float = Field(0.0, ge=0, description="How long a lone request waits for batch company (ms).")
    request_timeout: float = Field(
        300.0, gt=0, description="Seconds a request may take before it gets 504 (clients may ask for less)."
    )
    drain_timeout: float = Field(60.0, ge=0, description="Seconds a shutdown waits for accepted requests.")
    metrics_require_key: bool = Field(False, description="Require an API key for /metrics.")
    warmup: bool = Field(True, description="Run every generation size once before reporting ready.")
    sweep_interval: float = Field(60.0, gt=0, description="Seconds between sweeps of expired results.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe log level shown.")
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's headers, from its connection or its first byte after "
        "a previous response; a silent connection is closed, a partial request gets 408.",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request body may stop arriving before the request gets 408; past them, a body must "
        "also have averaged 16 KiB/s.",
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open between requests."
    )
    max_connections: int = Field(
        512, ge=1, description="Open connections served at once; a request on one more gets 503 with Retry-After."
    )
    ui: bool = Field(True, description="Serve the playground page at / (with --no-ui, / is a 404).")

    @field_validator("api_keys", "model_aliases", "extra_sizes", "devices", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_keys")
    @classmethod
    def _keys_travel_in_headers(cls, keys: list[str]) -> list[str]:
        # A key arrives in an Authorization header, which clients send (and the server reads) as ASCII: any other
        # character, or a space that the header's parsing trims, makes a key that no request can ever match.
        for number, key in enumerate(keys, 1):
            if not all("!" <= char <= "~" for char in key):
                raise ValueError(
                    f"API key {number} of {len(keys)} has a space or a character outside printable ASCII; no "
                    "client could send it in an Authorization header"
                )
        return keys

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("checkpoint")
    @classmethod
    def _known_checkpoint(cls, name: str) -> str:
        # Checked whatever the backend, so that a typo is an error at start, not a setting silently unused.
        get_checkpoint(name)
        return name

    @field_validator("extra_sizes")
    @classmethod
    def _sizes_well_formed(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            match = _SIZE.match(size)
            if not match or any(int(side) % 16 or not 64 <= int(side) <= 4096 for side in match.groups()):
                raise ValueError(f"extra size {size!r} must be HEIGHTxWIDTH with sides multiples of 16 in 64..4096")
        return sizes

    @field_validator("s3_bucket")
    @classmethod
    def _bucket_for_s3(cls, bucket: str | None, info: ValidationInfo) -> str | None:
        bucket = bucket.strip() if bucket else None
        if info.data.get("storage") == "s3" and not bucket:
            raise ValueError("a bucket is required with --storage s3")
        return bucket

    @field_validator("s3_prefix")
    @classmethod
    def _prefix_is_a_folder(cls, prefix: str) -> str:
        # "results" and "/results/" both mean the folder results/ in the bucket.
        prefix = prefix.strip().lstrip("/")
        return prefix if not prefix or prefix.endswith("/") else prefix + "/"

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_a_url(cls, url: str | None) -> str | None:
        if url and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
        return url or None

    @model_validator(mode="after")
    def _no_empty_keys(self) -> Settings:
        self.api_keys = [key for key in self.api_keys if key]
        return self

    @property
    def sizes(self) -> tuple[str, ...]:
        """Every size a generation request may ask for, in order."""
        return DEFAULT_SIZES + tuple(size for size in self.extra_sizes if size not in DEFAULT_SIZES)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *[name for name in self.model_aliases if name != self.model_name])

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
