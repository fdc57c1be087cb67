"""/openapi.json describes what the server really does, and /docs and /redoc work without the internet.

The document is compared with the pydantic models that validate requests (so the two cannot drift), with the running
configuration, with the README's fields table, and with what the server answers (examples it documents are accepted,
errors it sends match the envelope it documents, routes it marks as keyed are the ones that answer 401).
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import annotated_types
import pytest
from pydantic import BaseModel

from server.protocol import EditsBody, ErrorResponse, GenerationsBody, ImagesResponse, ImageStreamEvent
from tests.api.conftest import SMALL
from tests.conftest import image_bytes

pytestmark = pytest.mark.api

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "secret-key"
IMAGE_PATHS = ("/v1/images/generations", "/v1/images/edits")
# Every error status an image request can get, each with the envelope as its body.
IMAGE_ERROR_STATUSES = {"400", "401", "404", "408", "413", "415", "429", "431", "500", "503", "504", "507"}


@pytest.fixture
def keyed(make_client):
    return make_client(api_keys=[KEY], max_n=3, extra_sizes=[SMALL, "512x768"], model_aliases=["edit-2"])


def document_of(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def resolve(document: dict, node: dict) -> dict:
    while "$ref" in node:
        section, _, name = node["$ref"].removeprefix("#/").rpartition("/")
        target = document
        for part in section.split("/"):
            target = target[part]
        node = target[name]
    return node


def body_schema(document: dict, path: str, media_type: str) -> dict:
    content = document["paths"][path]["post"]["requestBody"]["content"]
    return resolve(document, content[media_type]["schema"])


def branch(prop: dict) -> dict:
    """The value branch of an optional property: not JSON's null, nor a form's empty string."""
    options = [
        option for option in prop.get("anyOf", [prop]) if option.get("type") != "null" and option.get("const") != ""
    ]
    assert len(options) == 1, prop
    return {**prop, **options[0]}


def expected_bounds(model: type[BaseModel], name: str) -> dict:
    bounds = {}
    for meta in model.model_fields[name].metadata:
        if isinstance(meta, annotated_types.Ge):
            bounds["minimum"] = meta.ge
        elif isinstance(meta, annotated_types.Le):
            bounds["maximum"] = meta.le
        elif isinstance(meta, annotated_types.MaxLen):
            bounds["maxLength"] = meta.max_length
        elif isinstance(meta, annotated_types.MinLen):
            bounds["minLength"] = meta.min_length
    return bounds


def assert_matches_model(schema: dict, model: type[BaseModel], *, form: bool = False, files: bool = False) -> None:
    """Every field of the model is in the schema with its description, default and bounds, and nothing else is."""
    properties = schema["properties"]
    json_only = {"images"} if form else set()
    assert set(properties) == set(model.model_fields) - json_only
    required = {name for name, info in model.model_fields.items() if info.is_required()}
    assert required <= set(schema.get("required", []))
    for name, info in model.model_fields.items():
        if name in json_only:
            continue
        prop = properties[name]
        assert prop.get("description"), name
        if form and name in ("image", "mask"):
            # Image fields in a form: files in multipart, base64 text in a url-encoded form.
            one = prop["items"] if prop.get("type") == "array" else prop
            assert one["type"] == "string" and one.get("format") == ("binary" if files else None), name
            continue
        if info.is_required():
            assert "default" not in prop, name
        elif info.default is None and form:
            assert "default" not in prop, name  # a form has no null; the field is left out instead
        else:
            assert prop["default"] == json.loads(json.dumps(info.default)), name
        if form:
            assert "anyOf" not in prop or all(option.get("type") != "null" for option in prop["anyOf"]), name
        bounds = expected_bounds(model, name)
        constrained = branch(prop) if bounds else prop
        for key, value in bounds.items():
            if name == "n" and key == "maximum":
                continue  # --max-n, checked with the configuration
            assert constrained[key] == value, (name, key)


# -- the schema ------------------------------------------------------------------------------------------------------


def test_generations_body_lists_every_field_with_range_default_and_description(keyed):
    document = document_of(keyed)
    assert set(document["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]) == {"application/json"}
    assert_matches_model(body_schema(document, "/v1/images/generations", "application/json"), GenerationsBody)


EDIT_MEDIA_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")


@pytest.mark.parametrize("media_type", EDIT_MEDIA_TYPES)
def test_edits_body_lists_every_field_for_every_content_type(keyed, media_type):
    document = document_of(keyed)
    content = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert set(content) == set(EDIT_MEDIA_TYPES)
    schema = body_schema(document, "/v1/images/edits", media_type)
    form = media_type != "application/json"
    assert_matches_model(schema, EditsBody, form=form, files=media_type == "multipart/form-data")


def test_edits_form_takes_image_and_mask_files_and_requires_an_image(keyed):
    document = document_of(keyed)
    form = body_schema(document, "/v1/images/edits", "multipart/form-data")
    assert {"prompt", "image"} <= set(form["required"])
    image = form["properties"]["image"]
    assert image["type"] == "array" and image["items"]["format"] == "binary"
    assert form["properties"]["mask"]["format"] == "binary"
    # OpenAI's JSON shapes for images and masks are in the JSON body only.
    assert "images" not in form["properties"]
    json_body = body_schema(document, "/v1/images/edits", "application/json")
    items = resolve(document, json_body["properties"]["images"]["anyOf"][0]["items"])
    assert set(items["properties"]) == {"image_url"}


def test_ranges_that_are_configuration_come_from_the_running_configuration(keyed):
    document = document_of(keyed)
    settings = keyed.app.state.stepimage.settings
    for path in IMAGE_PATHS:
        for media_type in document["paths"][path]["post"]["requestBody"]["content"]:
            properties = body_schema(document, path, media_type)["properties"]
            assert branch(properties["n"])["maximum"] == 3
            assert branch(properties["model"])["enum"] == ["step-image-edit-2", "edit-2"]
    sizes = body_schema(document, "/v1/images/generations", "application/json")["properties"]["size"]
    assert sizes["enum"] == list(settings.sizes) and sizes["enum"][-1] == "512x768"


def test_responses_document_the_images_and_the_error_envelope(keyed):
    document = document_of(keyed)
    for path in IMAGE_PATHS:
        responses = document["paths"][path]["post"]["responses"]
        ok = responses["200"]["content"]["application/json"]["schema"]
        assert resolve(document, ok)["properties"].keys() == ImagesResponse.model_json_schema()["properties"].keys()
        assert IMAGE_ERROR_STATUSES <= set(responses)
        for status in IMAGE_ERROR_STATUSES:
            response = resolve(document, responses[status])
            envelope = resolve(document, response["content"]["application/json"]["schema"])
            assert set(envelope["properties"]) == {"error"}
            detail = resolve(document, envelope["properties"]["error"])
            assert set(detail["properties"]) == {"message", "type", "param", "code"}
            assert ("Retry-After" in response.get("headers", {})) == (status in ("429", "503")), status


def test_streamed_responses_are_documented_as_server_sent_events(keyed):
    document = document_of(keyed)
    for path, prefix in zip(IMAGE_PATHS, ("image_generation", "image_edit")):
        ok = document["paths"][path]["post"]["responses"]["200"]
        stream = ok["content"]["text/event-stream"]
        assert f"{prefix}.partial_image" in ok["description"] and f"{prefix}.completed" in ok["description"]
        options = [resolve(document, option) for option in stream["schema"]["oneOf"]]
        event = options[0]
        assert set(event["properties"]) == set(ImageStreamEvent.model_fields)
        assert set(event["properties"]["type"]["enum"]) >= {f"{prefix}.partial_image", f"{prefix}.completed"}
        assert set(options[1]["properties"]) == {"error"}
        # The documented example is what the server's model of an event accepts, event by event.
        frames = [frame for frame in stream["example"].split("\n\n") if frame]
        for frame in frames:
            name, data = frame.split("\n")
            parsed = ImageStreamEvent.model_validate_json(data.removeprefix("data: "))
            assert name == f"event: {parsed.type}" and parsed.type.startswith(prefix)


def test_a_real_stream_matches_the_documented_events(keyed):
    document = document_of(keyed)
    stream = document["paths"]["/v1/images/generations"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    event_schema = resolve(document, stream["schema"]["oneOf"][0])
    body = {
        "prompt": "a kite",
        "size": SMALL,
        "steps": 2,
        "stream": True,
        "partial_images": 1,
        "response_format": "b64_json",
    }
    response = keyed.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    frames = [frame for frame in response.text.split("\n\n") if frame.strip()]
    names = []
    for frame in frames:
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        data = json.loads(lines["data"])
        assert set(data) <= set(event_schema["properties"]), set(data) - set(event_schema["properties"])
        assert set(event_schema.get("required", [])) <= set(data)
        assert lines["event"] == data["type"] and data["type"] in event_schema["properties"]["type"]["enum"]
        names.append(data["type"])
    assert names[-1] == "image_generation.completed" and "image_generation.partial_image" in names


def test_no_operation_documents_fastapis_422(keyed):
    document = document_of(keyed)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)
            assert "500" in operation["responses"], (path, method)
    assert "HTTPValidationError" not in document["components"]["schemas"]


# -- the document agrees with the server's behaviour -----------------------------------------------------------------


def test_routes_marked_keyed_are_exactly_those_that_answer_401(keyed):
    document = document_of(keyed)
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            concrete = path.replace("{name}", "nothing.png")
            answered = keyed.request(method.upper(), concrete).status_code
            marked = operation.get("security") == [{"bearerAuth": []}]
            assert marked == (answered == 401), (path, method, answered)
            assert ("401" in operation["responses"]) == marked, (path, method)


def test_an_open_server_documents_the_key_as_optional(client):
    generations = document_of(client)["paths"]["/v1/images/generations"]["post"]
    assert generations["security"] == [{"bearerAuth": []}, {}]


def test_metrics_behind_the_key_is_documented_so(make_client):
    client = make_client(api_keys=[KEY], metrics_require_key=True)
    assert document_of(client)["paths"]["/metrics"]["get"]["security"] == [{"bearerAuth": []}]
    assert client.get("/metrics").status_code == 401


def test_every_error_the_server_sends_matches_the_documented_envelope(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    responses = [
        keyed.post("/v1/images/generations", json={"prompt": ""}, headers=auth),  # 400
        keyed.post("/v1/images/generations", json={"prompt": "x"}),  # 401
        keyed.post("/v1/images/generations", json={"prompt": "x", "model": "nope"}, headers=auth),  # 404
        keyed.post("/v1/images/generations", content=b"x", headers={**auth, "content-type": "text/plain"}),  # 415
        keyed.get("/v1/images/files/none.png"),  # 404
        keyed.get("/nowhere"),  # 404
    ]
    for response in responses:
        assert response.status_code >= 400
        ErrorResponse.model_validate(response.json(), strict=True)


def test_documented_examples_are_accepted_as_they_stand(keyed):
    document = document_of(keyed)
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in IMAGE_PATHS:
        example = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        response = keyed.post(path, json={**example, "steps": 1}, headers=auth)
        assert response.status_code == 200, (path, response.text)
        ImagesResponse.model_validate(response.json())


@pytest.mark.parametrize("media_type", ["multipart/form-data", "application/x-www-form-urlencoded"])
def test_a_form_filled_with_the_documented_defaults_is_accepted(keyed, media_type):
    # What a form-based tool (Swagger UI's "Try it out") sends: every field that has a default, plus the image.
    form = body_schema(document_of(keyed), "/v1/images/edits", media_type)
    data = {}
    for name, prop in form["properties"].items():
        if "default" in prop:
            value = prop["default"]
            data[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    data.update(prompt=form["properties"]["prompt"]["examples"][0], steps="1")
    auth = {"Authorization": f"Bearer {KEY}"}
    if media_type == "multipart/form-data":
        files = [("image", ("in.png", image_bytes(64, 64), "image/png"))]
        response = keyed.post("/v1/images/edits", data=data, files=files, headers=auth)
    else:
        data["image"] = "data:image/png;base64," + base64.b64encode(image_bytes(64, 64)).decode()
        response = keyed.post("/v1/images/edits", data=data, headers=auth)
        assert response.request.headers["content-type"] == media_type
    assert response.status_code == 200, response.text


# -- the README and the contract document show every field -------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "heading"), [("README.md", "### Fields"), ("docs/api-contract.md", "## Request fields")]
)
def test_the_contract_pages_list_every_request_field(page, heading):
    text = (REPO_ROOT / page).read_text()
    table = next(block for block in text.split(heading, 1)[1].split("\n\n") if block.startswith("|"))
    listed = set(re.findall(r"^\| `([a-z_\[\]]+)`", table, flags=re.MULTILINE))
    fields = set(GenerationsBody.model_fields) | set(EditsBody.model_fields)
    assert fields <= listed, sorted(fields - listed)


# -- /docs and /redoc ------------------------------------------------------------------------------------------------


class _References(HTMLParser):
    """Every URL a page loads: script and image sources, stylesheets and icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img") and values.get("src"):
            self.urls.append(values["src"])
        if tag == "link" and values.get("href"):
            self.urls.append(values["href"])


CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_this_server_serves(keyed, page):
    response = keyed.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    # No CDN, no web fonts: nothing that needs the internet.
    assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
    parser = _References()
    parser.feed(html)
    assert any(url.endswith(".js") for url in parser.urls), parser.urls
    for url in parser.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = keyed.get(url)
        assert asset.status_code == 200, url
        assert CONTENT_TYPES[Path(url).suffix] in asset.headers["content-type"], (url, asset.headers)
        assert len(asset.content) > 1000, url
    assert "/openapi.json" in html


def test_docs_need_no_key(keyed):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert keyed.get(path).status_code == 200
