"""The gateway's web page in headless Chromium, and the NDJSON stream it reads, against a real generator."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from tests.conftest import REQUIRE_BROWSER, skip_or_fail
from tests.integration.test_http_gateway import TOKEN, serve

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; tests never download a browser
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Reads the pixels the page shows, through a canvas.
CANVAS_PIXELS = """img => {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    return [canvas.width, canvas.height, Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)];
}"""
# The file behind the page's object URL, as base64.
OBJECT_URL_BYTES = """async url => {
    const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
    let text = "";
    for (const byte of bytes) text += String.fromCharCode(byte);
    return btoa(text);
}"""


@pytest.fixture(scope="module")
def gateway(generator) -> Iterator[str]:  # type: ignore[no-untyped-def]
    from zimage_split.http_gateway import create_app

    yield from serve(create_app(f"127.0.0.1:{generator.port}", tokens=(TOKEN,), timeout=120))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # The browser is Debian's, not a Python package: the one thing here a dev install may lack.
    if not CHROMIUM.exists():
        skip_or_fail(
            f"the web page's tests need {CHROMIUM}: install Debian's chromium (`apt-get install chromium`)",
            REQUIRE_BROWSER,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, gateway) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    context = browser.new_context()  # a fresh localStorage per test
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{gateway}/")
    yield page
    context.close()


def fill_form(page, prompt: str, size: str, token: str = TOKEN, seed: str = "", steps: str = "") -> None:  # type: ignore[no-untyped-def]
    if not page.is_visible("#token"):
        page.click("summary")  # the token field sits in a <details>, closed at first
    page.fill("#token", token)
    page.fill("#prompt", prompt)
    page.select_option("#size", "custom")
    page.fill("#custom-size", size)
    page.fill("#seed", seed)
    page.fill("#steps", steps)


def stream(
    url: str, body: dict[str, Any], token: str | None = TOKEN
) -> tuple[int, str, list[dict[str, Any]]]:
    """POSTs to the stream route (stdlib only); returns the status, the content type and the JSON lines
    (or, for an error status, the one JSON body)."""
    request = urllib.request.Request(
        f"{url}/v1/zsplit/images/stream",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            lines = [json.loads(line) for line in response.read().splitlines()]
            return response.status, response.headers["Content-Type"], lines
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], [json.loads(error.read())]


@pytest.mark.timeout(240)
def test_the_page_makes_shows_and_offers_the_sdks_image(page, client) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    fill_form(page, "a lighthouse at dusk", "64x64", seed="7", steps="2")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done", timeout=120_000)

    assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [2, 2]
    expect(page.locator("#status")).to_contain_text("step 2 of 2")
    expect(page.locator("#error")).to_be_hidden()
    download = page.locator("#download")
    assert download.get_attribute("download") == "zimage-7.png"
    href = download.get_attribute("href")
    assert href.startswith("blob:") and page.get_attribute("#result", "src") == href

    width, height, data = page.eval_on_selector("#result", CANVAS_PIXELS)
    shown = np.array(data, dtype=np.uint8).reshape(height, width, 4)
    assert (width, height) == (64, 64)
    assert shown[..., :3].std() > 10 and len(np.unique(shown.reshape(-1, 4), axis=0)) > 100, "blank image"

    png = base64.b64decode(page.evaluate(OBJECT_URL_BYTES, href))
    received = Image.open(io.BytesIO(png))
    assert received.format == "PNG" and received.text["seed"] == "7"
    direct = client.generate("a lighthouse at dusk", seed=7, width=64, height=64, steps=2)
    assert np.array_equal(np.asarray(received), np.asarray(direct))
    assert np.array_equal(shown, np.asarray(received.convert("RGBA")))  # the page shows what it got


@pytest.mark.timeout(180)
def test_the_page_shows_the_servers_errors(page) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    fill_form(page, "a cat", "100x64", steps="1")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("divisible by 16")
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#download")).to_be_hidden()

    fill_form(page, "a cat", "64x64", token="wrong", steps="1")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("Authorization: Bearer <token>")
    expect(page.locator("#result")).to_be_hidden()

    page.reload()  # the token is kept in localStorage
    assert page.input_value("#token") == "wrong"


def test_the_stream_sends_progress_then_images_then_done(gateway, client) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": "a lighthouse at dusk", "size": "64x64", "seed": 5, "steps": 3, "n": 2}
    status, content_type, lines = stream(gateway, body)
    assert status == 200 and content_type.startswith("application/x-ndjson")
    kinds = [line["type"] for line in lines]
    assert kinds == ["progress"] * 6 + ["image", "image", "done"], kinds
    assert [line["step"] for line in lines[:6]] == [1, 2, 3, 4, 5, 6]
    assert {line["total"] for line in lines[:6]} == {6}  # steps times images
    for index, line in enumerate(lines[6:8]):
        assert (line["seed"], line["width"], line["height"], line["format"]) == (5 + index, 64, 64, "png")
        image = Image.open(io.BytesIO(base64.b64decode(line["b64_json"])))
        direct = client.generate("a lighthouse at dusk", seed=5 + index, width=64, height=64, steps=3)
        assert np.array_equal(np.asarray(image), np.asarray(direct))


def test_the_page_is_public_and_the_stream_needs_a_token(gateway) -> None:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"{gateway}/", timeout=30) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
        assert b'id="generate"' in response.read()

    status, content_type, (reply,) = stream(gateway, {"prompt": "a cat", "size": "64x64"}, token=None)
    assert (status, reply["error"]["code"]) == (401, "unauthenticated")
    # What is refused before the first step keeps the JSON route's status and body.
    for size, status_wanted, message in [("big", 400, "WIDTHxHEIGHT"), ("100x64", 400, "divisible by 16")]:
        status, content_type, (reply,) = stream(gateway, {"prompt": "a cat", "size": size})
        assert status == status_wanted and content_type == "application/json"
        assert message in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"
    status, _, (reply,) = stream(gateway, {"prompt": "a cat", "size": "64x64", "n": 50})
    assert status == 400 and "num_images" in reply["error"]["message"]


@pytest.mark.parametrize("when", ["after the first step", "before the first step"])
def test_a_client_that_goes_away_cancels_the_generation(gateway, generator, client, when: str) -> None:  # type: ignore[no-untyped-def]
    transformer = generator.servicer.worker.engine.pipe.transformer
    calls: list[int] = []
    handle = transformer.register_forward_hook(lambda *args: calls.append(1))
    body = json.dumps({"prompt": "a cat", "size": "512x512", "steps": 100, "seed": 0}).encode()
    try:
        with socket.create_connection(urlsplit(gateway).netloc.split(":"), timeout=60) as connection:  # type: ignore[arg-type]
            connection.sendall(
                b"POST /v1/zsplit/images/stream HTTP/1.1\r\nHost: gateway\r\n"
                + f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            if when == "after the first step":
                # The headers may arrive in a segment of their own: read until the first progress line.
                received = b""
                while b'"type":"progress"' not in received:
                    chunk = connection.recv(4096)
                    assert chunk, f"the stream ended before its first progress line: {received!r}"
                    received += chunk
        # Closed before the first step, the request may be cancelled before it even reaches the DiT; give
        # it time to start if it is going to.
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        # The worker thread is single: once this tiny job runs, an abandoned one that started has returned.
        client.generate("a cat", steps=1, width=64, height=64, seed=0)
        settled = len(calls)
        time.sleep(1)
    finally:
        handle.remove()
    assert settled < 100 // 2, f"{settled} DiT forwards ran for a stream abandoned {when}"
    assert len(calls) == settled, "the abandoned generation ran on after a later request"
