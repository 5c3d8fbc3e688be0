"""The FastAPI application: the OpenAI Images API, the page, and the guards around them.

Routes:
- POST /v1/images/generations (JSON), /v1/images/edits and /v1/images/variations (multipart),
  GET /v1/models and /v1/models/{id}: the OpenAI API as dall-e-2 has it (`schemas`).
- GET /images/{token}.png: the images of `url` answers, for 60 minutes (`store`).
- GET /: the page (static/); GET /api/info, /api/jobs/{id}, /api/status: what the page reads.
  A request sent with the header `Unclip-Job: ID` can be followed at /api/jobs/ID while it runs.

`Guard`, an ASGI middleware, checks the API key (Bearer) on /v1 and /api when one is set, and
refuses request bodies over the upload limit before reading them. A handler waits for its job
while watching the connection: when the client goes away the job is cancelled.
"""

# No `from __future__ import annotations` here: FastAPI reads the body type of `generations`
# from its annotation, a model built inside `create_app`.
import asyncio
import base64
import hmac
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from unclip import __version__
from unclip.serve import schemas, uploads
from unclip.serve.schemas import MAX_IMAGE_BYTES, ApiError
from unclip.serve.store import URL_TTL_S, ImageStore
from unclip.serve.worker import Busy, Task, Worker

STATIC = Path(__file__).resolve().parent / "static"
JOB_HEADER = "Unclip-Job"
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MULTIPART_BODY = 2 * MAX_IMAGE_BYTES + 256 * 1024   # an image, a mask and the form fields
JSON_BODY = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """How the server runs one model.

    api_key: required as `Authorization: Bearer KEY` on /v1 and /api when set. max_queue:
    requests that may wait before 429s. max_batch: images per pipeline call for batched
    generations. max_steps: the largest `steps` a request may ask for (never more than the
    decoder's timesteps). model_id: the name /v1/models lists (default: unclip-<config name>).
    """

    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 8
    max_steps: int = 250
    model_id: str | None = None
    url_ttl_s: float = URL_TTL_S


def create_app(pipe, options: ServerOptions | None = None) -> FastAPI:
    """The application serving `pipe` (an `UnclipPipeline`)."""
    options = options or ServerOptions()
    model_id = options.model_id or f"unclip-{pipe.config.name}"
    max_steps = max(1, min(options.max_steps, pipe.decoder.config.timesteps))
    sizes = schemas.size_choices(pipe.sizes)
    models = schemas.request_models(sizes=sizes, priors=pipe.priors, max_steps=max_steps)
    Generation = models["generation"]  # noqa: N806 - a class
    worker = Worker(pipe, model_id=model_id, max_queue=options.max_queue, max_batch=options.max_batch,
                    default_steps=pipe.decoder.config.sample_steps)
    store = ImageStore(ttl_s=options.url_ttl_s)
    work_side = max(pipe.resolution, pipe.clip.config.image_size)
    # uploads decode at full size (a 4096² 16-bit PNG of 41 KB takes ~400 MB for a moment): two at a
    # time, so that a burst of them cannot take the memory that --max-queue bounds for the pipeline
    decoding = asyncio.Semaphore(2)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await run_in_threadpool(worker.stop)

    # FastAPI's /docs and /redoc pages load their scripts from a CDN, so offline they were blank: the
    # machine-readable /openapi.json stays, the page at / is the human interface
    app = FastAPI(title="unclip", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="The OpenAI Images API (dall-e-2) over an unclip model; docs/server.md.")
    app.state.worker, app.state.store, app.state.model_id = worker, store, model_id
    _handlers(app)
    errors = {status: {"model": schemas.ErrorResponse, "description": text} for status, text in (
        (400, "invalid request"), (401, "missing or wrong API key"), (413, "body over the upload limit"),
        (429, "queue full; see Retry-After"))}

    def check_model(name: str | None) -> None:
        if name not in (None, "dall-e-2", model_id):
            raise ApiError(400, f"Invalid value for 'model' = {name}: this server has {model_id} (dall-e-2 is "
                                "accepted as its alias)", param="model", code="model_not_found")

    async def answer(request: Request, task: Task, response_format: str | None) -> Response:
        job_id = request.headers.get(JOB_HEADER)
        if job_id is not None and not JOB_ID.fullmatch(job_id):
            raise ApiError(400, f"the {JOB_HEADER} header must be 1–64 letters, digits, - or _", param=JOB_HEADER)
        try:
            job = worker.submit(task, job_id)
        except Busy as busy:
            raise ApiError(429, f"The {str(busy).removeprefix('the ')}.", type="requests",  # said once, not twice
                           code="rate_limit_exceeded", headers={"Retry-After": str(busy.retry_after)}) from None
        try:
            while not await job.wait(0.25):
                if await request.is_disconnected():
                    worker.cancel(job)
                    return Response(status_code=499)  # client closed request: nobody reads this
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        if job.error is not None:
            raise job.error
        if job.state != "done":
            raise ApiError(503, "The server stopped before your request was done; retry.", type="server_error")
        data = []
        for i, png in enumerate(job.pngs):
            if response_format == "b64_json":
                item = {"b64_json": base64.b64encode(png).decode("ascii")}
            else:
                item = {"url": f"{request.base_url}images/{store.put(png)}.png"}
            data.append({**item, "revised_prompt": None, "seed": job.seed + i})
        return JSONResponse({"created": int(time.time()), "data": data, "size": schemas.size_name(task.side),
                             "warnings": (pipe.prompt_warnings(task.prompt) if task.prompt else []) + image_warnings(task)})

    def image_warnings(task: Task) -> list[str]:
        """An edit's or variation's image smaller than the sides the pipeline reads it at (CLIP's when it
        encodes the image: variations, and edits without a prompt; the decoder's): upscaled, so blurred."""
        if task.image is None:
            return []
        reads = (pipe.clip.config.image_size,) if task.kind == "vary" or not task.prompt else ()
        found = [pipe.small_image_warning(task.image.width, size) for size in (*reads, pipe.config.decoder.resolution)]
        return [w for w in found if w][:1]

    def options_of(params: BaseModel, names: tuple[str, ...]) -> dict:
        return {name: getattr(params, name) for name in names if getattr(params, name) is not None}

    @app.post("/v1/images/generations", response_model=schemas.ImagesResponse, responses=errors,
              summary="Create images from a prompt")
    async def generations(request: Request, body: Generation) -> Response:
        check_model(body.model)
        side, cascade = schemas.parse_size(body.size, pipe.sizes)
        task = Task(kind="generate", n=body.n, side=side, cascade_side=cascade, prompt=body.prompt, seed=body.seed,
                    options=options_of(body, ("steps", "guidance_scale", "prior_guidance_scale", "sampler", "prior")))
        return await answer(request, task, body.response_format)

    @app.post("/v1/images/edits", response_model=schemas.ImagesResponse, responses=errors,
              summary="Repaint the transparent region of an image",
              openapi_extra=_multipart(models["edit"], {"image": True, "mask": False}))
    async def edits(request: Request) -> Response:
        params, files = await _read_form(request, models["edit"], ("image", "mask"))
        check_model(params.model)

        def prepare():
            image = uploads.read_png(files["image"], param="image")
            mask = uploads.read_png(files["mask"], param="mask") if "mask" in files else None
            hole = uploads.edit_mask(image, mask)
            return (uploads.fit(uploads.rgb(image), work_side),
                    uploads.fit(hole, work_side, resample=Image.Resampling.BOX))

        async with decoding:
            image, hole = await run_in_threadpool(prepare)
        side, cascade = schemas.parse_size(params.size, pipe.sizes)
        task = Task(kind="edit", n=params.n, side=side, cascade_side=cascade, prompt=params.prompt,
                    seed=params.seed, image=image, mask=hole,
                    options=options_of(params, ("steps", "guidance_scale", "resample")))
        return await answer(request, task, params.response_format)

    @app.post("/v1/images/variations", response_model=schemas.ImagesResponse, responses=errors,
              summary="Create variations of an image",
              openapi_extra=_multipart(models["variation"], {"image": True}))
    async def variations(request: Request) -> Response:
        params, files = await _read_form(request, models["variation"], ("image",))
        check_model(params.model)

        def prepare():
            return uploads.fit(uploads.rgb(uploads.read_png(files["image"], param="image")), work_side)

        async with decoding:
            image = await run_in_threadpool(prepare)
        side, cascade = schemas.parse_size(params.size, pipe.sizes)
        task = Task(kind="vary", n=params.n, side=side, cascade_side=cascade, seed=params.seed, image=image,
                    options=options_of(params, ("steps", "guidance_scale", "eta")))
        return await answer(request, task, params.response_format)

    card = {"id": model_id, "object": "model", "created": created, "owned_by": "unclip",
            "sizes": [schemas.size_name(s) for s in pipe.sizes]}

    @app.get("/v1/models", response_model=schemas.ModelList, responses={401: errors[401]}, summary="List models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}", response_model=schemas.ModelCard, summary="Describe a model",
             responses={401: errors[401], 404: {"model": schemas.ErrorResponse, "description": "unknown model"}})
    async def get_model(name: str) -> dict:
        if name not in (model_id, "dall-e-2"):
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return card

    @app.get("/images/{name}", summary="An image of a url answer (kept 60 minutes)",
             responses={200: {"content": {"image/png": {}}}, 404: {"model": schemas.ErrorResponse}})
    async def stored_image(name: str) -> Response:
        found = store.get(name.removesuffix(".png"))
        if found is None:
            raise ApiError(404, "This image does not exist or has expired (images are kept 60 minutes).",
                           code="image_not_found")
        png, left = found
        return Response(png, media_type="image/png", headers={"Cache-Control": f"private, max-age={int(left)}"})

    # HEAD, which every server must answer as GET without the body (RFC 9110 §9.3.2): link checkers and
    # downloaders ask it first; kept out of the document, whose GET describes both
    app.head("/images/{name}", include_in_schema=False)(stored_image)

    @app.get("/api/info", include_in_schema=False)
    async def info() -> dict:
        cfg = pipe.config
        prior = pipe.prior.config if pipe.prior is not None else None
        return {"model": model_id, "sizes": sizes, "native_sizes": card["sizes"], "priors": pipe.priors,
                "example_prompt": pipe.example_prompt,
                "default_size": schemas.size_name(max(pipe.sizes)), "auth": options.api_key is not None,
                "defaults": {"steps": cfg.decoder.sample_steps, "guidance_scale": cfg.decoder.guidance_scale,
                             "prior_guidance_scale": None if prior is None else prior.guidance_scale},
                "limits": {"prompt": schemas.MAX_PROMPT, "n": schemas.MAX_N, "steps": max_steps,
                           "guidance_scale": schemas.MAX_GUIDANCE, "image_bytes": MAX_IMAGE_BYTES}}

    @app.get("/api/jobs/{job_id}", include_in_schema=False)
    async def job_progress(job_id: str) -> dict:
        progress = worker.progress(job_id)
        if progress is None:
            raise ApiError(404, f"no job {job_id!r} (jobs are kept 2 minutes after they finish)", code="job_not_found")
        return progress

    @app.get("/api/status", include_in_schema=False)
    async def status() -> dict:
        return {**worker.status(), "stored_images": len(store)}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: _openapi(app, options.api_key is not None)
    app.add_middleware(Guard, api_key=options.api_key)
    return app


# --- multipart requests --------------------------------------------------------------------------


async def _read_form(request: Request, model: type[BaseModel], files: tuple[str, ...]):
    """(validated fields, {file name: bytes}) of a multipart request; the first file is required."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "This endpoint takes multipart/form-data, with the image as a file part.",
                       code="invalid_content_type")
    fields, blobs = {}, {}
    body = await request.body()  # kept, to tell a text field's own bytes from starlette's latin-1 fallback
    # room for a few stray files, so that one sent for a text field is named below, not "too many files"
    async with request.form(max_files=len(files) + 4, max_fields=32, max_part_size=64 * 1024) as form:
        for key, value in form.multi_items():
            if key in fields or key in blobs:
                raise ApiError(400, f"'{key}' is given more than once", param=key, code="invalid_value")
            if isinstance(value, UploadFile) != (key in files):
                if key not in files and key not in model.model_fields:
                    raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key,
                                   code="unknown_parameter")
                kind = "a file part (a PNG)" if key in files else "a text field"
                raise ApiError(400, f"'{key}' must be sent as {kind}", param=key, code="invalid_value")
            if key in files:
                blobs[key] = await value.read()
            else:
                fields[key] = _text_field(key, value, body, request.headers["content-type"])
    if files[0] not in blobs:
        raise ApiError(400, f"'{files[0]}' is a required property: upload a square PNG", param=files[0],
                       code="missing_required_parameter")
    try:
        return model.model_validate(fields, strict=False), blobs
    except ValidationError as err:
        raise schemas.validation_error(err.errors()) from None


def _text_field(key: str, value: str, body: bytes, content_type: str) -> str:
    """A multipart text field as sent, or a 400 when its bytes were not text in the form's charset.

    starlette decodes a field in the charset the Content-Type declares (UTF-8 by default) and, when
    the bytes are not valid there, silently as latin-1: a prompt typed in TIS-620 would be drawn as
    mojibake. A field read in its charset re-encodes to bytes that are in the body; one read by the
    fallback does not (its latin-1 characters re-encode to other bytes).
    """
    declared = re.search(r";\s*charset=\"?([\w.:-]+)", content_type, re.IGNORECASE)
    charset = declared.group(1) if declared else "utf-8"
    try:
        sent = value.encode(charset)
    except LookupError:
        raise ApiError(400, f"The Content-Type names the charset {charset!r}, which is unknown: send the form's "
                            "text fields in UTF-8", param=key, code="invalid_value") from None
    except UnicodeEncodeError:
        sent = None
    if sent is not None and sent in body:
        return value
    raise ApiError(400, f"'{key}' is not {charset} text: send the form's text fields in UTF-8 (or name their "
                        "charset in the Content-Type, e.g. multipart/form-data; charset=tis-620)",
                   param=key, code="invalid_value")


def _multipart(model: type[BaseModel], files: dict[str, bool]) -> dict:
    """The OpenAPI requestBody of a multipart endpoint: `model`'s fields plus the file parts."""
    schema = model.model_json_schema()
    properties = {name: {"type": "string", "format": "binary",
                         "description": "a square PNG under 4 MB" + ("" if name == "image" else
                                                                      "; fully transparent pixels mark the edit")}
                  for name in files}
    for name, prop in schema["properties"].items():  # an optional field is left out, never sent as null
        options = [p for p in prop.pop("anyOf", []) if p.get("type") != "null"]
        properties[name] = {**(options[0] if options else {}), **prop}
    required = [name for name, needed in files.items() if needed] + schema.get("required", [])
    body = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}


# --- errors, auth and limits ---------------------------------------------------------------------


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _handlers(app: FastAPI) -> None:
    """Every error as the OpenAI error JSON."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":  # FastAPI reads no JSON from it, so every field "is missing"
            return _error(ApiError(400, f"This endpoint takes a JSON object sent with Content-Type: "
                                        f"application/json; the request said {content_type or 'no Content-Type'}.",
                                   code="invalid_content_type"))
        return _error(schemas.validation_error(err.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif err.status_code == 405:
            message = f"Method not allowed ({request.method} {request.url.path})"
        else:
            message = str(err.detail)
        code = {400: "invalid_request_body", 413: "request_too_large"}.get(err.status_code)  # Starlette's own
        return _error(ApiError(err.status_code, message, code=code, headers=dict(err.headers or {})))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, err: ClientDisconnect) -> Response:
        # the client left while its upload was read: no bug to log, and nobody reads the answer
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        return _error(ApiError(500, "The server had an error while processing your request.", type="server_error"))


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        why = "uploads must be PNGs under 4 MB" if limit == MULTIPART_BODY else "the limit for a JSON request"
        super().__init__(413, f"The request body is larger than {limit // 1024} KiB, {why}.")


class Guard:
    """ASGI middleware: the API key on /v1 and /api, and the request body limit everywhere."""

    def __init__(self, app, *, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and path.startswith(("/v1/", "/api/")) and not self._authorized(headers):
            given = "authorization" in headers
            message = ("Incorrect API key provided." if given else
                       "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
            err = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await _error(err)(scope, receive, send)
        limit = MULTIPART_BODY if path in ("/v1/images/edits", "/v1/images/variations") else JSON_BODY
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            err = ApiError(413 if length.isdigit() else 400, str(BodyTooLarge(limit).detail)
                           if length.isdigit() else "invalid Content-Length", code="request_too_large")
            return await _error(err)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


def _openapi(app: FastAPI, secured: bool) -> dict:
    """FastAPI's document without its 422 answers (errors here are 400s), with the bearer scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if secured and path.startswith("/v1/"):
                operation["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema
