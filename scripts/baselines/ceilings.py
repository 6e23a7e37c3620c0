#!/usr/bin/env python3
"""Hardware ceilings measured with PyTorch, to put kernel numbers in proportion.

GPU (default):
* copy bandwidth: `dst.copy_(src)` on 1 GiB buffers, GB/s = 2 · bytes / time (read + write);
* bf16 matmul: cuBLAS `a @ b` at 8192³ and at the bench's 8192×4096×4096 linear shape;
* f32 matmul with TF32 off (recfuse's f32 default) at 4096³.

CPU (`--device cpu --threads N`): achievable ceilings at N threads, not vendor peaks:
* copy bandwidth on 256 MiB buffers (read + write);
* f32 matmul (MKL / oneDNN through `a @ b`) at 2048³.

    python3 scripts/baselines/ceilings.py [--json out.json]
    python3 scripts/baselines/ceilings.py --device cpu --threads 2

Timing: GPU, CUDA events around a batch of back-to-back calls after a warm-up, median of 5
batches; CPU, wall time of the same batches.
"""

import argparse
import json
import statistics
import sys
import time

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


def time_ms_cpu(fn, iters=5, batches=5):
    for _ in range(2):
        fn()
    per = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        per.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(per)


def cpu_rows(threads):
    torch.set_num_threads(threads)
    print(f"device: cpu, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    rows = []
    n = 1 << 26  # 256 MiB of f32
    src = torch.rand(n)
    dst = torch.empty_like(src)
    ms = time_ms_cpu(lambda: dst.copy_(src))
    rows.append((f"copy bandwidth (256 MiB, read+write, {threads} threads)",
                 2 * n * 4 / ms / 1e6, "GB/s"))
    del src, dst
    m = 2048
    a, b = torch.randn(m, m), torch.randn(m, m)
    ms = time_ms_cpu(lambda: a @ b)
    rows.append((f"f32 matmul 2048^3 ({threads} threads)", 2 * m**3 / ms / 1e6, "GFLOP/s"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.device == "cpu":
        report(cpu_rows(args.threads), args.json)
        return
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

    report(rows, args.json)


def report(rows, json_path):
    print("ceiling | value | unit")
    for name, value, unit in rows:
        print(f"{name} | {value:.1f} | {unit}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump([{"name": n_, "value": v, "unit": u} for n_, v, u in rows], f, indent=1)


if __name__ == "__main__":
    main()
