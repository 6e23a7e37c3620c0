#!/usr/bin/env python3
"""PyTorch baseline for `benches/inbatch_softmax.rs`: the naive in-batch softmax users write.

The loss as written today (TFRS `tasks.Retrieval`-style, in PyTorch): materialised logits

    s = κ·normalize(q)·normalize(c)ᵀ − logQ                      [B, N]
    hit = ids[None, :] == ids[target][:, None], target kept      [B, N] bool
    loss = F.cross_entropy(s.masked_fill(hit, finfo.min), target)

with autograd for the gradients of q and c; eager and optionally `torch.compile`. Names match
criterion's ids, e.g. `cpu/inbatch_softmax/f32/b1024_n8192_d64/fwd`, so
`scripts/baselines/compare.py` pairs them.

Settings as in the Rust bench: row i targets column i (columns B..N are extra negatives),
L2 normalisation, κ = 20, logQ = ln(number of columns with the same id), item ids
`id_j = ⌊(N/2)·frac(j·0.6180339887498949)²⌋` (popularity-skewed, so accidental hits occur).

FLOPs (the issue's count, used for both sides): fwd 2·B·N·d, fwd_bwd 8·B·N·d.

Peak extra memory: on CUDA measured, `torch.cuda.max_memory_allocated()` minus the allocated
bytes before the call (inputs resident, gradients None), one call after timing. On the CPU
(no allocator statistics): eager, computed from shapes, the B×N tensors the naive forward
materialises (mm output, ·κ, −logQ, the masked logits and log_softmax's output in the dtype;
the hit mask, bool); torch.compile, the bytes autograd keeps for backward, measured with
`torch.autograd.graph.saved_tensors_hooks` (also printed for eager). Each is printed as a
`# memory` line and stored in the JSON rows (`extra_bytes`, `extra_how`).

    python3 scripts/baselines/inbatch_softmax.py --device cpu --threads 2 [--compile] [--json out.json]
    python3 scripts/baselines/inbatch_softmax.py --device cuda --compile
"""

import argparse
import math
import os
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("inbatch_softmax.py: PyTorch is not installed (pip install torch)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_line, sync, time_rows, write_json  # noqa: E402

# (dtype, (B, N, d)); the same lists as benches/inbatch_softmax.rs.
CPU_CASES = [("f32", (1024, 8192, 64))]
LARGE_CPU_CASES = [("f32", (8192, 65536, 128))]
GPU_CASES = [("bf16", (8192, 65536, 128)), ("f32", (8192, 65536, 128))]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
KAPPA = 20.0


def naive_loss(q, c, log_q, ids, target, kappa):
    """In-batch softmax on materialised logits, as written without a fused kernel."""
    s = kappa * (F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T) - log_q
    hit = ids[None, :] == ids[target][:, None]
    hit[torch.arange(len(target), device=hit.device), target] = False  # keep the target
    s = s.masked_fill(hit, torch.finfo(s.dtype).min)
    return F.cross_entropy(s, target)


def item_ids(n):
    """The Rust bench's formula, in f64: ⌊(N/2)·frac(j·0.618…)²⌋."""
    out = []
    for j in range(n):
        f = math.modf(j * 0.6180339887498949)[0]
        out.append(math.floor((n // 2) * f * f))
    return torch.tensor(out, dtype=torch.int64)


def make(shape, dtype, device):
    b, n, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)

    def rand(*s):
        t = torch.rand(*s, generator=gen) * 2 - 1
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    ids = item_ids(n)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    log_q = counts[inverse].to(torch.float32).log()
    return (rand(b, d), rand(n, d), log_q.to(device=device, dtype=dtype), ids.to(device),
            torch.arange(b, device=device))


def name_of(device, dtype, shape):
    b, n, d = shape
    return f"{device}/inbatch_softmax/{dtype}/b{b}_n{n}_d{d}"


def saved_bytes(call):
    """Bytes of the distinct storages autograd saves for backward during `call()`."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return sum(seen.values())


def extra_memory(device, dtype, shape, impl, fwd, fwd_bwd, q, c):
    """{fn: (bytes, how)} for fwd and fwd_bwd (see the module docstring)."""
    b, n, _d = shape
    if device == "cuda":
        out = {}
        for fn_name, call in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            q.grad = c.grad = None
            sync(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            res = call()
            sync(device)
            peak = torch.cuda.max_memory_allocated() - before
            del res
            q.grad = c.grad = None
            out[fn_name] = (peak, "measured: torch.cuda.max_memory_allocated() delta")
        return out
    saved = saved_bytes(fwd)
    kept = f"autograd keeps {saved / 2**20:.1f} MiB for backward (measured, saved_tensors_hooks)"
    if impl == "compile":
        how = (f"measured: autograd keeps {saved / 2**20:.1f} MiB for backward "
               "(saved_tensors_hooks); the compiled kernels' transient B×N buffers are not "
               "visible on the CPU (no allocator statistics)")
        return {"fwd": (saved, how), "fwd_bwd": (saved, how)}
    elem = DTYPES[dtype].itemsize
    materialised = 5 * b * n * elem + b * n  # mm, ·κ, −logQ, masked_fill, log_softmax; bool mask
    how = (f"computed: the forward materialises 5 B×N {dtype} tensors (mm, ·κ, −logQ, "
           f"masked_fill, log_softmax) and the B×N bool hit mask, not all live at once; {kept}")
    return {"fwd": (materialised, how),
            "fwd_bwd": (materialised, how + "; backward's B×N gradients not counted")}


def run_case(dtype, shape, device, impl, args):
    b, n, d = shape
    q, c, log_q, ids, target = make(shape, DTYPES[dtype], device)
    fn = torch.compile(naive_loss) if impl == "compile" else naive_loss

    def fwd():
        return fn(q, c, log_q, ids, target, KAPPA)

    def fwd_bwd():
        q.grad = c.grad = None
        fn(q, c, log_q, ids, target, KAPPA).backward()

    fwd_flops = 2 * b * n * d
    calls = (("fwd", fwd, fwd_flops), ("fwd_bwd", fwd_bwd, 4 * fwd_flops))
    rows = time_rows(name_of(device, dtype, shape), impl, calls, device, args)
    timed = {r["name"].rsplit("/", 1)[1]: i for i, r in enumerate(rows)}
    if timed:
        mem = extra_memory(device, dtype, shape, impl, fwd, fwd_bwd, q, c)
        for fn_name, i in timed.items():
            nbytes, how = mem[fn_name]
            rows[i]["extra_bytes"], rows[i]["extra_how"] = nbytes, how
            print(f"# memory {rows[i]['name']} [torch-{impl}]: {nbytes / 2**20:.1f} MiB ({how})",
                  flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--large", action="store_true", help="add the large CPU shape")
    ap.add_argument("--filter", default="")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-batch-ms", type=float, default=50.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("inbatch_softmax.py: --device cuda but torch.cuda.is_available() is False")
    torch.backends.cuda.matmul.allow_tf32 = False
    machine = machine_line(args.device, args.threads)
    print(machine)
    print("name | impl | time_ms | GFLOP/s")
    impls = ([] if args.no_eager else ["eager"]) + (["compile"] if args.compile else [])
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES + (LARGE_CPU_CASES if args.large else [])
    rows = []
    write_json(args.json, machine, rows)
    for impl in impls:
        for dtype, shape in cases:
            try:
                rows += run_case(dtype, shape, args.device, impl, args)
            except Exception as e:
                if impl != "compile":
                    raise
                print(f"# skipped {name_of(args.device, dtype, shape)} [compile]: {e!r:.200}")
            if args.device == "cuda":
                torch.cuda.empty_cache()
            write_json(args.json, machine, rows)


if __name__ == "__main__":
    main()
