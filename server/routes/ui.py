"""GET / (the playground page), GET /ui/{name} (its scripts and styles), GET /ui/config.json (what the
page needs to know about this server). Registered only when the `ui` setting is on."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server import ui


def build_router() -> APIRouter:
    assets = ui.load_assets()
    router = APIRouter(include_in_schema=False)

    def serve(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            # The app's own 404, which quotes the client's path bounded, as for any unknown route.
            raise HTTPException(status_code=404)
        headers = {**ui.SECURITY_HEADERS, "etag": asset.etag}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def page(request: Request) -> Response:
        return serve("index.html", request)

    @router.get("/ui/config.json")
    async def config(request: Request) -> JSONResponse:
        state = request.app.state.stepimage
        backend = state.engine.backend
        body = ui.page_config(state.settings, backend.info if backend is not None else None, state.ready)
        return JSONResponse(body, headers={"cache-control": "no-store"})

    @router.api_route("/ui/{name}", methods=["GET", "HEAD"])
    async def asset(name: str, request: Request) -> Response:
        return serve(name, request)

    return router
