"""Optimiser step of the default flow (21.5 M parameters, d 384): PyTorch's CPU default Adam vs the fused kernel.

Prints ms per step for each and their ratio, measured in one run on one torch thread (the sweep's setting):

    python benchmarks/flow_speed.py
"""

from __future__ import annotations

import time

import torch

from sanf_pipeline.flow import SANFlow
from sanf_pipeline.train.config import FitConfig


def step_ms(fused: bool, steps: int = 10) -> float:
    torch.manual_seed(0)
    flow = SANFlow(**FitConfig(fusion="none").flow_kwargs(384, 384, 64))
    opt = torch.optim.Adam(flow.parameters(), lr=5e-5, weight_decay=1e-5, fused=fused)
    for p in flow.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # allocate the state
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps * 1000


def main() -> None:
    torch.set_num_threads(1)
    n = sum(p.numel() for p in SANFlow(**FitConfig(fusion="none").flow_kwargs(384, 384, 64)).parameters())
    default, fused = step_ms(False), step_ms(True)
    print(f"default flow, {n / 1e6:.1f} M parameters, 1 thread: Adam step {default:.1f} ms (PyTorch CPU default), "
          f"{fused:.1f} ms (fused=True); ratio {default / fused:.1f}x")


if __name__ == "__main__":
    main()
