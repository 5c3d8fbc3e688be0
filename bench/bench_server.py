"""The server under load: 200 generation requests from 16 concurrent clients on loopback.

    .venv/bin/python bench/bench_server.py                      # the shipped model, 32², 10 steps
    .venv/bin/python bench/bench_server.py --compare            # and again with batching off
    .venv/bin/python bench/bench_server.py --model DIR --size 64x64 --steps 4

The server (the real application, uvicorn on 127.0.0.1) runs in a thread of this process; 16
client threads, each with its own keep-alive connection, POST /v1/images/generations
(response_format b64_json, one image each, English and Thai prompts) until 200 requests have
been answered. Every answer must be a 200 holding a PNG of the asked size: none may be lost.
Prints p50/p99 latency, images/s, and the mean batch the worker ran, with the model, size,
steps and torch threads used.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import threading
import time

import httpx2 as httpx
import torch
from PIL import Image

import unclip
from unclip.serve.app import ServerOptions, create_app
from unclip.serve.run import running

PROMPTS = ("a red circle above a blue square", "three yellow hearts", "a small green star on the left",
           "วงกลมสีแดง", "ดาวสีน้ำเงินอยู่เหนือสี่เหลี่ยมจัตุรัสสีเขียว", "a large purple hexagon")


def load(url: str, *, requests: int, clients: int, body: dict, side: int) -> dict:
    """Send `requests` requests from `clients` threads; latencies and failures."""
    latencies, failures, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                response = http.post("/v1/images/generations", json={**body, "prompt": PROMPTS[i % len(PROMPTS)]})
                elapsed = time.perf_counter() - started
                ok = response.status_code == 200 and _png_side(response.json()) == side
                with lock:
                    (latencies if ok else failures).append(elapsed if ok else (i, response.status_code,
                                                                                  response.text[:200]))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"wall": time.perf_counter() - started, "latencies": sorted(latencies), "failures": failures}


def _png_side(answer: dict) -> int:
    image = Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
    return image.width if image.width == image.height else -1


def run(pipe, args: argparse.Namespace, max_batch: int) -> int:
    """One load run; prints its line and returns how many requests were lost."""
    body = {"size": args.size, "steps": args.steps, "response_format": "b64_json", "n": 1}
    side = int(args.size.split("x")[0])
    app = create_app(pipe, ServerOptions(max_queue=args.clients * 4, max_batch=max_batch))
    with running(app) as url:
        load(url, requests=2, clients=1, body=body, side=side)  # warm-up
        before = httpx.get(url + "/api/status").json()
        result = load(url, requests=args.requests, clients=args.clients, body=body, side=side)
        after = httpx.get(url + "/api/status").json()
    lat = result["latencies"]
    answered = len(lat)
    if not lat:  # every request failed: say why, not StatisticsError
        print(f"max_batch {max_batch:>2}: 0/{args.requests} answered (ALL LOST)")
        for failure in result["failures"][:5]:
            print("  failed:", failure)
        return args.requests
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    batches = after.get("batches", 0) - before.get("batches", 0)
    mean_batch = (after.get("images", 0) - before.get("images", 0)) / max(1, batches)
    lost = args.requests - answered
    verdict = "none lost" if not lost else f"{lost} LOST"
    print(f"max_batch {max_batch:>2}: {answered}/{args.requests} answered ({verdict})"
          f" · p50 {p50:.2f} s · p99 {p99:.2f} s · {answered / result['wall']:.2f} images/s · "
          f"mean batch {mean_batch:.1f} · wall {result['wall']:.0f} s")
    for failure in result["failures"][:5]:
        print("  failed:", failure)
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the shipped model)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", default="32x32", help="image size to ask for (default: 32x32, the decoder's side)")
    parser.add_argument("--steps", type=int, default=10, help="decoder steps per image (default: 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--max-batch", type=int, default=8, help="images per batched call (default: 8)")
    parser.add_argument("--compare", action="store_true", help="run again with batching off (max_batch 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = unclip.load(args.model)
    name = args.model or "the shipped default model"
    print(f"{args.requests} requests from {args.clients} clients on loopback · {name} ({pipe.config.name}, sizes "
          f"{pipe.sizes}) · size {args.size} · {args.steps} decoder steps · {args.threads} torch thread(s)")
    lost = run(pipe, args, args.max_batch)
    if args.compare:
        lost += run(pipe, args, 1)
    raise SystemExit(1 if lost else 0)


if __name__ == "__main__":
    main()
