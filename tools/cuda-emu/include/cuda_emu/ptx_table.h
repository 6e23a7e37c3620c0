// The inline-PTX instructions cuda-emu can execute: one row each, shared by the translator
// (which rejects every other mnemonic at "compile" time, naming it) and the runtime (which
// executes them). Operand signature letters follow the asm constraint letters the kernels use:
// h = 16-bit, r = 32-bit, l = 64-bit integer register, f = f32 register; upper case = the
// instruction writes that operand (destination), lower case = it reads it (source). Address and
// immediate operands: s = a shared-memory address `[%N]` held in a 32-bit register (what
// __cvta_generic_to_shared returns), g = a global address `[%N]` in a 64-bit register,
// i = an integer immediate (a literal, or an "n" operand).
#pragma once

namespace emu {

enum PtxOp : int {
    PTX_CVT_RN_BF16_F32 = 0,
    PTX_CVT_RN_F16_F32,
    PTX_CVT_F32_F16,
    PTX_CVT_RNA_TF32_F32,
    PTX_EX2_APPROX_FTZ_F32,
    PTX_MMA_M16N8K16_BF16,
    PTX_MMA_M16N8K16_F16,
    PTX_MMA_M16N8K8_TF32,
    PTX_CP_ASYNC_CA_16,       // cp.async.ca.shared.global [dst], [src], size
    PTX_CP_ASYNC_CA_ZFILL,    // ... , size, src_size (bytes past src_size are zero-filled)
    PTX_CP_ASYNC_CG_16,
    PTX_CP_ASYNC_CG_ZFILL,
    PTX_CP_ASYNC_COMMIT,
    PTX_CP_ASYNC_WAIT_GROUP,
    PTX_CP_ASYNC_WAIT_ALL,
    PTX_LDMATRIX_X1,
    PTX_LDMATRIX_X2,
    PTX_LDMATRIX_X4,
    PTX_LDMATRIX_X1_TRANS,
    PTX_LDMATRIX_X2_TRANS,
    PTX_LDMATRIX_X4_TRANS,
    PTX_OP_COUNT
};

struct PtxOpInfo {
    PtxOp op;
    const char* mnemonic;
    // One letter per operand, in the order they appear in the instruction text.
    const char* signature;
    // A warp-wide collective (all 32 lanes must execute it together).
    bool collective;
};

inline constexpr PtxOpInfo kPtxOps[] = {
    {PTX_CVT_RN_BF16_F32, "cvt.rn.bf16.f32", "Hf", false},
    {PTX_CVT_RN_F16_F32, "cvt.rn.f16.f32", "Hf", false},
    {PTX_CVT_F32_F16, "cvt.f32.f16", "Fh", false},
    {PTX_CVT_RNA_TF32_F32, "cvt.rna.tf32.f32", "Rf", false},
    {PTX_EX2_APPROX_FTZ_F32, "ex2.approx.ftz.f32", "Ff", false},
    {PTX_MMA_M16N8K16_BF16, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "FFFFrrrrrrffff",
     true},
    {PTX_MMA_M16N8K16_F16, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "FFFFrrrrrrffff",
     true},
    {PTX_MMA_M16N8K8_TF32, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "FFFFrrrrrrffff",
     true},
    {PTX_CP_ASYNC_CA_16, "cp.async.ca.shared.global", "sgi", false},
    {PTX_CP_ASYNC_CA_ZFILL, "cp.async.ca.shared.global", "sgir", false},
    {PTX_CP_ASYNC_CG_16, "cp.async.cg.shared.global", "sgi", false},
    {PTX_CP_ASYNC_CG_ZFILL, "cp.async.cg.shared.global", "sgir", false},
    {PTX_CP_ASYNC_COMMIT, "cp.async.commit_group", "", false},
    {PTX_CP_ASYNC_WAIT_GROUP, "cp.async.wait_group", "i", false},
    {PTX_CP_ASYNC_WAIT_ALL, "cp.async.wait_all", "", false},
    {PTX_LDMATRIX_X1, "ldmatrix.sync.aligned.m8n8.x1.shared.b16", "Rs", true},
    {PTX_LDMATRIX_X2, "ldmatrix.sync.aligned.m8n8.x2.shared.b16", "RRs", true},
    {PTX_LDMATRIX_X4, "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "RRRRs", true},
    {PTX_LDMATRIX_X1_TRANS, "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16", "Rs", true},
    {PTX_LDMATRIX_X2_TRANS, "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16", "RRs", true},
    {PTX_LDMATRIX_X4_TRANS, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "RRRRs", true},
};

}  // namespace emu
