"""Self-attention forward + backward time by head split and kernel, at one UNet attention layer's shape.

The UNet's attention (``difflab.nn.attention``) calls ``F.scaled_dot_product_attention``; which kernel
runs, and how the channels are split into heads, decides most of its cost. Each row times one layer's
forward and backward (sum of the output as the loss) at batch B, L tokens (a side x side feature map)
and C channels split into h heads of C / h dimensions: SDPA with the flash kernel, SDPA with the math
kernel, and the textbook softmax(QK^T / sqrt(d)) V written out. Prints JSON, then a markdown table.

    python benchmarks/attention_kernels.py                        # 16x16 map, 64 channels, batch 32
    python benchmarks/attention_kernels.py --side 8 --channels 128 --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from machine import machine
from torch.nn.attention import SDPBackend, sdpa_kernel


def textbook(q, k, v):
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v


def sdpa(backend: SDPBackend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


KERNELS = {
    "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa_math": sdpa(SDPBackend.MATH),
    "textbook": textbook,
}


def time_ms(attend, batch: int, heads: int, tokens: int, dim: int, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=g).requires_grad_() for _ in range(3))

    def once() -> None:
        attend(q, k, v).sum().backward()

    once()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=16, help="feature-map side; tokens = side^2 (default: 16)")
    p.add_argument("--channels", type=int, default=64, help="attention width C (default: 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", default="8,4,2,1", help="comma-separated head counts (default: 8,4,2,1)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions; the median is kept")
    args = p.parse_args()
    tokens = args.side**2
    rows = []
    for h in (int(x) for x in args.heads.split(",")):
        if args.channels % h:
            p.error(f"--heads {h} does not divide --channels {args.channels}")
        d = args.channels // h
        rows.append({"heads": h, "head_dim": d, **{name: round(time_ms(fn, args.batch, h, tokens, d, args.reps), 2)
                                                   for name, fn in KERNELS.items()}})  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "batch": args.batch, "tokens": tokens, "channels": args.channels, "unit": "ms per forward + backward",
        "rows": rows,
    }  # fmt: skip
    print(json.dumps(result))
    print("\n| heads x dim | " + " | ".join(KERNELS) + " |")
    print("|---|" + "---|" * len(KERNELS))
    for r in rows:
        print(f"| {r['heads']} x {r['head_dim']} | " + " | ".join(f"{r[k]:.1f}" for k in KERNELS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
