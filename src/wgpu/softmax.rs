//! Launchers for the fused in-batch softmax (`kernels/wgsl/inbatch_softmax.wgsl`, whose header
//! documents the math, layouts and launch geometry): per-call metadata packing and upload, the
//! column-split choice, and the three seam entry points of `ops::backend`.
//!
//! Every call uploads O(B + N) words of metadata (targets, ids, validity, logQ, query ids, and
//! for backward the row coefficients and LSE), runs its passes in one submission, and reads
//! back O(B) floats (forward: LSE and target logits; query backward: dκ per row). Nothing
//! O(B·N) is allocated.

use std::ops::Range;
use std::sync::Arc;

use super::pipelines::{Binding, Kernel, Launch, Shader};
use super::{WgpuDevice, WgpuStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::gemm::MAX_INDEX_32;
use crate::ops::inbatch_softmax::SoftmaxArgs;
use crate::tensor::{Storage, Tensor};

const OP: &str = "inbatch_softmax(wgpu)";

/// Registered here rather than in `pipelines.rs`: the module cache is keyed by the name.
const SHADER: Shader = Shader {
    name: "inbatch_softmax.wgsl",
    source: include_str!("../../kernels/wgsl/inbatch_softmax.wgsl"),
};

/// Logit tile edge (rows and columns), as in the shader.
const TILE: usize = 64;
/// Threads of the 1-D passes.
const WG1: u32 = 256;
/// Workgroup memory of the tiled kernels: two 16 × 68 staged chunks, plus the 64 × 64 G tile
/// in the backward kernels.
const STAGE_BYTES: u64 = 4 * 2 * 16 * 68;
const G_BYTES: u64 = 4 * 64 * 64;
/// The column split aims for at least this many workgroups ...
const TARGET_WORKGROUPS: usize = 512;
/// ... while every split keeps at least this many column tiles.
const MIN_TILES_PER_SPLIT: usize = 4;
/// u32 words of metadata per row and per column.
const ROW_WORDS: usize = 8;
const COL_WORDS: usize = 8;

use Binding::{Read as R, ReadWrite as RW, Uniform as U};

const MAIN_BINDINGS: &[Binding] = &[U, R, R, R, R, R, RW, RW];
const FWD: Kernel = Kernel {
    shader: SHADER,
    entry: "fwd_main",
    bindings: MAIN_BINDINGS,
};
const FWD_COMBINE: Kernel = Kernel {
    shader: SHADER,
    entry: "fwd_combine_main",
    bindings: &[U, R, RW],
};
const GQ: Kernel = Kernel {
    shader: SHADER,
    entry: "gq_main",
    bindings: MAIN_BINDINGS,
};
const GQ_REDUCE: Kernel = Kernel {
    shader: SHADER,
    entry: "gq_reduce_main",
    bindings: &[U, R, R, RW, RW],
};
const GC: Kernel = Kernel {
    shader: SHADER,
    entry: "gc_main",
    bindings: &[U, R, R, R, R, R, RW],
};
const ROW_NORMS: Kernel = Kernel {
    shader: SHADER,
    entry: "row_norms_main",
    bindings: &[U, R, RW],
};
const L2_FINISH: Kernel = Kernel {
    shader: SHADER,
    entry: "l2_finish_main",
    bindings: &[U, R, R, RW],
};

fn dtype_code(d: DType) -> f64 {
    match d {
        DType::F32 => 0.0,
        DType::BF16 => 1.0,
        DType::F16 => 2.0,
    }
}

/// Feature bits of the shader's uniform `flags`.
const F_L2: u32 = 1;
const F_LOGQ: u32 = 2;
const F_IDS: u32 = 4;
const F_VALID: u32 = 8;
const F_QID: u32 = 16;

fn flag(on: bool, bit: u32) -> u32 {
    if on {
        bit
    } else {
        0
    }
}

fn storage<'a>(arg: &'static str, dev: &Arc<WgpuDevice>, t: &'a Tensor) -> Result<&'a WgpuStorage> {
    match &t.storage {
        Storage::Wgpu(s) if Arc::ptr_eq(&s.device, dev) => Ok(s),
        _ => Err(Error::DeviceMismatch {
            op: OP,
            arg,
            expected: dev.describe(),
            actual: t.device().describe(),
        }),
    }
}

fn u32_of(arg: &'static str, what: &str, v: usize) -> Result<u32> {
    if v > MAX_INDEX_32 {
        return Err(Error::invalid(
            OP,
            arg,
            format!("{what} = {v} exceeds the 32-bit index limit {MAX_INDEX_32}"),
        ));
    }
    Ok(v as u32)
}

fn f32_words(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(d: &WgpuDevice, s: &WgpuStorage, n: usize) -> Result<Vec<f32>> {
    let bytes = d.download(s, 4 * n)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// How the tiled kernels cover `rows` rows and `cols` columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub row_blocks: usize,
    pub col_tiles: usize,
    pub splits: usize,
    pub tiles_per_split: usize,
}

/// The column split: enough workgroups to fill a big GPU when B is small (⌈512 / row blocks⌉
/// splits), but at least 4 column tiles per split; no split is empty. At least one row block
/// and one column tile always exist (empty ones are all masked), so every output is written.
pub(crate) fn geometry(rows: usize, cols: usize) -> Geometry {
    let row_blocks = rows.div_ceil(TILE).max(1);
    let col_tiles = cols.div_ceil(TILE).max(1);
    let want = TARGET_WORKGROUPS.div_ceil(row_blocks);
    let cap = col_tiles.div_ceil(MIN_TILES_PER_SPLIT);
    let tiles_per_split = col_tiles.div_ceil(want.min(cap).max(1));
    Geometry {
        row_blocks,
        col_tiles,
        splits: col_tiles.div_ceil(tiles_per_split),
        tiles_per_split,
    }
}

/// One call's shapes, checked, and its metadata on the device.
struct Call<'a> {
    q: &'a WgpuStorage,
    c: &'a WgpuStorage,
    rowm: WgpuStorage,
    colm: WgpuStorage,
    /// f32 [B + N] norms when L2 (from the pool).
    norms: Option<wgpu::Buffer>,
    constants: Vec<(&'static str, f64)>,
    /// The shader's F_* feature bits.
    flags: u32,
}

fn check_args(d: &Arc<WgpuDevice>, a: &SoftmaxArgs<'_>) -> Result<()> {
    if a.q.shape() != [a.b, a.d] {
        return Err(Error::shape(
            OP,
            "q",
            format!("[{}, {}]", a.b, a.d),
            a.q.shape(),
        ));
    }
    if a.c.shape() != [a.n, a.d] {
        return Err(Error::shape(
            OP,
            "c",
            format!("[{}, {}]", a.n, a.d),
            a.c.shape(),
        ));
    }
    let len = |arg: &'static str, got: usize, want: usize| -> Result<()> {
        if got != want {
            return Err(Error::shape(OP, arg, format!("[{want}]"), &[got]));
        }
        Ok(())
    };
    len("target", a.target.len(), a.b)?;
    if let Some(v) = a.log_q {
        len("log_q", v.len(), a.n)?;
    }
    if let Some(v) = a.ids {
        len("ids", v.len(), a.n)?;
    }
    if let Some(v) = a.valid {
        len("valid", v.len(), a.n)?;
    }
    if let Some(v) = a.row_qid {
        len("row_qid", v.len(), a.b)?;
    }
    if let Some(v) = a.col_qid {
        len("col_qid", v.len(), a.n)?;
    }
    if a.target.iter().any(|&t| t != u32::MAX && t as usize >= a.n) {
        return Err(Error::invalid(
            OP,
            "target",
            "a target column is out of range",
        ));
    }
    u32_of("q", "B·d", a.b.saturating_mul(a.d))?;
    u32_of("c", "N·d", a.n.saturating_mul(a.d))?;
    u32_of("c", "metadata words", (a.b + a.n).saturating_mul(ROW_WORDS))?;
    storage("q", d, a.q)?;
    storage("c", d, a.c)?;
    Ok(())
}

fn split_i64(v: i64) -> [u32; 2] {
    [v as u64 as u32, ((v as u64) >> 32) as u32]
}

impl<'a> Call<'a> {
    /// Uploads the metadata; `coef` carries (a, LSE) for the backward kernels. Rows whose
    /// coefficient is zero get a = 0 and LSE = 0 (never read); a NaN LSE is passed on, so the
    /// row's gradients come out NaN as the reference's do.
    fn new(
        d: &Arc<WgpuDevice>,
        a: &SoftmaxArgs<'a>,
        coef: Option<(&[f32], &[f32])>,
    ) -> Result<Self> {
        check_args(d, a)?;
        if let Some((c, l)) = coef {
            if c.len() != a.b || l.len() != a.b {
                return Err(Error::shape(OP, "coef", format!("[{}]", a.b), &[c.len()]));
            }
        }
        let qid = a.row_qid.is_some() && a.col_qid.is_some();
        let mut rowm = vec![0u32; ROW_WORDS * a.b.max(1)];
        for (i, w) in rowm.chunks_exact_mut(ROW_WORDS).take(a.b).enumerate() {
            let t = a.target[i];
            w[0] = t;
            if t == u32::MAX {
                continue;
            }
            if let Some(ids) = a.ids {
                w[1..3].copy_from_slice(&split_i64(ids[t as usize]));
            }
            if let (true, Some(rq)) = (qid, a.row_qid) {
                w[3..5].copy_from_slice(&split_i64(rq[i]));
            }
            if let Some((coef, lse)) = coef {
                if coef[i] != 0.0 {
                    w[5] = coef[i].to_bits();
                    w[6] = lse[i].to_bits();
                }
            }
        }
        let mut colm = vec![0u32; COL_WORDS * a.n.max(1)];
        for (j, w) in colm.chunks_exact_mut(COL_WORDS).take(a.n).enumerate() {
            if let Some(lq) = a.log_q {
                w[0] = lq[j].to_bits();
            }
            w[1] = u32::from(a.valid.is_none_or(|v| v[j]));
            if let Some(ids) = a.ids {
                w[2..4].copy_from_slice(&split_i64(ids[j]));
            }
            if let (true, Some(cq)) = (qid, a.col_qid) {
                w[4..6].copy_from_slice(&split_i64(cq[j]));
            }
        }
        let rowm = d.upload(bytemuck::cast_slice(&rowm))?;
        let colm = d.upload(bytemuck::cast_slice(&colm))?;
        let norms = if a.l2 {
            Some(d.pool.take(d, 4 * (a.b + a.n).max(1) as u64)?)
        } else {
            None
        };
        Ok(Call {
            q: storage("q", d, a.q)?,
            c: storage("c", d, a.c)?,
            rowm,
            colm,
            norms,
            constants: vec![
                ("DT_Q", dtype_code(a.q.dtype())),
                ("DT_C", dtype_code(a.c.dtype())),
            ],
            flags: flag(a.l2, F_L2)
                | flag(a.log_q.is_some(), F_LOGQ)
                | flag(a.ids.is_some(), F_IDS)
                | flag(a.valid.is_some(), F_VALID)
                | flag(qid, F_QID),
        })
    }

    /// The norm passes (queries, and the columns `cols`), when L2 is on.
    fn norm_launches(&self, a: &SoftmaxArgs<'_>, cols: Range<usize>) -> Result<Vec<Launch<'_>>> {
        let Some(norms) = &self.norms else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (x, dt, rows, x_row0, out_off) in [
            (self.q, a.q.dtype(), a.b, 0, 0),
            (
                self.c,
                a.c.dtype(),
                cols.len(),
                cols.start,
                a.b + cols.start,
            ),
        ] {
            if rows == 0 {
                continue;
            }
            out.push(Launch {
                kernel: ROW_NORMS,
                constants: vec![("DT_X", dtype_code(dt))],
                uniform: vec![
                    u32_of("c", "rows", rows)?,
                    u32_of("c", "d", a.d)?,
                    u32_of("c", "first row", x_row0)?,
                    u32_of("c", "norm offset", out_off)?,
                    a.eps.to_bits(),
                    a.kappa.to_bits(),
                ],
                buffers: vec![&x.buffer, norms],
                grid: [(rows as u64).div_ceil(u64::from(WG1)), 1, 1],
                workgroup: [WG1, 1, 1],
                workgroup_bytes: 0,
            });
        }
        Ok(out)
    }

    /// The uniform block of the tiled kernels.
    fn main_uniform(
        &self,
        a: &SoftmaxArgs<'_>,
        g: &Geometry,
        cols: &Range<usize>,
    ) -> Result<Vec<u32>> {
        Ok(vec![
            u32_of("q", "B", a.b)?,
            u32_of("c", "N", a.n)?,
            u32_of("q", "d", a.d)?,
            u32_of("c", "splits", g.splits)?,
            u32_of("c", "first column", cols.start)?,
            u32_of("c", "end column", cols.end)?,
            u32_of("c", "column tiles", g.col_tiles)?,
            u32_of("c", "tiles per split", g.tiles_per_split)?,
            u32_of("q", "row blocks", g.row_blocks)?,
            a.kappa.to_bits(),
            self.flags,
        ])
    }

    fn give_back(self, d: &WgpuDevice) {
        if let Some(b) = self.norms {
            d.pool.give(b);
        }
    }
}

/// The L2 backward (and the κ scale) in place on an f32 `[rows, d]` gradient.
#[allow(clippy::too_many_arguments)]
fn finish_launch<'a>(
    d: &'a WgpuDevice,
    a: &SoftmaxArgs<'_>,
    x: &'a WgpuStorage,
    dt: DType,
    norms: Option<&'a wgpu::Buffer>,
    g: &'a wgpu::Buffer,
    rows: usize,
    x_row0: usize,
    norm_off: usize,
) -> Result<Launch<'a>> {
    Ok(Launch {
        kernel: L2_FINISH,
        constants: vec![("DT_X", dtype_code(dt))],
        uniform: vec![
            u32_of("q", "rows", rows)?,
            u32_of("q", "d", a.d)?,
            u32_of("q", "first row", x_row0)?,
            u32_of("q", "norm offset", norm_off)?,
            a.eps.to_bits(),
            a.kappa.to_bits(),
            u32::from(a.l2),
        ],
        buffers: vec![&x.buffer, norms.unwrap_or(&d.dummy_ro), g],
        grid: [(rows as u64).div_ceil(u64::from(WG1)), 1, 1],
        workgroup: [WG1, 1, 1],
        workgroup_bytes: 0,
    })
}

fn tiled_grid(g: &Geometry) -> [u64; 3] {
    [(g.row_blocks * g.splits) as u64, 1, 1]
}

/// Per-row LSE over D_i (−∞ for inactive rows) and target logit (0 for inactive rows).
pub(crate) fn forward(d: &Arc<WgpuDevice>, a: &SoftmaxArgs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
    let call = Call::new(d, a, None)?;
    let g = geometry(a.b, a.n);
    u32_of("q", "splits·B·2", g.splits * a.b * 2)?;
    let part = d.pool.take(d, (8 * g.splits * a.b.max(1)) as u64)?;
    let zeros = vec![0f32; a.b];
    let s_t = d.upload(&f32_words(&zeros))?;
    let lse = d.upload(&f32_words(&zeros))?;
    let result = (|| {
        let mut launches = call.norm_launches(a, 0..a.n)?;
        launches.push(Launch {
            kernel: FWD,
            constants: call.constants.clone(),
            uniform: call.main_uniform(a, &g, &(0..a.n))?,
            buffers: vec![
                &call.q.buffer,
                &call.c.buffer,
                call.norms.as_ref().unwrap_or(&d.dummy_ro),
                &call.rowm.buffer,
                &call.colm.buffer,
                &part,
                &s_t.buffer,
            ],
            grid: tiled_grid(&g),
            workgroup: [16, 16, 1],
            workgroup_bytes: STAGE_BYTES,
        });
        launches.push(Launch {
            kernel: FWD_COMBINE,
            constants: Vec::new(),
            uniform: vec![u32_of("q", "B", a.b)?, u32_of("c", "splits", g.splits)?],
            buffers: vec![&part, &lse.buffer],
            grid: [(a.b as u64).div_ceil(u64::from(WG1)), 1, 1],
            workgroup: [WG1, 1, 1],
            workgroup_bytes: 0,
        });
        d.run(&launches)
    })();
    d.pool.give(part);
    call.give_back(d);
    result?;
    Ok((read_f32(d, &lse, a.b)?, read_f32(d, &s_t, a.b)?))
}

fn f32_target<'a>(
    d: &Arc<WgpuDevice>,
    arg: &'static str,
    t: &'a Tensor,
    rows: usize,
    cols: usize,
) -> Result<&'a WgpuStorage> {
    if t.dtype() != DType::F32 || t.numel() != rows * cols {
        return Err(Error::shape(
            OP,
            arg,
            format!("f32 [{rows}, {cols}]"),
            t.shape(),
        ));
    }
    storage(arg, d, t)
}

/// dq (f32 `[B, d]`, after the L2 backward) and Σ_i dκ_i summed in row order.
pub(crate) fn grad_queries(
    d: &Arc<WgpuDevice>,
    a: &SoftmaxArgs<'_>,
    coef: &[f32],
    lse: &[f32],
    dq: &mut Tensor,
) -> Result<f32> {
    let call = Call::new(d, a, Some((coef, lse)))?;
    let dq_s = f32_target(d, "dq", dq, a.b, a.d)?;
    let g = geometry(a.b, a.n);
    let part_len = g
        .splits
        .checked_mul(a.b)
        .and_then(|v| v.checked_mul(a.d))
        .ok_or_else(|| Error::invalid(OP, "q", "splits·B·d overflows"))?;
    u32_of("q", "splits·B·d", part_len)?;
    let part = d.pool.take(d, 4 * part_len.max(1) as u64)?;
    let dkp = d.pool.take(d, 4 * (g.splits * a.b).max(1) as u64)?;
    let dk = d.upload(&f32_words(&vec![0f32; a.b]))?;
    let threads = (a.b * a.d).max(a.b);
    let result = (|| {
        let mut launches = call.norm_launches(a, 0..a.n)?;
        launches.push(Launch {
            kernel: GQ,
            constants: call.constants.clone(),
            uniform: call.main_uniform(a, &g, &(0..a.n))?,
            buffers: vec![
                &call.q.buffer,
                &call.c.buffer,
                call.norms.as_ref().unwrap_or(&d.dummy_ro),
                &call.rowm.buffer,
                &call.colm.buffer,
                &part,
                &dkp,
            ],
            grid: tiled_grid(&g),
            workgroup: [16, 16, 1],
            workgroup_bytes: STAGE_BYTES + G_BYTES,
        });
        launches.push(Launch {
            kernel: GQ_REDUCE,
            constants: Vec::new(),
            uniform: vec![
                u32_of("q", "B", a.b)?,
                u32_of("q", "d", a.d)?,
                u32_of("c", "splits", g.splits)?,
                u32_of("q", "threads", threads)?,
            ],
            buffers: vec![&part, &dkp, &dq_s.buffer, &dk.buffer],
            grid: [(threads as u64).div_ceil(u64::from(WG1)), 1, 1],
            workgroup: [WG1, 1, 1],
            workgroup_bytes: 0,
        });
        launches.push(finish_launch(
            d,
            a,
            call.q,
            a.q.dtype(),
            call.norms.as_ref(),
            &dq_s.buffer,
            a.b,
            0,
            0,
        )?);
        d.run(&launches)
    })();
    d.pool.give(part);
    d.pool.give(dkp);
    call.give_back(d);
    result?;
    // Rows in order, in f64: the same fixed order as the CPU backend.
    let dk = read_f32(d, &dk, a.b)?;
    Ok(dk.iter().map(|&v| f64::from(v)).sum::<f64>() as f32)
}

/// dc (f32 `[range.len(), d]`, after the L2 backward) from every row, each column's sum over
/// the row blocks in ascending order.
pub(crate) fn grad_columns(
    d: &Arc<WgpuDevice>,
    a: &SoftmaxArgs<'_>,
    coef: &[f32],
    lse: &[f32],
    range: Range<usize>,
    dc: &mut Tensor,
) -> Result<()> {
    if range.start > range.end || range.end > a.n {
        return Err(Error::invalid(
            OP,
            "range",
            format!("{range:?} is not within {} columns", a.n),
        ));
    }
    let call = Call::new(d, a, Some((coef, lse)))?;
    let dc_s = f32_target(d, "dc", dc, range.len(), a.d)?;
    let g = geometry(a.b, range.len());
    let result = (|| {
        let mut launches = call.norm_launches(a, range.clone())?;
        launches.push(Launch {
            kernel: GC,
            constants: call.constants.clone(),
            uniform: call.main_uniform(a, &g, &range)?,
            buffers: vec![
                &call.q.buffer,
                &call.c.buffer,
                call.norms.as_ref().unwrap_or(&d.dummy_ro),
                &call.rowm.buffer,
                &call.colm.buffer,
                &dc_s.buffer,
            ],
            grid: [g.col_tiles as u64, 1, 1],
            workgroup: [16, 16, 1],
            workgroup_bytes: STAGE_BYTES + G_BYTES,
        });
        launches.push(finish_launch(
            d,
            a,
            call.c,
            a.c.dtype(),
            call.norms.as_ref(),
            &dc_s.buffer,
            range.len(),
            range.start,
            a.b + range.start,
        )?);
        d.run(&launches)
    })();
    call.give_back(d);
    result
}

#[cfg(test)]
mod tests {
    use super::geometry;
    use crate::device::{Device, WgpuOptions};
    use crate::dtype::DType;
    use crate::ops::backend;
    use crate::ops::inbatch_softmax::SoftmaxArgs;
    use crate::tensor::Tensor;

    fn device() -> Option<Device> {
        match super::WgpuDevice::new(&WgpuOptions {
            allow_software: true,
        }) {
            Ok(d) => Some(Device::Wgpu(d)),
            Err(e) => {
                let required = std::env::var("RECFUSE_REQUIRE").is_ok_and(|v| v.contains("wgpu"));
                assert!(!required, "RECFUSE_REQUIRE asks for wgpu, but: {e}");
                eprintln!("SKIPPED: wgpu unavailable: {e}");
                None
            }
        }
    }

    /// Deterministic values in (-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The owner-computes path: column gradients of a sub-range (starting mid-tile, so the
    /// norms, metadata and output offsets are all exercised), against the CPU backend, with L2
    /// on and off; with forward statistics from the wgpu forward itself.
    #[test]
    fn column_range_matches_the_cpu() {
        let Some(dev) = device() else { return };
        let (b, n, d) = (37, 257, 19);
        let (qv, cv) = (values(b * d, 1), values(n * d, 2));
        let target: Vec<u32> = (0..b as u32)
            .map(|i| if i == 5 { u32::MAX } else { i * 3 })
            .collect();
        let log_q: Vec<f32> = values(n, 3).iter().map(|v| v - 1.5).collect();
        let ids: Vec<i64> = (0..n as i64).map(|j| (j * 7) % 101 - 50).collect();
        let valid: Vec<bool> = (0..n).map(|j| j % 11 != 4).collect();
        let row_qid: Vec<i64> = (0..b as i64).map(|i| i / 3).collect();
        let col_qid: Vec<i64> = (0..n as i64)
            .map(|j| if j < 90 { j / 9 } else { -1 })
            .collect();
        let coef: Vec<f32> = (0..b)
            .map(|i| {
                if i % 4 == 1 {
                    0.0
                } else {
                    0.05 * (i as f32 + 1.0)
                }
            })
            .collect();
        for l2 in [true, false] {
            let mut outs = Vec::new();
            for dv in [&dev, &Device::Cpu] {
                let q = Tensor::from_f32(&qv, &[b, d], DType::F32, dv).unwrap();
                let c = Tensor::from_f32(&cv, &[n, d], DType::BF16, dv).unwrap();
                let a = SoftmaxArgs {
                    b,
                    n,
                    d,
                    q: &q,
                    c: &c,
                    kappa: 3.0,
                    l2,
                    eps: 1e-12,
                    target: &target,
                    log_q: Some(&log_q),
                    ids: Some(&ids),
                    valid: Some(&valid),
                    row_qid: Some(&row_qid),
                    col_qid: Some(&col_qid),
                };
                let (lse, _) = backend::softmax_forward(dv, &a).unwrap();
                let range = 70..201;
                let mut dc = Tensor::zeros(&[range.len(), d], DType::F32, dv).unwrap();
                backend::softmax_grad_columns(dv, &a, &coef, &lse, range, &mut dc).unwrap();
                outs.push((lse, dc.to_f32_vec().unwrap()));
            }
            let (w, c) = (&outs[0], &outs[1]);
            for (i, (x, y)) in w.0.iter().zip(&c.0).enumerate() {
                assert!(
                    x == y || (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                    "l2={l2} lse[{i}]: wgpu {x}, cpu {y}"
                );
            }
            let scale = c.1.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0);
            for (e, (x, y)) in w.1.iter().zip(&c.1).enumerate() {
                assert!(
                    (x - y).abs() <= 2e-5 * scale,
                    "l2={l2} dc[{e}]: wgpu {x}, cpu {y}"
                );
            }
        }
    }

    #[test]
    fn column_split_fills_small_batches_and_never_leaves_a_split_empty() {
        // B = 1: as many splits as keep ≥ 4 tiles each.
        let g = geometry(1, 262_144);
        assert_eq!((g.row_blocks, g.col_tiles), (1, 4096));
        assert_eq!((g.splits, g.tiles_per_split), (512, 8));
        // Small N: one split.
        assert_eq!(geometry(1, 256).splits, 1);
        assert_eq!(geometry(7, 257).splits, 2);
        // Big B: no split.
        assert_eq!(geometry(64 * 512, 1 << 20).splits, 1);
        for b in [0, 1, 5, 64, 65, 1000, 9000] {
            for n in [0, 1, 63, 64, 257, 513, 5000, 100_000] {
                let g = geometry(b, n);
                assert!(g.row_blocks >= 1 && g.col_tiles >= 1 && g.splits >= 1);
                assert!(g.splits * g.tiles_per_split >= g.col_tiles, "{b} {n} {g:?}");
                assert!(
                    (g.splits - 1) * g.tiles_per_split < g.col_tiles,
                    "{b} {n} {g:?}"
                );
            }
        }
    }
}
