"""The OpenAI-compatible gateway over a real generator, driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from tests.pictures import png

TOKEN = "gateway-test-token"


def serve(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Runs `app` with uvicorn on a free loopback port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def gateway(generator) -> Iterator[str]:  # type: ignore[no-untyped-def]
    from zimage_split.http_gateway import create_app

    yield from serve(create_app(f"127.0.0.1:{generator.port}", tokens=(TOKEN,), timeout=60))


def http(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    """A plain HTTP call (stdlib only): GET, or POST of a JSON body; returns the status and the JSON."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def openai_api(url: str, token: str = TOKEN):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)


def decode(item) -> Image.Image:  # type: ignore[no-untyped-def]
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_the_openai_client_round_trip(gateway, client) -> None:  # type: ignore[no-untyped-def]
    """`client` is the SDK fixture: the same requests through gRPC, for comparison."""
    result = openai_api(gateway).images.generate(
        prompt="a lighthouse at dusk",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "steps": 2},
    )
    assert len(result.data) == 2 and result.created > 0
    for index, item in enumerate(result.data):
        image = decode(item)
        assert image.format == "PNG" and image.size == (64, 64)
        direct = client.generate("a lighthouse at dusk", seed=5 + index, width=64, height=64, steps=2)
        assert np.array_equal(np.asarray(image), np.asarray(direct))
        assert image.text["seed"] == str(5 + index)  # the generator's PNG, metadata and all


def test_the_shift_extension_reaches_the_generator(gateway, client) -> None:  # type: ignore[no-untyped-def]
    result = openai_api(gateway).images.generate(
        prompt="a lighthouse at dusk",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "shift": 1.5},
    )
    image = decode(result.data[0])
    direct = client.generate("a lighthouse at dusk", seed=5, width=64, height=64, shift=1.5)
    unshifted = client.generate("a lighthouse at dusk", seed=5, width=64, height=64)
    assert np.array_equal(np.asarray(image), np.asarray(direct))
    assert not np.array_equal(np.asarray(image), np.asarray(unshifted))
    assert image.text["shift"] == "1.5"
    with pytest.raises(openai.BadRequestError, match="shift must be between 0.1 and 20"):
        openai_api(gateway).images.generate(
            prompt="a cat", size="64x64", response_format="b64_json", extra_body={"shift": -1}
        )


def test_the_dype_extension_reaches_the_generator(gateway, client) -> None:  # type: ignore[no-untyped-def]
    result = openai_api(gateway).images.generate(
        prompt="a lighthouse at dusk",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "steps": 2, "dype": True, "dype_method": "ntk", "dype_exponent": 1.5},
    )
    image = decode(result.data[0])
    direct = client.generate(
        "a lighthouse at dusk",
        seed=5,
        width=64,
        height=64,
        steps=2,
        dype=True,
        dype_method="ntk",
        dype_exponent=1.5,
    )
    assert np.array_equal(np.asarray(image), np.asarray(direct))
    assert json.loads(image.text["dype"]) == {"method": "ntk", "scale": 2.0, "exponent": 1.5}
    with pytest.raises(openai.BadRequestError, match="Unknown dype method 'yarn'"):
        openai_api(gateway).images.generate(
            prompt="a cat",
            size="64x64",
            response_format="b64_json",
            extra_body={"dype": True, "dype_method": "yarn"},
        )


def test_errors_keep_the_openai_shape(gateway) -> None:  # type: ignore[no-untyped-def]
    api = openai_api(gateway)
    with pytest.raises(openai.BadRequestError, match="WIDTHxHEIGHT"):
        api.images.generate(prompt="a cat", size="big", response_format="b64_json")
    with pytest.raises(openai.BadRequestError, match="divisible by 16"):
        api.images.generate(prompt="a cat", size="100x64", response_format="b64_json")
    with pytest.raises(openai.BadRequestError, match="num_images"):
        api.images.generate(prompt="a cat", n=50, size="64x64", response_format="b64_json")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        api.images.generate(prompt="a cat", size="64x64", response_format="url")
    with pytest.raises(openai.BadRequestError, match="prompt"):
        api.images.generate(prompt="", size="64x64", response_format="b64_json")
    with pytest.raises(openai.AuthenticationError, match="Bearer"):
        openai_api(gateway, token="wrong").images.generate(prompt="a cat", size="64x64")
    status, reply = http(f"{gateway}/v1/images/generations", {"prompt": "a cat"})
    assert status == 401 and reply["error"]["code"] == "unauthenticated"


def test_health_and_openapi(gateway) -> None:  # type: ignore[no-untyped-def]
    status, health = http(f"{gateway}/healthz")
    assert status == 200 and health["status"] == "ok"
    _, spec = http(f"{gateway}/openapi.json", token=TOKEN)
    assert "/v1/images/generations" in spec["paths"]


def test_a_generator_that_is_down_is_503() -> None:
    from zimage_split.http_gateway import create_app

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = free.getsockname()[1]
    for url in serve(create_app(f"127.0.0.1:{dead}", timeout=5)):
        assert http(f"{url}/healthz")[0] == 503
        with pytest.raises(openai.InternalServerError):
            openai_api(url).images.generate(prompt="a cat", size="64x64", response_format="b64_json")


def test_gateway_metrics_and_request_ids(generator) -> None:  # type: ignore[no-untyped-def]
    import logging

    from tests.integration.test_observability import Collected, scrape, value
    from zimage_split.common.metrics import MetricsSettings, ServiceMetrics, serve_metrics
    from zimage_split.http_gateway import create_app

    metrics = ServiceMetrics("http")
    endpoint = serve_metrics(metrics, MetricsSettings("127.0.0.1", 0))
    handler, root = Collected(), logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, logging.INFO
    try:
        for url in serve(
            create_app(f"127.0.0.1:{generator.port}", tokens=(TOKEN,), timeout=60, metrics=metrics)
        ):
            request = urllib.request.Request(
                f"{url}/v1/images/generations",
                data=json.dumps({"prompt": "a counted cat", "size": "64x64", "steps": 1}).encode(),
                headers={
                    "Authorization": f"Bearer {TOKEN}",
                    "Content-Type": "application/json",
                    "x-request-id": "gw-1234",
                },
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.headers["x-request-id"] == "gw-1234"
            assert http(f"{url}/v1/images/generations", {"prompt": "a cat"})[0] == 401
            assert http(f"{url}/no/such/route", token=TOKEN)[0] == 404
            samples = scrape(endpoint.port)
    finally:
        endpoint.stop()
        root.removeHandler(handler)
        root.setLevel(level)
    route = {"service": "http", "method": "POST /v1/images/generations"}
    assert value(samples, "zsplit_requests_total", **route, code="200") == 1
    assert value(samples, "zsplit_requests_total", **route, code="401") == 1
    assert value(samples, "zsplit_requests_total", service="http", method="GET unmatched", code="404") == 1
    # The gateway's id reached the generator: its access line for the call carries it.
    generator_lines = [r.getMessage() for r in handler.records if r.request_id == "gw-1234"]  # type: ignore[attr-defined]
    assert any(line.startswith("Generate OK") for line in generator_lines), generator_lines


def test_the_gateway_reads_a_rotated_token_file_again(generator, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.common.security import accepted_tokens
    from zimage_split.http_gateway import create_app

    token_file = tmp_path / "tokens"
    token_file.write_text("old-token\n")
    app = create_app(f"127.0.0.1:{generator.port}", tokens=accepted_tokens(str(token_file)), timeout=60)
    for url in serve(app):
        # A route that does not exist: 404 once the token is accepted, 401 before.
        assert http(f"{url}/v1/nothing", token="old-token")[0] == 404
        assert http(f"{url}/v1/nothing", token="new-token")[0] == 401
        token_file.write_text("new-token\n")
        assert http(f"{url}/v1/nothing", token="old-token")[0] == 401
        assert http(f"{url}/v1/nothing", token="new-token")[0] == 404


def start_picture() -> Image.Image:
    gradient = np.linspace(0, 255, 80 * 96, dtype=np.uint8).reshape(80, 96)
    return Image.fromarray(np.stack([gradient, 255 - gradient, gradient // 2], -1))


def test_edits_is_img2img_through_the_openai_client(gateway, client) -> None:  # type: ignore[no-untyped-def]
    """`images.edit` with an image and no mask: img2img, the same bytes as the SDK's request over gRPC; the
    image's own size is kept (80x96 rounded down to multiples of 16) unless `size` says otherwise."""
    picture = png(start_picture())
    result = openai_api(gateway).images.edit(
        image=("start.png", picture, "image/png"),
        prompt="a lighthouse at dusk",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 4, "steps": 4, "strength": 0.75},
    )
    direct = client.generate_images(
        "a lighthouse at dusk", init_image=picture, strength=0.75, seed=4, steps=4, num_images=2
    )
    assert len(result.data) == 2
    for item, expected in zip(result.data, direct, strict=True):
        assert base64.b64decode(item.b64_json) == expected.info["file_bytes"]
    assert decode(result.data[0]).size == (96, 80)
    sized = openai_api(gateway).images.edit(
        image=("start.png", picture, "image/png"),
        prompt="a lighthouse at dusk",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 4, "steps": 2},
    )
    assert decode(sized.data[0]).size == (64, 64)


def test_edits_with_a_mask_is_inpainting(gateway, client) -> None:  # type: ignore[no-untyped-def]
    """An OpenAI mask (RGBA, fully transparent where to edit) is the generator's white-means-repaint mask;
    a mask without alpha is taken as the generator's own."""
    picture = png(start_picture())
    alpha = np.full((80, 96), 255, dtype=np.uint8)
    alpha[20:60, 30:70] = 0  # edit here
    openai_mask = Image.fromarray(np.dstack([np.zeros((80, 96, 3), np.uint8), alpha]), mode="RGBA")
    repaint = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")
    settings = {"seed": 9, "steps": 4}
    result = openai_api(gateway).images.edit(
        image=("start.png", picture, "image/png"),
        mask=("mask.png", png(openai_mask), "image/png"),
        prompt="a red door",
        response_format="b64_json",
        extra_body=settings,
    )
    direct = client.generate("a red door", init_image=picture, mask=repaint, **settings)
    assert base64.b64decode(result.data[0].b64_json) == direct.info["file_bytes"]
    plain_mask = openai_api(gateway).images.edit(
        image=("start.png", picture, "image/png"),
        mask=("mask.png", png(repaint), "image/png"),
        prompt="a red door",
        response_format="b64_json",
        extra_body=settings,
    )
    assert base64.b64decode(plain_mask.data[0].b64_json) == direct.info["file_bytes"]


def test_edits_errors_keep_the_openai_shape(gateway) -> None:  # type: ignore[no-untyped-def]
    api = openai_api(gateway)
    picture = png(start_picture())
    with pytest.raises(openai.BadRequestError, match="strength"):
        api.images.edit(
            image=("start.png", picture, "image/png"),
            prompt="a cat",
            response_format="b64_json",
            extra_body={"strength": 1.5, "steps": 2},
        )
    with pytest.raises(openai.BadRequestError, match="takes one `image` file \\(got 2\\)"):
        api.images.edit(
            image=[("a.png", picture, "image/png"), ("b.png", picture, "image/png")],
            prompt="a cat",
            response_format="b64_json",
        )
    with pytest.raises(openai.BadRequestError, match="not a PNG, JPEG or WebP|not an image|cannot identify"):
        api.images.edit(image=("start.png", b"not a picture", "image/png"), prompt="a cat")
    with pytest.raises(openai.BadRequestError, match="response_format 'url' is not served"):
        api.images.edit(image=("start.png", picture, "image/png"), prompt="a cat", response_format="url")
    with pytest.raises(openai.BadRequestError, match="steps: Input should be a valid integer"):
        api.images.edit(
            image=("start.png", picture, "image/png"), prompt="a cat", extra_body={"steps": "many"}
        )
