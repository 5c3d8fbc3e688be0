"""What every anchor worker shares: the anchor shapes, random batches, timers and the report line.

Each worker (worker_unclip.py, worker_diffusers.py, worker_lucidrains.py) runs in its own venv as
`python worker_X.py STAGE TRAIN_STEPS` and prints one JSON line; `run.py` collects them. This
module imports torch only, so it works in every venv.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# the anchor config: the matched sizes every implementation runs at (docs/performance.md)
CLIP_DIM, TEXT_WIDTH, TOKENS, TIMESTEPS = 64, 64, 77, 1000
DECODER = {"resolution": 32, "train_batch": 16, "sample_batch": 4, "sample_steps": 50}
PRIOR = {"width": 128, "depth": 4, "heads": 4, "head_dim": 32, "train_batch": 64, "sample_batch": 4,
         "sample_steps": 64}


PRECISION = "fp32"  # or "bf16": training steps and sampling under CPU bf16 autocast (set by `setup`)


def setup() -> tuple[str, int]:
    """Two threads, seed 0; the stage, number of timed training steps and precision from argv (a worker may
    read more after them)."""
    global PRECISION
    torch.set_num_threads(2)
    torch.manual_seed(0)
    PRECISION = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    return sys.argv[1], int(sys.argv[2])


def autocast():
    """bf16 autocast on the CPU with PRECISION "bf16", else a context that changes nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16")


def decoder_batch(n: int, g: torch.Generator) -> dict:
    """image [n, 3, 32, 32] in [-1, 1], unit z_i [n, 64], text_states [n, 77, 64], text_mask [n, 77]."""
    return {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "z_i": F.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1),
            "text_states": torch.randn(n, TOKENS, TEXT_WIDTH, generator=g),
            "text_mask": torch.ones(n, TOKENS, dtype=torch.long)}


def prior_batch(n: int, g: torch.Generator) -> dict:
    """text_states [n, 77, 64], text_mask [n, 77], unit z_t [n, 64] and z_i [n, 64]."""
    return {"text_states": torch.randn(n, TOKENS, TEXT_WIDTH, generator=g),
            "text_mask": torch.ones(n, TOKENS, dtype=torch.long),
            "z_t": F.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1),
            "z_i": F.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1)}


def measure_training(loss_fn, params, data: dict, *, batch_size: int, steps: int, optimizer=None) -> tuple[float, float]:
    """(rows/s over `steps` AdamW steps after two warm-up steps, FLOPs of one step counted by FlopCounterMode).

    optimizer(params) builds the implementation's own optimizer (default: torch's AdamW as it comes,
    what the anchors' training scripts build). FlopCounterMode counts matmuls, convolutions and
    attention (forward and backward), not normalisation, activations or the optimizer.
    """
    params = list(params)
    opt = optimizer(params) if optimizer else torch.optim.AdamW(params, lr=1e-4)

    def backward():
        with autocast():
            loss = loss_fn(data)
        loss.backward()

    def step():
        backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * batch_size / (time.perf_counter() - start)
    counter = FlopCounterMode(display=False)
    with counter:
        backward()
    opt.zero_grad(set_to_none=True)
    return rate, float(counter.get_total_flops())


def measure_latency(sample_fn, warm_fn=None) -> float:
    """Seconds of one `sample_fn()` after one warm-up call (of `warm_fn`, a shorter run, when given)."""
    with torch.no_grad(), autocast():
        (warm_fn or sample_fn)()
        start = time.perf_counter()
        sample_fn()
        return time.perf_counter() - start


def report(impl: str, stage: str, module_params, *, train_rate: float, train_flops: float, latency: float) -> None:
    """Print the worker's one JSON line; peak RSS is this whole process's (imports included)."""
    print(json.dumps({
        "impl": impl, "stage": stage, "torch": torch.__version__, "precision": PRECISION,
        "params_m": sum(p.numel() for p in module_params) / 1e6,
        "train_rate": train_rate, "train_flops": train_flops, "latency": latency,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }), flush=True)


def benchmark(impl: str, stage: str, module, loss_fn, make_sampler, *, steps: int, optimizer=None) -> None:
    """Measure and report one implementation's stage at the anchor config.

    Training rows/s and FLOPs of `loss_fn(batch)` on a seeded batch of the stage's train size;
    then, in eval mode, the latency of `make_sampler(batch)(n)` — a callable that samples n steps
    for a seeded batch of the stage's sample size — at the anchor's step count, after a 5-step
    warm-up.
    """
    spec, make_batch = (DECODER, decoder_batch) if stage == "decoder" else (PRIOR, prior_batch)
    g = torch.Generator().manual_seed(0)
    rate, flops = measure_training(loss_fn, module.parameters(), make_batch(spec["train_batch"], g),
                                   batch_size=spec["train_batch"], steps=steps, optimizer=optimizer)
    module.eval()
    sample = make_sampler(make_batch(spec["sample_batch"], g))
    latency = measure_latency(sample(spec["sample_steps"]), sample(5))
    report(impl, stage, module.parameters(), train_rate=rate, train_flops=flops, latency=latency)
