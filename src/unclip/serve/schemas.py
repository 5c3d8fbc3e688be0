"""The OpenAI Images API's shapes as unclip serves them: requests, answers, limits, errors.

The fields and limits are dall-e-2's: a prompt of at most 1000 characters, n from 1 to 10,
`size` one of 256x256, 512x512, 1024x1024 (plus the model's own sides, e.g. 32x32 and
128x128), `response_format` url or b64_json. unclip's extra options ride in the same body:
`seed`, `steps`, `guidance_scale`, and per endpoint `prior_guidance_scale`, `sampler`,
`prior`, `eta` or `resample`. Unknown fields are refused, as the OpenAI API does.

Every error is the OpenAI error JSON, `{"error": {"message", "type", "param", "code"}}`, with
400 for invalid requests, 401 for a missing or wrong API key, 404 for unknown paths and
expired images, 413 for bodies over the upload limit and 429 when the queue is full.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from unclip import config

MAX_PROMPT = 1000          # characters, as dall-e-2
MAX_N = 10                 # images per request, as dall-e-2
MAX_IMAGE_BYTES = 4 * 1024 * 1024   # an uploaded PNG must be smaller ("less than 4 MB")
MAX_SEED = 2**53 - 1       # seeds stay exact in JavaScript numbers (the page shows and reuses them)
MAX_GUIDANCE = config.MAX_GUIDANCE  # as every entry point
MAX_RESAMPLE = 20          # RePaint resamplings per step for edits
OPENAI_SIZES = (256, 512, 1024)
RESPONSE_FORMATS = ("url", "b64_json")
SAMPLERS = ("ddim", "ddpm", "dpmsolver++")


class ApiError(Exception):
    """An error answered as the OpenAI error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- sizes ---------------------------------------------------------------------------------------


def size_name(side: int) -> str:
    return f"{side}x{side}"


def size_choices(native: Sequence[int]) -> list[str]:
    """Every `size` a request may ask for: the model's own sides, then the OpenAI sizes."""
    return [size_name(s) for s in sorted({*native, *OPENAI_SIZES})]


def parse_size(size: str | None, native: Sequence[int]) -> tuple[int, int]:
    """(the side the answer has, the cascade side that makes it) for a request's `size`.

    No size: the model's largest side. A native side is made as it is. Another side (256,
    512, 1024) is made by the smallest cascade stage at least as large, or the last stage if
    none is, then resized (Lanczos) to the asked side.
    """
    if size is None:
        return max(native), max(native)
    side = int(size.split("x")[0])
    larger = [s for s in sorted(native) if s >= side]
    return side, (larger[0] if larger else max(native))


# --- requests ------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("n", check_fields=False)
    @classmethod
    def _one_when_null(cls, n: int | None) -> int:
        return 1 if n is None else n  # OpenAI's n is nullable, default 1; its client sends null for None

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seeds_in_range(cls, seed: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if seed is not None and seed + n - 1 > MAX_SEED:  # image i answers seed + i, which must redraw it
            raise ValueError(f"image i uses seed + i, so with n={n} the seed can be at most {MAX_SEED - n + 1}")
        return seed


class _PromptRequest(_Request):
    @field_validator("prompt", check_fields=False)
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty; describe the image, e.g. \"a red circle above a blue square\"")
        return prompt


def request_models(*, sizes: Sequence[str], priors: Sequence[str], max_steps: int) -> dict[str, type[BaseModel]]:
    """Pydantic models of the three requests for one model ("generation", "edit", "variation").

    They are built per server because `size`, `prior` and the steps limit depend on the model.
    JSON bodies are validated strictly ("2" is not an integer); multipart fields arrive as text
    and are validated with `strict=False`.
    """
    common: dict[str, Any] = dict(
        model=(str | None, Field(None, max_length=256, description="dall-e-2 or the served model's id")),
        n=(int | None, Field(1, ge=1, le=MAX_N, description="number of images (null: 1)")),
        size=(Literal[tuple(sizes)] | None, Field(None, description="image side; default: the model's largest; "
                                                                     "docs/server.md says how sizes map")),
        response_format=(Literal[RESPONSE_FORMATS] | None, Field("url", description="url (kept 60 minutes) or "
                                                                                      "b64_json")),
        user=(str | None, Field(None, max_length=256, description="ignored")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED, description="unclip: image i uses seed + i; "
                                                                      "default: drawn and returned")),
        steps=(int | None, Field(None, ge=1, le=max_steps, description="unclip: decoder sampling steps")),
        guidance_scale=(float | None, Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                            description="unclip: decoder classifier-free guidance")),
    )
    prompt = (str, Field(..., min_length=1, max_length=MAX_PROMPT, description="what to draw"))
    generation = create_model(
        "GenerationRequest", __base__=_PromptRequest, prompt=prompt,
        quality=(Literal["standard", "auto"] | None, Field(None, description="accepted and ignored, as dall-e-2")),
        prior_guidance_scale=(float | None, Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                                  description="unclip: prior classifier-free guidance")),
        sampler=(Literal[SAMPLERS] | None, Field(None, description="unclip: decoder sampler")),
        prior=(Literal[tuple(priors)] | None if priors else None,
               Field(None, description="unclip: which prior (a model without one makes no generations)")),
        **common)
    edit = create_model(
        "EditRequest", __base__=_PromptRequest, prompt=prompt,
        resample=(int | None, Field(None, ge=1, le=MAX_RESAMPLE, description="unclip: RePaint resamplings per step")),
        **common)
    variation = create_model(
        "VariationRequest", __base__=_Request,
        eta=(float | None, Field(None, ge=0, le=1, allow_inf_nan=False,
                                 description="unclip: DDIM η; 0 redraws the image, 1 varies most")),
        **common)
    return {"generation": generation, "edit": edit, "variation": variation}


def validation_error(errors: Sequence[dict]) -> ApiError:
    """The first pydantic error of a request as a 400 OpenAI error naming its field."""
    err = errors[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    kind, value = err.get("type", ""), err.get("input")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing" and param is not None:
        return ApiError(400, f"'{param}' is a required property", param=param, code="missing_required_parameter")
    if kind == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request: send a JSON object "
                             "(Content-Type: application/json).", code="invalid_json")
    if param is None:
        return ApiError(400, "The body of your request must be a JSON object.", code="invalid_json")
    if kind == "string_too_long" and param == "prompt":
        return ApiError(400, f"Invalid 'prompt': string too long. Expected a string with maximum length "
                             f"{MAX_PROMPT}, but got a string with length {len(value)} instead.",
                        param=param, code="string_above_max_length")
    message = err.get("msg", "invalid value").removeprefix("Value error, ")
    shown = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return ApiError(400, f"Invalid value for '{param}': {shown}. {message}.".replace("..", "."), param=param,
                    code="invalid_value")


# --- answers (for the OpenAPI document) ----------------------------------------------------------


class ImageData(BaseModel):
    url: str | None = Field(None, description="where the PNG can be fetched for 60 minutes")
    b64_json: str | None = Field(None, description="the PNG, base64-encoded")
    revised_prompt: str | None = None
    seed: int = Field(..., description="unclip: the seed that redraws this image alone")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str = Field(..., description="the images' side, e.g. 256x256")
    warnings: list[str] = Field(default_factory=list, description="unclip: what the caller should know, e.g. "
                                                                  "prompt words the model never saw")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    sizes: list[str] = Field(..., description="unclip: the model's own image sides")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
