"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.auth import check_api_key
from server.errors import NotReady

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict:
    state = request.app.state.stepimage
    if state.draining:
        raise NotReady("The server is shutting down.", retry_after=5)
    if not state.ready:
        reason = "the model failed to load; see the server log" if state.load_error else "the model is loading"
        raise NotReady(f"Not ready: {reason}.", retry_after=5)
    storage = state.store.health
    if not storage.ok:
        raise NotReady(f"Not ready: {storage.reason}.", retry_after=state.store.retry_after)
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state.stepimage
    if state.settings.metrics_require_key:
        check_api_key(request, state.settings.api_keys)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
