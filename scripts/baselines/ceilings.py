#!/usr/bin/env python3
"""Hardware ceilings measured with PyTorch on the GPU, to put kernel numbers in proportion.

* copy bandwidth: `dst.copy_(src)` on 1 GiB buffers, GB/s = 2 · bytes / time (read + write);
* bf16 matmul: cuBLAS `a @ b` at 8192³ and at the bench's 8192×4096×4096 linear shape;
* f32 matmul with TF32 off (recfuse's f32 default) at 4096³.

    python3 scripts/baselines/ceilings.py [--json out.json]

Timing: CUDA events around a batch of back-to-back calls after a warm-up; median of 5 batches.
"""

import argparse
import json
import statistics
import sys

try:
    import torch
except ImportError:
    sys.exit("ceilings.py: PyTorch is not installed")


def time_ms(fn, iters=10, batches=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        per.append(start.elapsed_time(end) / iters)
    return statistics.median(per)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ceilings.py: no CUDA device visible to PyTorch")
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
          f"sm_{props.major}{props.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows = []

    n = 1 << 28  # 1 GiB of f32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    rows.append(("copy bandwidth (1 GiB, read+write)", 2 * n * 4 / ms / 1e6, "GB/s"))
    del src, dst

    for name, (m, k, nn), dtype in (
        ("bf16 matmul 8192x8192x8192", (8192, 8192, 8192), torch.bfloat16),
        ("bf16 linear m8192_k4096_n4096", (8192, 4096, 4096), torch.bfloat16),
        ("f32 matmul 4096^3 (TF32 off)", (4096, 4096, 4096), torch.float32),
    ):
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        b = torch.randn(k, nn, device="cuda", dtype=dtype)
        ms = time_ms(lambda: a @ b)
        rows.append((name, 2 * m * k * nn / ms / 1e9, "TFLOP/s"))
        del a, b
        torch.cuda.empty_cache()

    print("ceiling | value | unit")
    for name, value, unit in rows:
        print(f"{name} | {value:.1f} | {unit}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"name": n_, "value": v, "unit": u} for n_, v, u in rows], f, indent=1)


if __name__ == "__main__":
    main()
