"""GET /v1/models: the OpenAI-style list of served model names."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.auth import require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = request.app.state.stepimage
    backend = state.engine.backend
    info = backend.info if backend is not None else None
    data = []
    for name in state.settings.model_names:
        entry = {"id": name, "object": "model", "created": state.started_at, "owned_by": "stepimage"}
        if info is not None:
            # Extension: which weights answer under this name, and whether they are real.
            entry["backend"] = info.backend
            entry["root"] = info.model
            entry["random_weights"] = info.random_weights
            if info.notes:
                entry["notes"] = list(info.notes)
        data.append(entry)
    return {"object": "list", "data": data}
