"""`unclip serve`: the OpenAI Images API and a web page over one `UnclipPipeline`.

- `app.create_app(pipe, options)`: the FastAPI application. POST /v1/images/generations (JSON),
  /v1/images/edits and /v1/images/variations (multipart), GET /v1/models, the images behind
  `url` answers (kept 60 minutes), the page at / and its progress endpoint.
- `schemas`: the API's request and response shapes, its limits and its error JSON.
- `uploads`: reading uploaded PNGs safely (size, decompression bombs, masks) and encoding answers.
- `worker`: one thread runs the pipeline; requests wait in a bounded queue, generations are
  batched, and a request whose client went away is cancelled.
- `run`: serving an app in the foreground (the CLI) or in a background thread (tests, benchmarks).

docs/server.md describes the API, the size mapping, the limits and the page.
"""

from __future__ import annotations


def create_app(pipe, options=None):
    """The FastAPI application serving `pipe` (see `unclip.serve.app.create_app`)."""
    from unclip.serve.app import create_app as _create_app

    return _create_app(pipe, options)


__all__ = ["create_app"]
