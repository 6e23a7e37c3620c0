"""Timing and machine description shared by the PyTorch baselines (scripts/baselines/*.py).

Every baseline times the same way: warm-up calls, then `repeats` batches of back-to-back calls
(each at least `min_batch_ms` long), closed by `torch.cuda.synchronize()` on CUDA; the reported
time is the median per-call time over batches.
"""

import os
import platform
import statistics
import time

import torch


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(call, device, warmup, repeats, min_batch_ms):
    """Median seconds per call over `repeats` batches, each one synchronised at its end."""
    for _ in range(warmup):
        call()
    sync(device)
    # Size a batch so it lasts at least min_batch_ms (one call for slow CPU layers).
    t0 = time.perf_counter()
    call()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_batch_ms / 1e3 / one))
    per_call = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            call()
        sync(device)
        per_call.append((time.perf_counter() - t0) / inner)
    return statistics.median(per_call)


def machine_line(device, threads):
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        parts.append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
        parts.append(f"CUDA {torch.version.cuda}")
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        parts.append(f"{cpu}, {os.cpu_count()} logical CPUs")
        parts.append(f"torch threads {torch.get_num_threads()} (asked {threads})")
        parts.append(f"MKL {torch.backends.mkl.is_available()}")
        parts.append(f"oneDNN {torch.backends.mkldnn.is_available()}")
    return "machine: " + "; ".join(parts)


def time_rows(prefix, impl, calls, device, args):
    """Times each `(fn_name, call, flops)` under `prefix/fn_name` (skipping names that miss
    `args.filter`), prints a table line per call and returns the rows. A `torch.compile` failure
    (no C++ toolchain, an unsupported op) skips that call with a note; an eager failure raises."""
    rows = []
    for fn_name, call, flops in calls:
        name = f"{prefix}/{fn_name}"
        if args.filter and args.filter not in name:
            continue
        try:
            sec = time_call(call, device, args.warmup, args.repeats, args.min_batch_ms)
        except Exception as e:
            if impl != "compile":
                raise
            print(f"# skipped {name} [compile]: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append({"name": name, "impl": f"torch-{impl}", "time_ms": sec * 1e3,
                     "gflops": flops / sec / 1e9, "flops": flops})
        print(f"{name} | torch-{impl} | {sec * 1e3:.3f} | {flops / sec / 1e9:.1f}", flush=True)
    return rows


def write_json(path, machine, rows, **extra):
    """Writes the rows so far (called after every case, so a run cut short by a timeout still
    leaves the cases it finished)."""
    if not path:
        return
    import json

    with open(path + ".tmp", "w") as f:
        json.dump({"machine": machine, "threads": torch.get_num_threads(), **extra, "rows": rows},
                  f, indent=1)
    os.replace(path + ".tmp", path)
