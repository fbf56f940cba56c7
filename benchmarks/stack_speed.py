"""K flows trained one after the other (``train.fit_flow``) vs together (``stack.fit_stack``), in one run.

    python benchmarks/stack_speed.py --device cpu --flows 4 --n 400 --dim 384 --tokens 16 --epochs 1

Synthetic tokens (speed does not depend on their values), the default flow unless ``--hidden``/``--blocks``,
a fixed number of epochs so both do the same work. Prints the seconds of each and the ratio sequential / stacked
(> 1: stacking is faster), and the largest weight difference between the two (they train the same flows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--flows", type=int, default=4)
    p.add_argument("--n", type=int, default=400, help="training rows per flow")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--markdown", type=Path, help="append the result to this file")
    args = p.parse_args(argv)

    from sanf_pipeline.device import resolve_device
    from sanf_pipeline.train.config import FitConfig
    from sanf_pipeline.train.fit import fit_flow
    from sanf_pipeline.train.stack import StackMember, fit_stack

    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    patch = rng.normal(size=(args.n, args.tokens, args.dim)).astype(np.float32)
    cfgs = [FitConfig(seed=s, early_stopping=False, epochs=args.epochs, hidden=args.hidden, blocks=args.blocks,
                      device=str(device)) for s in range(args.flows)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fit_flow(cls[:64], patch[:64], FitConfig(**{**cfgs[0].to_dict(), "epochs": 1}))  # warm-up
    sync()
    t = time.perf_counter()
    seq = [fit_flow(cls, patch, c) for c in cfgs]
    sync()
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    stk = fit_stack([StackMember(c, cls, patch, data_key=0) for c in cfgs])
    sync()
    t_stk = time.perf_counter() - t
    diff = max((a - b).abs().max().item() for r, s in zip(seq, stk, strict=True)
               for a, b in zip(r.model.state_dict().values(), s.model.state_dict().values(), strict=True)
               if a.is_floating_point())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    line = (f"| {where} | {args.flows} | d={args.dim}, T={args.tokens}, hidden {args.hidden}, {args.blocks} blocks, "
            f"n={args.n}, {args.epochs} epoch(s) | {t_seq:.1f} s | {t_stk:.1f} s | {t_seq / t_stk:.2f} | {diff:.1e} |")
    print("| device | flows | flow, data | sequential | stacked | sequential / stacked | max weight diff |")
    print("|---|---|---|---|---|---|---|")
    print(line)
    if args.markdown:
        cmd = "python benchmarks/stack_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.markdown, "a") as fh:
            fh.write(f"\n`{cmd}` ({time.strftime('%Y-%m-%d')}):\n\n"
                     "| device | flows | flow, data | sequential | stacked | sequential / stacked | max weight diff |\n"
                     f"|---|---|---|---|---|---|---|\n{line}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
