#!/usr/bin/env python3
"""PyTorch baseline for `benches/hiformer.rs`: heterogeneous attention and Hiformer layers.

Written the way users write these layers today (the spec's anchor: einsum + SDPA):

* per-token projections as einsum against `[L, out, in]` weights (`"bld,lod->blo"`);
* attention `F.scaled_dot_product_attention` on `[B, H, L, d_k]` queries/keys and `[B, H, L,
  d_v]` values (d_k ≠ d_v: SDPA's math backend takes it; if SDPA refuses, plain
  `softmax(QKᵀ/√d_k)·V` is used and the script says so);
* per-token output projection with bias, residual + LayerNorm (shared affine), per-token GELU
  (exact) FFN with biases, residual + LayerNorm; Q/K/V without bias, as recfuse;
* Hiformer: `x̄ = x.reshape(B, L·d)`, `Z = x̄·Aᵀ` with `A = [A_Q; A_K; A_V]` (one GEMM),
  then `T = Z_T·R_Tᵀ` viewed as `[B, L, H, d_T]`.

`fwd` runs on `requires_grad` inputs and weights (autograd saves what backward needs);
`fwd_bwd` resets every `.grad` to None and back-propagates `dz`, giving dx and every parameter
gradient; eager and optionally `torch.compile`. Names match criterion's ids, e.g.
`cpu/hetero_layer/f32/b256_l38_d128/fwd`.

Paper shapes: L = 38, d = 128, H = 4, d_k = 16, d_v = 64, d_f = 512, r_k = 128, r_v = 1024.

FLOPs (the spec's cost model, matrix products only; the same formula as the Rust bench):
  projections  heterogeneous 2·B·L·d·H·(2·d_k + d_v)
               Hiformer      2·B·L·d·(2·r_k + r_v) + 2·B·(2·r_k·L·H·d_k + r_v·L·H·d_v)
  attention    2·B·H·L²·(d_k + d_v)
  output       2·B·L·H·d_v·d
  FFN          4·B·L·d·d_f
  fwd_bwd      3 × forward
At B = 1024: 17.5 GFLOP (heterogeneous), 48.1 GFLOP (Hiformer) per forward.

    python3 scripts/baselines/hiformer.py --device cpu --threads 2 [--compile] [--json out.json]
    python3 scripts/baselines/hiformer.py --device cuda --compile
"""

import argparse
import os
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("hiformer.py: PyTorch is not installed (pip install torch)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_line, time_rows, write_json  # noqa: E402

L, D, H, DK, DV, DF, RK, RV = 38, 128, 4, 16, 64, 512, 128, 1024

# (kind, dtype, B); the same lists as benches/hiformer.rs.
CPU_CASES = [("hetero", "f32", 256), ("hiformer", "f32", 256)]
LARGE_CPU_CASES = [("hetero", "f32", 1024), ("hiformer", "f32", 1024)]
GPU_CASES = [
    ("hetero", "bf16", 1024),
    ("hetero", "bf16", 4096),
    ("hetero", "f32", 1024),
    ("hiformer", "bf16", 1024),
    ("hiformer", "bf16", 4096),
    ("hiformer", "f32", 1024),
]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
USE_SDPA = True


def fwd_flops(kind, b):
    if kind == "hetero":
        proj = 2 * b * L * D * H * (2 * DK + DV)
    else:
        proj = 2 * b * L * D * (2 * RK + RV) + 2 * b * (2 * RK * L * H * DK + RV * L * H * DV)
    attention = 2 * b * H * L * L * (DK + DV)
    output = 2 * b * L * H * DV * D
    ffn = 4 * b * L * D * DF
    return proj + attention + output + ffn


def attend(q, k, v):
    """q, k: [B, H, L, d_k]; v: [B, H, L, d_v] → [B, H, L, d_v]."""
    if USE_SDPA:
        return F.scaled_dot_product_attention(q, k, v)
    p = torch.softmax(q @ k.transpose(-1, -2) * DK**-0.5, dim=-1)
    return p @ v


def heads(t, b, dh):
    """[B, L, H·dh] → [B, H, L, dh]."""
    return t.view(b, L, H, dh).transpose(1, 2)


def tail(x, o, p):
    """Output projection, residual + LN, GELU FFN, residual + LN (per-token weights)."""
    b = x.shape[0]
    o = o.transpose(1, 2).reshape(b, L, H * DV)
    y = F.layer_norm(x + torch.einsum("blo,ldo->bld", o, p["wo"]) + p["bo"], (D,), p["g1"],
                     p["be1"])
    h = F.gelu(torch.einsum("bld,lfd->blf", y, p["w1"]) + p["b1"])
    f = torch.einsum("blf,ldf->bld", h, p["w2"]) + p["b2"]
    return F.layer_norm(y + f, (D,), p["g2"], p["be2"])


def hetero_layer(x, p):
    b = x.shape[0]
    q = heads(torch.einsum("bld,lod->blo", x, p["wq"]), b, DK)
    k = heads(torch.einsum("bld,lod->blo", x, p["wk"]), b, DK)
    v = heads(torch.einsum("bld,lod->blo", x, p["wv"]), b, DV)
    return tail(x, attend(q, k, v), p)


def hiformer_layer(x, p):
    b = x.shape[0]
    z = x.reshape(b, L * D) @ p["a"].T
    zq, zk, zv = z.split([RK, RK, RV], dim=1)
    q = heads(zq @ p["rq"].T, b, DK)
    k = heads(zk @ p["rk"].T, b, DK)
    v = heads(zv @ p["rv"].T, b, DV)
    return tail(x, attend(q, k, v), p)


def make(kind, b, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)

    def normal(*s, fan_in):
        t = torch.randn(*s, generator=gen) * fan_in**-0.5
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    def const(*s, value):
        return torch.full(s, value, device=device, dtype=dtype, requires_grad=True)

    p = {
        "wo": normal(L, D, H * DV, fan_in=H * DV), "bo": const(L, D, value=0.0),
        "w1": normal(L, DF, D, fan_in=D), "b1": const(L, DF, value=0.0),
        "w2": normal(L, D, DF, fan_in=DF), "b2": const(L, D, value=0.0),
        "g1": const(D, value=1.0), "be1": const(D, value=0.0),
        "g2": const(D, value=1.0), "be2": const(D, value=0.0),
    }
    if kind == "hetero":
        p["wq"] = normal(L, H * DK, D, fan_in=D)
        p["wk"] = normal(L, H * DK, D, fan_in=D)
        p["wv"] = normal(L, H * DV, D, fan_in=D)
    else:
        p["a"] = normal(2 * RK + RV, L * D, fan_in=L * D)
        p["rq"] = normal(L * H * DK, RK, fan_in=RK)
        p["rk"] = normal(L * H * DK, RK, fan_in=RK)
        p["rv"] = normal(L * H * DV, RV, fan_in=RV)
    x = ((torch.rand(b, L, D, generator=gen) * 2 - 1).to(device=device, dtype=dtype)
         .requires_grad_(True))
    dz = (torch.rand(b, L, D, generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    return x, p, dz


def name_of(device, kind, dtype, b):
    op = "hetero_layer" if kind == "hetero" else "hiformer_layer"
    return f"{device}/{op}/{dtype}/b{b}_l{L}_d{D}"


def run_case(kind, dtype, b, device, impl, args):
    x, p, dz = make(kind, b, DTYPES[dtype], device)
    layer = hetero_layer if kind == "hetero" else hiformer_layer
    fn = torch.compile(layer) if impl == "compile" else layer
    leaves = [x, *p.values()]

    def fwd():
        return fn(x, p)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(x, p).backward(dz)

    flops = fwd_flops(kind, b)
    calls = (("fwd", fwd, flops), ("fwd_bwd", fwd_bwd, 3 * flops))
    rows = time_rows(name_of(device, kind, dtype, b), impl, calls, device, args)
    return rows


def check_sdpa(device):
    """Use SDPA if it takes d_k ≠ d_v here and agrees with the plain form; say which."""
    global USE_SDPA
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k = (torch.randn(2, H, L, DK, generator=g).to(device) for _ in range(2))
    v = torch.randn(2, H, L, DV, generator=g).to(device)
    plain = torch.softmax(q @ k.transpose(-1, -2) * DK**-0.5, dim=-1) @ v
    try:
        ok = torch.allclose(F.scaled_dot_product_attention(q, k, v), plain, atol=1e-4, rtol=1e-4)
        why = "" if ok else "SDPA disagreed with softmax(QKᵀ/√d_k)·V"
    except RuntimeError as e:
        ok, why = False, f"SDPA refused d_k ≠ d_v: {str(e)[:120]}"
    USE_SDPA = ok
    print("# attention: F.scaled_dot_product_attention (d_k = 16, d_v = 64)" if ok
          else f"# attention: plain softmax(QKᵀ/√d_k)·V ({why})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--large", action="store_true", help="add the B = 1024 CPU shapes")
    ap.add_argument("--filter", default="")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-batch-ms", type=float, default=50.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("hiformer.py: --device cuda but torch.cuda.is_available() is False")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    machine = machine_line(args.device, args.threads)
    print(machine)
    check_sdpa(args.device)
    print("name | impl | time_ms | GFLOP/s")
    impls = ([] if args.no_eager else ["eager"]) + (["compile"] if args.compile else [])
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES + (LARGE_CPU_CASES if args.large else [])
    rows = []
    write_json(args.json, machine, rows, attention="sdpa" if USE_SDPA else "plain")
    for impl in impls:
        for kind, dtype, b in cases:
            if args.filter and not any(args.filter in f"{name_of(args.device, kind, dtype, b)}/{f}"
                                       for f in ("fwd", "fwd_bwd")):
                continue
            try:
                rows += run_case(kind, dtype, b, args.device, impl, args)
            except Exception as e:
                if impl != "compile":
                    raise
                print(f"# skipped {name_of(args.device, kind, dtype, b)} [compile]: {e!r:.200}")
            if args.device == "cuda":
                torch.cuda.empty_cache()
            write_json(args.json, machine, rows, attention="sdpa" if USE_SDPA else "plain")


if __name__ == "__main__":
    main()
