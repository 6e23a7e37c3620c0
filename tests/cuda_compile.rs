//! Offline check of every CUDA kernel variant, no GPU needed: each (kernel file, defines) the
//! launchers can request is compiled by NVRTC for `sm_90` to PTX with the runtime's own
//! options, then assembled by `ptxas -arch=sm_90 -v`. Fails on any compile error, ptxas error or
//! warning, register spill, or local-memory stack frame; prints registers, shared memory and the
//! resulting occupancy (blocks per SM at the kernel's launch bounds) per kernel.
//!
//! NVRTC comes from `RECFUSE_NVRTC_DIR` (or the usual search), ptxas from `RECFUSE_PTXAS`, then
//! `PATH`, then `/opt/recfuse-cuda/nvidia/cu13/bin/ptxas`. Both come from pip in CI:
//! `pip install --no-deps --target <dir> nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88`.
//! When either is absent the test prints `SKIPPED: ...` and passes, unless `RECFUSE_REQUIRE`
//! contains `nvrtc`.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH: &str = "sm_90";

fn required() -> bool {
    std::env::var("RECFUSE_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == "nvrtc"))
        .unwrap_or(false)
}

/// Passes loudly, or fails when the toolchain is required.
fn skip(why: &str) {
    assert!(!required(), "RECFUSE_REQUIRE contains nvrtc, but {why}");
    println!("SKIPPED: cuda_compile: {why}");
    eprintln!("SKIPPED: cuda_compile: {why}");
}

fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RECFUSE_PTXAS") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/opt/recfuse-cuda/nvidia/cu13/bin/ptxas");
    p.is_file().then_some(p)
}

/// What `ptxas -v` reports for one entry function.
#[derive(Debug, Default, Clone)]
struct Report {
    function: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// The number just before `unit` in `line` (`"0 bytes spill stores"` → 0 for "bytes spill stores").
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let head = &line[..line.find(unit)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

fn parse_ptxas(out: &str) -> Vec<Report> {
    let mut reports: Vec<Report> = Vec::new();
    for line in out.lines() {
        if let Some(i) = line.find("Function properties for ") {
            reports.push(Report {
                function: line[i + "Function properties for ".len()..]
                    .trim()
                    .to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(r) = reports.last_mut() else {
            continue;
        };
        if line.contains("spill stores") {
            r.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("registers") {
            r.registers = number_before(line, "registers").unwrap_or(0);
            r.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    reports
}

/// Threads per block the PTX declares for entry `function` (`.maxntid x, y, z`, from
/// `__launch_bounds__`), if any.
fn max_threads(ptx: &str, function: &str) -> Option<u32> {
    let start = ptx.find(&format!(".entry {function}("))?;
    let body = start + ptx[start..].find('{')?;
    let head = &ptx[start..body];
    let dims = head[head.find(".maxntid")? + ".maxntid".len()..]
        .lines()
        .next()?;
    dims.split(',')
        .map(|d| d.trim().parse::<u32>().ok())
        .try_fold(1u32, |acc, d| d.map(|d| acc * d))
}

/// Resident blocks per SM on sm_90 (H100/H200): 64 K registers (allocated per warp, per-thread
/// counts rounded up to 8), 228 KiB shared memory (1 KiB reserved per block), 2048 threads and
/// 32 blocks.
fn blocks_per_sm(registers: u32, smem: u32, threads: u32) -> u32 {
    let warps = threads.div_ceil(32).max(1);
    let regs_per_warp = registers.max(1).div_ceil(8) * 8 * 32;
    let by_regs = 65536 / regs_per_warp / warps;
    let by_smem = 233_472 / (smem + 1024);
    let by_threads = 2048 / (warps * 32);
    by_regs.min(by_smem).min(by_threads).min(32)
}

fn run_ptxas(ptxas: &Path, ptx: &str, dir: &Path, tag: &str) -> Result<String, String> {
    let ptx_path = dir.join(format!("{tag}.ptx"));
    let cubin_path = dir.join(format!("{tag}.cubin"));
    std::fs::write(&ptx_path, ptx).map_err(|e| format!("writing {}: {e}", ptx_path.display()))?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={ARCH}"))
        .arg("-v")
        .arg(&ptx_path)
        .arg("-o")
        .arg(&cubin_path)
        .output()
        .map_err(|e| format!("running {}: {e}", ptxas.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("ptxas exited with {}:\n{text}", out.status));
    }
    Ok(text)
}

#[test]
fn every_cuda_kernel_variant_compiles_for_sm90_without_spills() {
    let nvrtc = match recfuse::cuda::nvrtc_info() {
        Ok(info) => info,
        Err(e) => return skip(&format!("NVRTC unavailable: {e}")),
    };
    let Some(ptxas) = find_ptxas() else {
        return skip("ptxas not found (set RECFUSE_PTXAS)");
    };
    let version = Command::new(&ptxas).arg("--version").output().map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    });
    let version = match version {
        Ok(v) => v,
        Err(e) => return skip(&format!("ptxas at {} cannot run: {e}", ptxas.display())),
    };
    println!(
        "{nvrtc}; ptxas {} ({version}); target {ARCH}",
        ptxas.display()
    );

    let dir = std::env::temp_dir().join(format!("recfuse-cuda-compile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let variants = recfuse::cuda::compile_variants();
    assert!(!variants.is_empty());
    let mut failures = Vec::new();
    println!(
        "{:<14} {:<28} {:<16} {:>5} {:>7} {:>6} {:>7} {:>7} {:>9}",
        "file", "defines", "kernel", "regs", "smem", "stack", "spills", "threads", "blocks/SM"
    );
    for (i, (file, defines)) in variants.iter().enumerate() {
        let label = format!("{file} [{}]", defines.join(","));
        let ptx = match recfuse::cuda::compile_ptx_for_check(file, defines, ARCH) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{label}: NVRTC: {e}"));
                continue;
            }
        };
        let out = match run_ptxas(&ptxas, &ptx, &dir, &format!("v{i}")) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{label}: {e}"));
                continue;
            }
        };
        for line in out.lines() {
            let l = line.to_ascii_lowercase();
            if l.contains("error") || l.contains("warning") {
                failures.push(format!("{label}: ptxas: {line}"));
            }
        }
        let reports = parse_ptxas(&out);
        if reports.is_empty() {
            failures.push(format!("{label}: ptxas reported no entry function:\n{out}"));
        }
        for r in reports {
            // Occupancy from the launch bounds (every recfuse kernel declares them).
            let (threads, blocks) = match max_threads(&ptx, &r.function) {
                Some(t) => (
                    t.to_string(),
                    blocks_per_sm(r.registers, r.smem, t).to_string(),
                ),
                None => ("?".into(), "?".into()),
            };
            println!(
                "{:<14} {:<28} {:<16} {:>5} {:>7} {:>6} {:>3}/{:<3} {:>7} {:>9}",
                file,
                defines.join(","),
                r.function,
                r.registers,
                r.smem,
                r.stack,
                r.spill_stores,
                r.spill_loads,
                threads,
                blocks
            );
            if r.spill_stores > 0 || r.spill_loads > 0 {
                failures.push(format!(
                    "{label} {}: {} bytes spill stores, {} bytes spill loads",
                    r.function, r.spill_stores, r.spill_loads
                ));
            }
            // A stack frame without spills means a per-thread array went to local memory
            // (dynamic indexing of the accumulators): as slow as a spill.
            if r.stack > 0 {
                failures.push(format!(
                    "{label} {}: {} bytes stack frame",
                    r.function, r.stack
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{} variants compiled, 0 spills", variants.len());
}

#[test]
fn ptxas_report_parsing() {
    let out = "ptxas info    : Compiling entry function 'gemm_mma' for 'sm_90'\n\
               ptxas info    : Function properties for gemm_mma\n    \
               8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 128 registers, used 1 barriers, 20480 bytes smem\n";
    let r = parse_ptxas(out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].function, "gemm_mma");
    assert_eq!(
        (
            r[0].registers,
            r[0].smem,
            r[0].stack,
            r[0].spill_stores,
            r[0].spill_loads
        ),
        (128, 20480, 8, 4, 12)
    );
}

#[test]
fn occupancy_arithmetic() {
    let ptx = ".visible .entry k(\n.param .u64 p\n)\n.maxntid 256, 1, 1\n{\nret;\n}\n";
    assert_eq!(max_threads(ptx, "k"), Some(256));
    assert_eq!(max_threads(ptx, "other"), None);
    // gemm_mma: 128 registers × 256 threads = 32 K registers → 2 blocks; 20 KiB shared fits 10.
    assert_eq!(blocks_per_sm(128, 20480, 256), 2);
    // 48 KiB static shared: 228 KiB / 49 KiB → 4 blocks; 98 → 104 registers: 2 blocks.
    assert_eq!(blocks_per_sm(98, 49152, 256), 2);
    assert_eq!(blocks_per_sm(32, 0, 1024), 2);
}
