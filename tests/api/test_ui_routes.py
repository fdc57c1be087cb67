"""The playground's routes in-process: the page and its files, their security headers, /ui/config.json, and
`--no-ui`. What the page does in a browser is tested in tests/browser/."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from server.cli import build_parser, settings_from_args
from server.ui import CONTENT_SECURITY_POLICY
from tests.api.conftest import SMALL, assert_error

pytestmark = pytest.mark.api

STATIC = resources.files("server.ui") / "static"


def static_files() -> dict[str, str]:
    return {entry.name: entry.read_text() for entry in STATIC.iterdir() if entry.is_file()}


def test_page_is_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>stepimage playground</title>" in page.text
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy == {
        "default-src": "'none'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data: blob:",
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert client.head("/").status_code == 200


def test_every_file_the_page_names_is_served_from_the_package(client):
    files = static_files()
    named = re.findall(r'(?:src|href)="(/ui/[^"]+)"', files["index.html"])
    # ES module imports between the scripts.
    for name, text in files.items():
        if name.endswith(".js"):
            named += ["/ui/" + target for target in re.findall(r'from "\./([^"]+)"', text)]
    assert {"/ui/app.css", "/ui/app.js", "/ui/api.js", "/ui/mask.js", "/ui/snippets.js"} <= set(named)
    types = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
    for path in set(named):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == types[path[path.rindex(".") :]]
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.content == (STATIC / path.removeprefix("/ui/")).read_bytes()


def test_the_page_loads_nothing_from_elsewhere():
    for name, text in static_files().items():
        # No CDN, web font or remote image: every URL the files contain is a same-origin path.
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.I), name
        assert "@import" not in text and "@font-face" not in text, name
        # The policy forbids inline code; a stray inline script or style would silently not run.
        if name.endswith(".html"):
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), name
            assert "<style" not in text and " style=" not in text and not re.search(r"\son[a-z]+=", text), name


def test_unchanged_files_revalidate_to_304(client):
    first = client.get("/ui/app.js")
    assert first.headers["cache-control"] == "no-cache"
    again = client.get("/ui/app.js", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get("/", headers={"if-none-match": first.headers["etag"]}).status_code == 200


@pytest.mark.parametrize("path", ["/ui/missing.js", "/ui/..%2Fconfig.py", "/ui/%2E%2E/__init__.py", "/ui/"])
def test_unknown_files_are_404_envelopes(client, path):
    assert_error(client.get(path), 404, None, "not_found")


def test_an_unknown_file_is_quoted_bounded_like_any_unknown_route(client):
    response = client.get("/ui/" + "a" * 5000 + ".js")
    assert_error(response, 404, None, "not_found")
    assert len(response.json()["error"]["message"]) < 200


def test_config_describes_the_server_without_secrets(make_client):
    client = make_client(api_keys=["s3cret-key"], max_n=3)
    response = client.get("/ui/config.json")  # no key: the page must learn that it needs one
    assert response.status_code == 200
    assert "s3cret" not in response.text
    config = response.json()
    assert config["keys_required"] is True
    assert config["sizes"][-1] == SMALL and config["default_size"] in config["sizes"]
    assert config["max_n"] == 3
    assert config["ready"] is True
    assert config["model"] == {
        "backend": "tiny",
        "random_weights": True,
        "notes": ["tiny random-weight model: images are noise; for tests and demos only"],
    }
    fields = config["fields"]
    assert fields["steps"] == {"default": 8, "minimum": 1, "maximum": 50}
    assert fields["cfg_scale"] == {"default": 1.0, "minimum": 1.0, "maximum": 10.0}
    assert fields["output_format"]["enum"] == ["png", "jpeg", "webp"]
    assert fields["prompt"]["maxLength"] == 512
    # The page itself is open, but the API it calls keeps its keys.
    assert client.get("/").status_code == 200
    assert_error(client.post("/v1/images/generations", json={"prompt": "x"}), 401, None, "invalid_api_key")


def test_open_server_says_no_key_is_needed(client):
    assert client.get("/ui/config.json").json()["keys_required"] is False


def test_no_ui_turns_the_page_into_a_404(make_client):
    client = make_client(ui=False)
    for path in ("/", "/ui/app.js", "/ui/config.json"):
        assert_error(client.get(path), 404, None, "not_found")
    assert client.get("/health").status_code == 200


def test_ui_flag_and_variable(monkeypatch):
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"])).ui is True
    assert settings_from_args(parser.parse_args(["serve", "--no-ui"])).ui is False
    monkeypatch.setenv("STEPIMAGE_UI", "false")
    assert settings_from_args(parser.parse_args(["serve"])).ui is False
    assert settings_from_args(parser.parse_args(["serve", "--ui"])).ui is True
