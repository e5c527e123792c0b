"""An OpenAI-compatible HTTP face for a generator: `POST /v1/images/generations`, `POST /v1/images/edits`
(img2img and inpainting), `GET /healthz`, plus a web page (`GET /`) and the progress stream it uses
(`POST /v1/zsplit/images/stream`, NDJSON).

A thin FastAPI app over the SDK's AsyncClient; no model runs here. Errors keep the OpenAI shape
(`{"error": {"message", "type", "code"}}`) with the HTTP status that matches the gRPC code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.routing import Match

from zimage_split.client.aio import AsyncClient, Latents, ProgressCallback
from zimage_split.common import tracing
from zimage_split.common.errors import InvalidArgument, ZSplitError
from zimage_split.common.logs import REQUEST_ID_KEY, request_scope, usable_request_id
from zimage_split.common.metrics import MetricsSettings, ServiceMetrics, serve_metrics
from zimage_split.common.security import ClientSecurity

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "DATA_LOSS": 502,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# The page holds no secret (its API calls carry the token), and health checkers have none.
PUBLIC_PATHS = ("/", "/healthz")

logger = logging.getLogger(__name__)


class PassBody(BaseModel):
    scale: float
    steps: int | None = None
    strength: float | None = None


class Extensions(BaseModel):
    """zimage-split's settings beyond OpenAI's, on every images route: `seed`, `steps`, `negative_prompt`,
    `guidance_scale`, `shift`, Skip Layer Guidance (`slg_scale`, `slg_layers`, `slg_start`, `slg_stop`) and
    DyPE (`dype`, `dype_method`, `dype_scale`, `dype_exponent`)."""

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1)
    response_format: Literal["b64_json", "url"] = "b64_json"
    # Accepted for compatibility and ignored: Z-Image has no such settings.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    steps: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    slg_scale: float = 0.0
    slg_layers: list[int] = Field(default_factory=list)
    slg_start: float | None = None
    slg_stop: float | None = None
    dype: bool = False
    dype_method: str | None = None
    dype_scale: float | None = None
    dype_exponent: float | None = None

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of AsyncClient.generate_images these fields stand for."""
        if self.response_format != "b64_json":
            raise InvalidArgument(
                "response_format 'url' is not served: this gateway keeps no files. Ask for b64_json."
            )
        return {
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "shift": self.shift,
            "slg_scale": self.slg_scale,
            "slg_layers": self.slg_layers,
            "slg_start": self.slg_start,
            "slg_stop": self.slg_stop,
            "dype": self.dype,
            "dype_method": self.dype_method,
            "dype_scale": self.dype_scale,
            "dype_exponent": self.dype_exponent,
            "model": self.model if self.model and self.model != "z-image-turbo" else "",
            "num_images": self.n,
        }


class ImagesRequest(Extensions):
    """OpenAI's images.generate body, plus the Extensions, multi-pass `passes` (each {"scale", "steps",
    "strength"}; the final image comes back) and a ControlNet (`controlnet`, its name on the generator;
    `control_image`, a PNG, JPEG or WebP file in base64, optionally as a data: URL; `controlnet_scale`)."""

    size: str = "1024x1024"
    passes: list[PassBody] = Field(default_factory=list)
    controlnet: str | None = None
    control_image: str | None = None
    controlnet_scale: float | None = None


class EditsRequest(Extensions):
    """The fields of OpenAI's images.edit form besides its files, plus the Extensions and `strength`.

    `size` unset (or "auto") keeps the image's own size, rounded down to a multiple of 16.
    """

    size: str | None = None
    strength: float | None = None


def openai_error(status: int, message: str, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": code}}
    )


def parse_size(size: str) -> tuple[int, int]:
    match = SIZE.match(size)
    if match is None:
        raise InvalidArgument(
            f"size {size!r} must be WIDTHxHEIGHT in pixels, e.g. 1024x1024 (multiples of 16)."
        )
    return int(match[1]), int(match[2])


async def generate(
    client: AsyncClient, body: ImagesRequest, on_progress: ProgressCallback | None = None
) -> list[Image.Image | Latents]:
    """Runs one images request on the generator; the JSON and the streaming routes both come here."""
    settings = body.settings()
    width, height = parse_size(body.size)
    return await client.generate_images(
        body.prompt,
        width=width,
        height=height,
        passes=[spec.model_dump(exclude_none=True) for spec in body.passes],
        controlnet=body.controlnet,
        control_image=None if body.control_image is None else _base64_file(body.control_image),
        controlnet_scale=body.controlnet_scale,
        on_progress=on_progress,
        **settings,
    )


# The form fields of /v1/images/edits that may come more than once (OpenAI's client sends a list as name[]).
LIST_FIELDS = ("slg_layers",)


async def edit(client: AsyncClient, request: Request) -> list[Image.Image | Latents]:
    """Runs one /v1/images/edits form: its `image` is the img2img start image, its `mask` (if any) turns it
    into inpainting. A mask with an alpha channel follows OpenAI (fully transparent = edit there); one without
    follows diffusers (white = repaint)."""
    form = await request.form()
    files = {key: [value for value in form.getlist(key) if not isinstance(value, str)] for key in form}
    fields: dict[str, Any] = {}
    for key in {key for key in form if not files[key]}:
        name = key.removesuffix("[]")
        values = [value for value in form.getlist(key) if isinstance(value, str)]
        fields[name] = values if name in LIST_FIELDS else values[-1]
    try:
        body = EditsRequest.model_validate(fields)
    except ValidationError as error:
        raise InvalidArgument(validation_message(error.errors())) from None
    images = files.get("image", []) + files.get("image[]", [])
    if len(images) != 1:
        raise InvalidArgument(
            f"/v1/images/edits takes one `image` file (got {len(images)}): the picture to start from."
        )
    masks = files.get("mask", [])
    if len(masks) > 1:
        raise InvalidArgument(f"/v1/images/edits takes at most one `mask` file (got {len(masks)}).")
    settings = body.settings()
    width = height = None
    if body.size not in (None, "auto"):
        width, height = parse_size(body.size)
    mask = repaint_mask(await masks[0].read()) if masks else None
    return await client.generate_images(
        body.prompt,
        init_image=await images[0].read(),
        mask=mask,
        strength=body.strength,
        width=width,
        height=height,
        **settings,
    )


def repaint_mask(data: bytes) -> bytes:
    """An uploaded mask as the generator takes it (white = repaint). OpenAI's masks mark the area to edit
    as fully transparent; a mask without an alpha channel is passed on as it is (diffusers' convention)."""
    try:
        with Image.open(io.BytesIO(data)) as mask:
            mask.load()
            if "A" not in mask.getbands() and not (mask.mode == "P" and "transparency" in mask.info):
                return data
            alpha = mask.convert("RGBA").getchannel("A")
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"The mask is not a PNG, JPEG or WebP image ({error}).") from None
    repaint = alpha.point(lambda value: 255 if value == 0 else 0)
    out = io.BytesIO()
    repaint.save(out, format="PNG")
    return out.getvalue()


def validation_message(details: Sequence[Any]) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item.get('loc', ()) if part != 'body') or 'body'}: {item.get('msg')}"
        for item in details
    )


def images_response(images: Sequence[Image.Image | Latents]) -> dict[str, Any]:
    """OpenAI's images response: each image's file (the generator's PNG) in base64, plus its seed."""
    return {
        "created": int(time.time()),
        "data": [
            {
                "b64_json": base64.b64encode(image.info["file_bytes"]).decode("ascii"),
                "revised_prompt": None,
                "seed": image.info["seed"],
            }
            for image in images
        ],
    }


def _base64_file(value: str) -> bytes:
    """The file bytes of a base64 string or a base64 data: URL ("data:image/png;base64,...")."""
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(
            "control_image must be a PNG, JPEG or WebP file in base64 (or a base64 data: URL)."
        ) from None


def ndjson(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":")) + "\n").encode()


async def stream_events(
    task: asyncio.Future[list[Image.Image | Latents]],
    steps: asyncio.Queue[tuple[int, int] | None],
    first: tuple[int, int] | None,
) -> AsyncIterator[bytes]:
    """The NDJSON lines of a running generation: a progress line per step (`first`, then what `steps`
    yields until its None), then an image line per image and a done line, or one error line."""
    step = first
    while step is not None:
        yield ndjson({"type": "progress", "step": step[0], "total": step[1]})
        step = await steps.get()
    try:
        images = task.result()
    except ZSplitError as error:
        yield ndjson({"type": "error", "error": {"message": error.message, "code": error.code.lower()}})
        return
    except Exception:
        logger.exception("The image stream failed unexpectedly")
        message = "The gateway failed unexpectedly; its log has the traceback."
        yield ndjson({"type": "error", "error": {"message": message, "code": "internal"}})
        return
    for image in images:
        yield ndjson(
            {
                "type": "image",
                "b64_json": base64.b64encode(image.info["file_bytes"]).decode("ascii"),
                "seed": image.info["seed"],
                "width": image.info["width"],
                "height": image.info["height"],
                "format": image.info["format"],
            }
        )
    yield ndjson({"type": "done"})


class GenerationStream(StreamingResponse):
    """stream_events as an NDJSON response that cancels the generation when the response ends early."""

    def __init__(
        self,
        task: asyncio.Future[list[Image.Image | Latents]],
        steps: asyncio.Queue[tuple[int, int] | None],
        first: tuple[int, int] | None,
    ) -> None:
        super().__init__(
            stream_events(task, steps, first),
            media_type="application/x-ndjson",
            # Proxies such as nginx would otherwise hold the progress lines back until the end.
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.task = task

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A client that goes away stops the response, possibly before its first line; the
            # generation must not run on for nobody.
            self.task.cancel()


def route_template(app: FastAPI, request: Request) -> str:
    """The path of the route `request` is for ("unmatched" for none): metrics label calls by it, not by
    the raw path, so a scanner's random URLs do not mint new series. Found even for a request refused
    before routing (a missing token)."""
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


def create_app(
    generator: str,
    *,
    security: ClientSecurity | None = None,
    tokens: tuple[str, ...] | Callable[[], tuple[str, ...]] = (),
    timeout: float = 600.0,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The gateway app for the generator at `generator`. With `tokens`, every route but the page (/) and
    /healthz needs `Authorization: Bearer <token>`; a callable (security.accepted_tokens, which follows a
    token file) is asked at each request. Requests are counted in `metrics` (service "http")."""
    current_tokens = tokens if callable(tokens) else (lambda: tokens)
    metrics = metrics or ServiceMetrics("http")
    page = resources.files("zimage_split").joinpath("web/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = AsyncClient(generator=generator, timeout=timeout, security=security)
        try:
            yield
        finally:
            await app.state.client.close()

    app = FastAPI(
        title="zimage-split",
        description="OpenAI-compatible image generation with Z-Image-Turbo, served by zimage-split.",
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        accepted = current_tokens()
        if accepted and request.url.path not in PUBLIC_PATHS:
            header = request.headers.get("authorization", "")
            given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
            if not any(hmac.compare_digest(given.encode(), token.encode()) for token in accepted):
                return openai_error(
                    401,
                    "This gateway needs `Authorization: Bearer <token>` with a valid token.",
                    "unauthenticated",
                )
        return await call_next(request)

    @app.middleware("http")  # added last, so outermost: it sees every answer, refusals included
    async def observe(request: Request, call_next: Any) -> Any:
        request_id = usable_request_id(request.headers.get(REQUEST_ID_KEY))
        span_name = f"{request.method} {request.url.path}"
        with request_scope(request_id), tracing.server_span(span_name, dict(request.headers), {}):
            started, status = time.perf_counter(), 500
            metrics.in_flight.labels(metrics.service).inc()
            try:
                response = await call_next(request)
                status = response.status_code
            finally:
                metrics.in_flight.labels(metrics.service).dec()
                seconds = time.perf_counter() - started
                method = f"{request.method} {route_template(app, request)}"
                metrics.count_request(method, str(status), seconds)
                # A stream's time is to its first line; its progress goes on after this.
                logger.info("%s %s %d %.3f s", request.method, request.url.path, status, seconds)
        response.headers[REQUEST_ID_KEY] = request_id
        return response

    @app.exception_handler(ZSplitError)
    async def service_error(request: Request, error: ZSplitError) -> JSONResponse:
        return openai_error(HTTP_STATUS.get(error.code, 500), error.message, error.code.lower())

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        message = validation_message(error.errors())
        return openai_error(
            400, message or "The request body is not valid JSON for this route.", "invalid_request"
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        try:
            info = await app.state.client.generator_info(timeout=5.0)
        except ZSplitError as error:
            return JSONResponse(status_code=503, content={"status": "unavailable", "reason": error.message})
        return JSONResponse(content={"status": "ok", "model": info.get("model_id", "")})

    @app.get("/", include_in_schema=False)
    async def web_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post("/v1/images/generations")
    async def images_generations(body: ImagesRequest) -> dict[str, Any]:
        images = await generate(app.state.client, body)
        return images_response(images)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> dict[str, Any]:
        """OpenAI's images.edit (multipart form): `image`, optional `mask`, `prompt`, `n`, `size` (unset or
        "auto": the image's own), `response_format` b64_json, plus `strength` and the generation extensions."""
        images = await edit(app.state.client, request)
        return images_response(images)

    @app.post("/v1/zsplit/images/stream")
    async def images_stream(body: ImagesRequest) -> GenerationStream:
        """The body of /v1/images/generations, answered as NDJSON lines: {"type": "progress", "step",
        "total"} per denoising step, {"type": "image", "b64_json", "seed", "width", "height", "format"}
        per image, then {"type": "done"}; an error after the first line comes as {"type": "error"}."""
        steps: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        task = asyncio.ensure_future(
            generate(app.state.client, body, lambda step, total: steps.put_nowait((step, total)))
        )
        task.add_done_callback(lambda _: steps.put_nowait(None))
        # The response starts at the first step, so that what the generator refuses at once (a size that is
        # not a multiple of 16, too many images, a full queue) keeps its HTTP status and JSON error.
        try:
            first = await steps.get()
        except BaseException:
            task.cancel()
            raise
        if first is None:
            task.result()
        return GenerationStream(task, steps, first)

    return app


async def serve_http(
    app: FastAPI,
    *,
    host: str,
    port: int,
    cert_file: str | None = None,
    key_file: str | None = None,
    metrics: ServiceMetrics | None = None,
    metrics_settings: MetricsSettings | None = None,
) -> None:
    """Serves `app` with uvicorn until SIGINT or SIGTERM; TLS when given a certificate and key. `metrics`
    (those `app` counts in) go to Prometheus as `metrics_settings` say, when both are given."""
    import uvicorn

    # log_config=None: uvicorn's own lines go through the process's logging set-up (and --log-format).
    config = uvicorn.Config(
        app, host=host, port=port, ssl_certfile=cert_file, ssl_keyfile=key_file, log_config=None
    )
    endpoint = serve_metrics(metrics, metrics_settings) if metrics and metrics_settings else None
    # uvicorn drains on SIGINT or SIGTERM, then raises the signal again; with the default handlers that
    # kills the process (SIGTERM) or ends it in KeyboardInterrupt, exit status 130 (SIGINT). Handlers of ours
    # let it exit 0 after the drain, as the gRPC services do.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        await uvicorn.Server(config).serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if endpoint is not None:
            endpoint.stop()
