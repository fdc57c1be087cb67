"""The Ray Serve application's arguments: `stepimage serve`'s settings plus replica and autoscaling knobs.

A Serve config file passes them as the application's `args:`; `build_app` validates them here, before
anything is deployed, so a misspelt name or a bad value fails `serve run` / `serve deploy` at once with
a message naming it, rather than being ignored or failing later on a replica.

    args:
      settings: {backend: flux2-klein, weights_dir: /weights, max_queue: 8}   # names of `stepimage serve`
      min_model_replicas: 1
      max_model_replicas: 8
      model_gpus: 1

Settings are the same fields as `server.config.Settings` (flag `--max-queue` is `max_queue`). Each replica
builds its Settings from these values and its own STEPIMAGE_* environment variables for the rest (the
values here win, as flags do), so secrets such as STEPIMAGE_API_KEYS can come from the environment of
the hosts (a Kubernetes Secret) instead of the config file. The settings that size the deployments
(`DEPLOYMENT_SETTINGS`) are the exception: they are resolved once, where the application is built, and
every replica gets those values.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.config import Settings

# Settings of `stepimage serve`'s own HTTP server. Under Ray Serve its proxy serves HTTP, configured by the
# config file's http_options; accepting them here would ignore them silently.
SERVE_OWNED_SETTINGS = ("host", "port", "header_timeout", "keep_alive_timeout", "max_connections")


# Settings the deployments are sized by: build_app turns max_queue into Serve's bounds and drain_timeout into its
# shutdown timeout, and the replicas' engines and the ingress's admission must use the same values as those bounds
# (request_timeout and max_batch_size too: the model replica's engine bound is max_queue + max_batch_size, and the
# ingress's deadline must be the replicas'). They are resolved where the application is built and passed to every
# replica explicitly, so that a host whose STEPIMAGE_* environment differs cannot disagree with the deployment.
DEPLOYMENT_SETTINGS = ("max_queue", "max_batch_size", "request_timeout", "drain_timeout")


class RayAppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="`stepimage serve` options by their Settings names (backend, api_keys, storage_dir, "
        "request_timeout, max_queue, max_batch_size, checkpoint, weights_dir, ...). max_queue is per model "
        "replica here: the requests one replica holds, waiting or running.",
    )
    min_model_replicas: int = Field(1, ge=1, description="Model replicas always running (one per GPU).")
    max_model_replicas: int | None = Field(
        None, ge=1, description="Autoscaling ceiling; default: min_model_replicas (a fixed count, no autoscaling)."
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Autoscaling aims at this many requests waiting or running per model replica."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long before one is removed.")
    model_gpus: float = Field(0.0, ge=0, description="GPUs per model replica: 1 on GPU hosts, 0 for the CPU model.")
    model_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads per model replica; default: model_cpus rounded up (at least 1)."
    )
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress (no model, no torch).")
    ingress_cpus: float = Field(0.5, ge=0, description="CPUs reserved per ingress replica.")
    router_queue: int | None = Field(
        None,
        ge=1,
        description="Requests each ingress replica holds while every model replica is full; past it, 429. "
        "Default: the max_queue setting.",
    )
    retries: int = Field(
        2, ge=0, description="Times a request is resent to another model replica when the one running it dies."
    )
    backend_loader: str | None = Field(
        None,
        description="'module:function' called as function(settings, device) -> Backend on each model replica "
        "(a backend of your own); default: the backend the settings name.",
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between model replica health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails.")

    @field_validator("settings")
    @classmethod
    def _settings_are_stepimage_settings(cls, values: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(values) - set(Settings.model_fields))
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}: use the names of `stepimage serve`'s options with "
                "underscores (e.g. max_queue for --max-queue); see `stepimage serve --help`"
            )
        owned = [name for name in SERVE_OWNED_SETTINGS if name in values]
        if owned:
            raise ValueError(
                f"{', '.join(owned)} configure `stepimage serve`'s own HTTP server; Ray Serve's proxy serves HTTP "
                "here: set http_options (host, port, keep_alive_timeout_s) in the Serve config"
            )
        settings = Settings(**values)
        if len(settings.devices) > 1:
            raise ValueError(
                "each model replica drives one device: raise min_model_replicas (with model_gpus: 1) instead of "
                "listing several devices"
            )
        return values

    @model_validator(mode="after")
    def _replica_range(self) -> RayAppOptions:
        if self.max_model_replicas is not None and self.max_model_replicas < self.min_model_replicas:
            raise ValueError(
                f"max_model_replicas ({self.max_model_replicas}) is below min_model_replicas "
                f"({self.min_model_replicas})"
            )
        if self.backend_loader is not None and ":" not in self.backend_loader:
            raise ValueError(f"backend_loader must be 'module:function', got {self.backend_loader!r}")
        return self

    # -- what the deployments are built from ------------------------------------------------------

    def build_settings(self) -> Settings:
        """The Settings as a replica sees them (these values, then its STEPIMAGE_* environment)."""
        return Settings(**self.settings)

    def replica_settings(self, settings: Settings) -> dict[str, Any]:
        """What each replica builds its Settings from: the file's settings, and the deployment-sizing ones as
        `settings` (this build's) resolved them. Everything else, secrets included, still comes from the file or
        each host's environment (nothing is copied from the build's environment)."""
        return {**self.settings, **{name: getattr(settings, name) for name in DEPLOYMENT_SETTINGS}}

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, math.ceil(self.model_cpus))

    def replica_counts(self) -> dict[str, Any]:
        """Serve's `num_replicas`, or its `autoscaling_config` when the range is open."""
        ceiling = self.max_model_replicas or self.min_model_replicas
        if ceiling == self.min_model_replicas:
            return {"num_replicas": self.min_model_replicas}
        return {
            "autoscaling_config": {
                "min_replicas": self.min_model_replicas,
                "initial_replicas": self.min_model_replicas,
                "max_replicas": ceiling,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        }

    def model_capacity(self, settings: Settings) -> int:
        """Requests the whole model tier holds at its largest: per replica, max_queue."""
        return (self.max_model_replicas or self.min_model_replicas) * settings.max_queue

    def queue_at_router(self, settings: Settings) -> int:
        return self.router_queue or settings.max_queue
