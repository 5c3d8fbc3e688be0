"""`unclip serve [MODEL]`: the OpenAI Images API and the web page over one model."""

from __future__ import annotations

import argparse
import os

from unclip.argtypes import port, positive_int, threads
from unclip.errors import ConfigError
from unclip.pipeline.cli import add_sampling_arguments, configure_sampling


def _serve(args: argparse.Namespace) -> int:
    from unclip.serve.run import is_loopback, serve

    api_key = args.api_key or os.environ.get("UNCLIP_API_KEY") or None
    if api_key is None and not is_loopback(args.host):
        raise ConfigError(f"--host {args.host} lets other machines in, so an API key is required: pass --api-key KEY "
                          "or set UNCLIP_API_KEY (clients send it as 'Authorization: Bearer KEY')")
    _check_free(args.host, args.port)  # before the model loads, not after
    import torch

    import unclip
    from unclip.serve.app import ServerOptions, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = configure_sampling(unclip.load(args.model, device=args.device, precision=args.precision), args)
    app = create_app(pipe, ServerOptions(api_key=api_key, max_queue=args.max_queue, max_batch=args.max_batch,
                                         max_steps=args.max_steps, model_id=args.name))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"unclip: serving {app.state.model_id} ({', '.join(f'{s}×{s}' for s in pipe.sizes)}) at "
          f"http://{shown}:{args.port}/ (the page); OpenAI API base_url http://{shown}:{args.port}/v1"
          + ("; API key required" if api_key else ""), flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _check_free(host: str, port: int) -> None:
    """A ConfigError when `host:port` cannot be bound (taken by another server, or not this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; is another server there? "
                              "Pick another --port") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="the OpenAI Images API and a web page over a model", description=(
        "Serve a model over HTTP: POST /v1/images/generations, /v1/images/edits and /v1/images/variations as the "
        "OpenAI Images API has them for dall-e-2 (the official openai client works with base_url .../v1), "
        "GET /v1/models, and a page at / to generate, vary and inpaint. Bound to 127.0.0.1 unless --host says "
        "otherwise; any other address needs an API key. docs/server.md has the details."))
    parser.add_argument("model", nargs="?", help="model directory (default: the shipped shapes-world model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $UNCLIP_API_KEY; "
                                          "required when --host is not a loopback address)")
    parser.add_argument("--name", help="the model id /v1/models lists (default: unclip-<config name>)")
    parser.add_argument("--max-queue", type=positive_int, default=64,
                        help="requests that may wait; more get 429 with Retry-After (default: 64)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="images per pipeline call, which bounds its memory: queued generations share a call up to it, "
                             "a request with a larger n is made that many at a time (default: 8; 1 turns batching off)")
    parser.add_argument("--max-steps", type=positive_int, default=250,
                        help="largest `steps` a request may ask for (default: 250)")
    parser.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    add_sampling_arguments(parser)
    parser.add_argument("--threads", type=threads, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="uvicorn's log level (default: info)")
    parser.set_defaults(func=_serve)
