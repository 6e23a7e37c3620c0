#!/usr/bin/env python3
"""PyTorch baseline for `benches/linear.rs`: the same layers, shapes and names.

Each case is `gelu(x·Wᵀ + b)` (exact erf GELU), forward (`fwd`) and forward+backward
(`fwd_bwd`, autograd, gradients for x, W and b), in PyTorch eager and optionally
`torch.compile`. Names match criterion's full ids, e.g. `cpu/linear/f32/m4096_k1024_n1024/fwd`,
so `scripts/bench-table` can put the two side by side.

* Plain layers use `torch.nn.functional.linear`.
* Grouped layers (one weight set per token position: x [B, G, K], W [G, N, K], b [G, N]) use
  `torch.einsum("bgk,gnk->bgn", x, W) + b`, PyTorch's idiomatic batched form.
* `fwd` runs with `requires_grad` inputs, so autograd saves what backward needs, as recfuse's
  forward keeps the pre-activation. `fwd_bwd` resets `.grad` to None each iteration, so
  gradients are written, not accumulated (recfuse's `accumulate = false`).

FLOPs count the matrix products only: fwd 2·M·K·N, fwd_bwd 6·M·K·N (grouped: M = B·G).

Timing: warm-up calls, then `--repeats` timed batches of back-to-back calls (each batch at least
`--min-batch-ms`), closed by `torch.cuda.synchronize()` on CUDA; the reported time is the median
per-call time over batches.

    python3 scripts/baselines/linear.py --device cpu --threads 2 [--compile] [--json out.json]
    python3 scripts/baselines/linear.py --device cuda --compile
"""

import argparse
import os
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("linear.py: PyTorch is not installed (pip install torch)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_line, time_rows, write_json  # noqa: E402

# (dtype, (M, K, N) or (B, G, K, N)); the same lists as CPU_CASES / GPU_CASES in benches/linear.rs.
CPU_CASES = [
    ("f32", (4096, 1024, 1024)),
    ("f32", (1024, 38, 128, 128)),
]
GPU_CASES = [
    ("f32", (4096, 1024, 1024)),
    ("bf16", (4096, 1024, 1024)),
    ("bf16", (8192, 4096, 4096)),
    ("f32", (1024, 38, 128, 128)),
    ("bf16", (1024, 38, 128, 128)),
]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def shape_name(shape):
    if len(shape) == 3:
        m, k, n = shape
        return f"m{m}_k{k}_n{n}"
    b, g, k, n = shape
    return f"grouped_b{b}_g{g}_k{k}_n{n}"


def fwd_flops(shape):
    if len(shape) == 3:
        m, k, n = shape
        return 2 * m * k * n
    b, g, k, n = shape
    return 2 * b * g * k * n


def plain_layer(x, w, b):
    return F.gelu(F.linear(x, w, b))


def grouped_layer(x, w, b):
    return F.gelu(torch.einsum("bgk,gnk->bgn", x, w) + b)


def make_inputs(shape, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)

    def rand(*s, scale=1.0):
        t = (torch.rand(*s, generator=gen) * 2 - 1) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    if len(shape) == 3:
        m, k, n = shape
        xs, ws, bs, ys = (m, k), (n, k), (n,), (m, n)
    else:
        bt, g, k, n = shape
        xs, ws, bs, ys = (bt, g, k), (g, n, k), (g, n), (bt, g, n)
    x, w, b = rand(*xs), rand(*ws, scale=k**-0.5), rand(*bs, scale=0.1)
    dy = rand(*ys).detach()
    return x, w, b, dy


def run_case(name_prefix, shape, dtype, device, impl, args):
    layer = plain_layer if len(shape) == 3 else grouped_layer
    if impl == "compile":
        layer = torch.compile(layer)
    x, w, b, dy = make_inputs(shape, DTYPES[dtype], device)

    def fwd():
        return layer(x, w, b)

    def fwd_bwd():
        x.grad = w.grad = b.grad = None
        layer(x, w, b).backward(dy)

    calls = (("fwd", fwd, fwd_flops(shape)), ("fwd_bwd", fwd_bwd, 3 * fwd_flops(shape)))
    rows = time_rows(name_prefix, impl, calls, device, args)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--no-eager", action="store_true", help="skip eager (with --compile)")
    ap.add_argument("--filter", default="", help="only names containing this substring")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--min-batch-ms", type=float, default=50.0)
    ap.add_argument("--json", help="also write the rows and the machine line here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("linear.py: --device cuda but torch.cuda.is_available() is False")
    # recfuse keeps f32 f32-accurate by default (no TF32); so does this baseline.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    machine = machine_line(args.device, args.threads)
    print(machine)
    print("name | impl | time_ms | GFLOP/s")
    impls = ([] if args.no_eager else ["eager"]) + (["compile"] if args.compile else [])
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES
    rows = []
    write_json(args.json, machine, rows)
    for impl in impls:
        for dtype, shape in cases:
            prefix = f"{args.device}/linear/{dtype}/{shape_name(shape)}"
            if args.filter and not any(args.filter in f"{prefix}/{f}" for f in ("fwd", "fwd_bwd")):
                continue
            try:
                rows += run_case(prefix, shape, dtype, args.device, impl, args)
            except Exception as e:
                if impl != "compile":
                    raise
                print(f"# skipped {prefix} [compile]: {type(e).__name__}: {str(e)[:200]}")
            if args.device == "cuda":
                torch.cuda.empty_cache()
            write_json(args.json, machine, rows)


if __name__ == "__main__":
    main()
