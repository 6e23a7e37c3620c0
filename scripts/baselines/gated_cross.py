#!/usr/bin/env python3
"""PyTorch baseline for `benches/gated_cross.rs`: the same stacks, shapes and names.

Exactly the official GDCN layer (`GateCorssLayer`): `x0 * (x @ Wcᵀ + b) * sigmoid(x @ Wgᵀ) + x`
(no gate bias), stacked L deep, and the DCN-V2 layer `x0 * (x @ Wᵀ + b) + x`; forward (`fwd`)
and forward+backward (`fwd_bwd`, autograd, gradients of x0 and every weight), eager and
optionally `torch.compile`. Names match criterion's ids, e.g.
`cpu/gated_cross/f32/b4096_d189_l3/fwd`, so `scripts/baselines/compare.py` pairs them.

FLOPs (the spec's count): forward 4·B·D²·L gated (2·B·D²·L DCN-V2), backward twice that.

    python3 scripts/baselines/gated_cross.py --device cpu --threads 2 [--compile] [--json out.json]
    python3 scripts/baselines/gated_cross.py --device cuda --compile
"""

import argparse
import os
import sys

try:
    import torch
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("gated_cross.py: PyTorch is not installed (pip install torch)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_line, time_rows, write_json  # noqa: E402

# (mode, dtype, (B, D, L)); the same lists as benches/gated_cross.rs.
CPU_CASES = [
    ("gated", "f32", (4096, 189, 3)),
    ("gated", "f32", (4096, 624, 3)),
    ("dcnv2", "f32", (4096, 624, 3)),
]
LARGE_CPU_CASES = [("gated", "f32", (16384, 624, 3))]
GPU_CASES = [
    ("gated", "bf16", (4096, 189, 3)),
    ("gated", "bf16", (4096, 624, 3)),
    ("gated", "bf16", (16384, 624, 3)),
    ("gated", "bf16", (65536, 1024, 3)),
    ("dcnv2", "bf16", (16384, 624, 3)),
    ("gated", "f32", (16384, 624, 3)),
]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def stack(x0, ws, bs, gs):
    """The official GDCN forward (gs = gate weights) or DCN-V2 (gs is None)."""
    x = x0
    for i in range(len(ws)):
        u = x @ ws[i].T + bs[i]
        if gs is not None:
            u = u * torch.sigmoid(x @ gs[i].T)
        x = x0 * u + x
    return x


def make(mode, shape, dtype, device):
    b, d, layers = shape
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)

    def rand(*s, scale=1.0):
        t = (torch.rand(*s, generator=gen) * 2 - 1) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    x0 = rand(b, d)
    ws = [rand(d, d, scale=d**-0.5) for _ in range(layers)]
    bs = [rand(d, scale=0.5) for _ in range(layers)]
    gs = [rand(d, d, scale=d**-0.5) for _ in range(layers)] if mode == "gated" else None
    dy = rand(b, d).detach()
    return x0, ws, bs, gs, dy


def name_of(device, mode, dtype, shape):
    b, d, layers = shape
    op = "gated_cross" if mode == "gated" else "dcn_v2"
    return f"{device}/{op}/{dtype}/b{b}_d{d}_l{layers}"


def run_case(mode, dtype, shape, device, impl, args):
    b, d, layers = shape
    x0, ws, bs, gs, dy = make(mode, shape, DTYPES[dtype], device)
    fn = torch.compile(stack) if impl == "compile" else stack
    params = [x0, *ws, *bs] + (gs or [])
    fwd_flops = (4 if mode == "gated" else 2) * b * d * d * layers

    def fwd():
        return fn(x0, ws, bs, gs)

    def fwd_bwd():
        for p in params:
            p.grad = None
        fn(x0, ws, bs, gs).backward(dy)

    calls = (("fwd", fwd, fwd_flops), ("fwd_bwd", fwd_bwd, 3 * fwd_flops))
    rows = time_rows(name_of(device, mode, dtype, shape), impl, calls, device, args)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--large", action="store_true", help="add the large CPU shapes")
    ap.add_argument("--filter", default="")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-batch-ms", type=float, default=50.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gated_cross.py: --device cuda but torch.cuda.is_available() is False")
    torch.backends.cuda.matmul.allow_tf32 = False
    machine = machine_line(args.device, args.threads)
    print(machine)
    print("name | impl | time_ms | GFLOP/s")
    impls = ([] if args.no_eager else ["eager"]) + (["compile"] if args.compile else [])
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES + (LARGE_CPU_CASES if args.large else [])
    rows = []
    write_json(args.json, machine, rows)
    for impl in impls:
        for mode, dtype, shape in cases:
            try:
                rows += run_case(mode, dtype, shape, args.device, impl, args)
            except Exception as e:
                if impl != "compile":
                    raise
                print(f"# skipped {name_of(args.device, mode, dtype, shape)} [compile]: {e!r:.200}")
            if args.device == "cuda":
                torch.cuda.empty_cache()
            write_json(args.json, machine, rows)


if __name__ == "__main__":
    main()
