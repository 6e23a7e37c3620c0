// cuda-emu runtime (libcudaemu.so): runs a translated kernel's threads as fibers, one block
// at a time per OS thread, with CUDA's block barrier and warp collectives as rendezvous points,
// poisoned shared memory, and the inline PTX instructions of ptx_table.h.
//
// Why fibers: a block's threads must be able to stop at a __syncthreads or a warp collective
// and let the others catch up, which needs one stack per thread; and running one block per OS
// thread makes a block's shared memory simply "this block's allocations".
//
// Scheduling (CUDA_EMU_SCHEDULE): the emulator switches threads only at barriers, collectives
// and exits, so the order in which threads run between those points decides which missing
// barriers show up. `warp-serial` (the default, and CI's) runs each warp alone from barrier to
// barrier, the order that exposes a missing __syncthreads between warps.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// AddressSanitizer's fiber interface, resolved only when the ASan runtime is in the process
// (LD_PRELOAD in the sanitised runs); otherwise the weak references are null and skipped.
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size)
    __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old) __attribute__((weak));
void __asan_unpoison_memory_region(const volatile void* addr, size_t size) __attribute__((weak));
}

// Context switch: saves the callee-saved registers and the FPU/SSE control words on the
// current stack, stores the stack pointer in *from, and resumes the stack `to`.
extern "C" void emu_ctx_switch(void** from, void* to);
extern "C" void emu_fiber_start();

#if defined(__x86_64__)
asm(R"(
.text
.globl emu_ctx_switch
.type emu_ctx_switch,@function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_ctx_switch, .-emu_ctx_switch

.globl emu_fiber_start
.type emu_fiber_start,@function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
.size emu_fiber_start, .-emu_fiber_start
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#error "cuda-emu: the fiber switch is written for x86-64 only"
#endif

namespace emu {
namespace {

enum class St { Ready, Barrier, Collective, Exited };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable address (above the guard page)
    size_t stack_size = 0;
    void* asan_fake = nullptr;
    St st = St::Ready;
    unsigned index = 0;  // linear thread index in the block
    uint3 tid{};
    const char* file = nullptr;  // where it waits
    int line = 0;
    // cp.async copies issued but not yet landed: the open group, then committed groups, oldest
    // first. A copy's source is read at issue, its destination written when a wait retires it.
    struct Copy {
        unsigned char* dst;
        unsigned char bytes[16];
        unsigned n;
    };
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
};

// Shared memory as the kernel addresses it: each allocation of the block gets a range of a
// 32-bit "shared window" (what __cvta_generic_to_shared returns and cp.async / ldmatrix take).
struct Window {
    unsigned char* host;
    size_t bytes;
    uint32_t base;
};

constexpr unsigned kMaxCollectiveBytes = 64;

struct Warp {
    unsigned lanes = 0;  // lanes that exist (32 except a block's last, partial warp)
    unsigned arrived = 0;
    const char* what = nullptr;
    const char* file = nullptr;
    int line = 0;
    unsigned in_bytes = 0, out_bytes = 0;
    ResolveFn resolve = nullptr;
    const void* ctx = nullptr;
    unsigned char in[32 * kMaxCollectiveBytes];
    unsigned char out[32 * kMaxCollectiveBytes];
};

enum class Mode { Forward, Reverse, Random, WarpSerial };

struct Schedule {
    Mode mode = Mode::WarpSerial;
    Mode warp_order = Mode::Forward;  // for WarpSerial
    uint64_t seed = 1;
    std::string text = "warp-serial";
};

struct Block {
    const KernelInfo* k = nullptr;
    void** params = nullptr;
    unsigned nthreads = 0;
    std::vector<Fiber>* fibers = nullptr;
    std::vector<Warp> warps;
    std::vector<std::pair<const void*, void*>> shared;
    std::vector<size_t> shared_bytes;
    size_t static_total = 0;
    void* dyn = nullptr;
    size_t dyn_bytes = 0;
    std::vector<Window> windows;
    uint32_t next_base = 0;
    Fiber* cur = nullptr;
    bool failed = false;
    std::string error;
    // Scheduling state.
    Schedule sched;
    uint64_t rng = 0;
    unsigned cursor = 0;
    std::vector<unsigned> warp_order;
    unsigned warp_pos = 0;
};

thread_local Indices t_idx;
thread_local Block* t_block = nullptr;
thread_local void* t_sched_sp = nullptr;
thread_local void* t_sched_fake = nullptr;
thread_local const void* t_sched_bottom = nullptr;
thread_local size_t t_sched_size = 0;

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

Mode parse_order(const std::string& s, uint64_t& seed, bool& ok) {
    if (s == "forward" || s == "lockstep") return Mode::Forward;
    if (s == "reverse") return Mode::Reverse;
    if (s.rfind("random", 0) == 0) {
        if (s.size() > 7 && s[6] == ':') seed = std::strtoull(s.c_str() + 7, nullptr, 10);
        else if (s.size() != 6) ok = false;
        return Mode::Random;
    }
    ok = false;
    return Mode::Forward;
}

const Schedule& schedule() {
    static const Schedule s = [] {
        Schedule r;
        const char* env = std::getenv("CUDA_EMU_SCHEDULE");
        if (!env || !*env) return r;
        std::string v = env;
        bool ok = true;
        if (v.rfind("warp-serial", 0) == 0) {
            r.mode = Mode::WarpSerial;
            if (v.size() > 11) {
                if (v[11] != ':') ok = false;
                else r.warp_order = parse_order(v.substr(12), r.seed, ok);
            }
        } else {
            r.mode = parse_order(v, r.seed, ok);
        }
        if (!ok) {
            std::fprintf(stderr,
                         "cuda-emu: CUDA_EMU_SCHEDULE=%s is not one of lockstep, reverse, "
                         "random[:SEED], warp-serial[:lockstep|reverse|random[:SEED]]\n",
                         env);
            std::abort();
        }
        r.text = v;
        return r;
    }();
    return s;
}

size_t stack_bytes() {
    static const size_t n = [] {
        size_t kib = 256;
        if (const char* e = std::getenv("CUDA_EMU_STACK_KIB")) kib = std::strtoul(e, nullptr, 10);
        if (kib < 64) kib = 64;
        return kib * 1024;
    }();
    return n;
}

// Stacks are kept per OS thread and reused by every block it runs.
struct StackPool {
    std::vector<std::pair<char*, size_t>> maps;
    ~StackPool() {
        for (auto& m : maps) munmap(m.first, m.second);
    }
};
thread_local StackPool t_stacks;
thread_local std::vector<Fiber> t_fibers;

void ensure_fibers(unsigned n) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t usable = stack_bytes();
    while (t_fibers.size() < n) {
        const size_t total = usable + page;
        void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "cuda-emu: cannot map a %zu-byte fiber stack\n", total);
            std::abort();
        }
        mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting
        t_stacks.maps.emplace_back(static_cast<char*>(m), total);
        Fiber f;
        f.stack = static_cast<char*>(m) + page;
        f.stack_size = usable;
        t_fibers.push_back(f);
    }
}

std::string where(const Block& b, const Fiber* f) {
    char buf[256];
    if (f) {
        std::snprintf(buf, sizeof buf,
                      "kernel `%s` block (%u,%u,%u) thread (%u,%u,%u) [warp %u lane %u]",
                      b.k->name, t_idx.block_idx.x, t_idx.block_idx.y, t_idx.block_idx.z, f->tid.x,
                      f->tid.y, f->tid.z, f->index / 32, f->index % 32);
    } else {
        std::snprintf(buf, sizeof buf, "kernel `%s` block (%u,%u,%u)", b.k->name,
                      t_idx.block_idx.x, t_idx.block_idx.y, t_idx.block_idx.z);
    }
    return buf;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

void to_scheduler(Fiber* f) {
    if (__sanitizer_start_switch_fiber) {
        __sanitizer_start_switch_fiber(f->st == St::Exited ? nullptr : &f->asan_fake,
                                       t_sched_bottom, t_sched_size);
    }
    emu_ctx_switch(&f->sp, t_sched_sp);
    if (__sanitizer_finish_switch_fiber) {
        __sanitizer_finish_switch_fiber(f->asan_fake, &t_sched_bottom, &t_sched_size);
    }
}

// Records the first defect of the block and abandons the calling fiber (never resumed).
[[noreturn]] void fail_here(const std::string& what) {
    Block& b = *t_block;
    Fiber* f = b.cur;
    if (!b.failed) {
        b.failed = true;
        b.error = where(b, f) + ": " + what;
    }
    f->st = St::Exited;
    to_scheduler(f);
    std::abort();  // unreachable: the scheduler never resumes a failed block
}

void fiber_main(Fiber* f) {
    if (__sanitizer_finish_switch_fiber) {
        __sanitizer_finish_switch_fiber(nullptr, &t_sched_bottom, &t_sched_size);
    }
    Block& b = *t_block;
    b.k->body(b.params);
    size_t pending = f->open.size();
    for (const auto& g : f->groups) pending += g.size();
    if (pending) {
        fail_here(fmt("the thread exited with %zu cp.async copies that no cp.async.wait_group / "
                      "wait_all retired (their data never lands)",
                      pending));
    }
    f->st = St::Exited;
    to_scheduler(f);
    std::abort();
}

void start_fiber(Fiber& f) {
    if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(f.stack, f.stack_size);
    // Initial frame, as emu_ctx_switch pops it: control words, r15..rbp, then the return
    // address emu_fiber_start, which calls fiber_main(r12 = f) with a 16-byte aligned stack.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
    uint64_t* ret = reinterpret_cast<uint64_t*>(top - 24);
    *ret = reinterpret_cast<uint64_t>(&emu_fiber_start);
    uint64_t* regs = ret - 6;  // r15, r14, r13, r12, rbx, rbp (lowest first)
    regs[0] = 0;
    regs[1] = 0;
    regs[2] = reinterpret_cast<uint64_t>(&fiber_main);
    regs[3] = reinterpret_cast<uint64_t>(&f);
    regs[4] = 0;
    regs[5] = 0;
    uint32_t* ctl = reinterpret_cast<uint32_t*>(regs) - 4;
    uint16_t fcw;
    uint32_t mxcsr;
    asm volatile("fnstcw %0" : "=m"(fcw));
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    std::memset(ctl, 0, 16);
    std::memcpy(ctl, &fcw, 2);
    ctl[2] = mxcsr;
    f.sp = ctl;
}

void run_fiber(Block& b, Fiber& f) {
    b.cur = &f;
    t_idx.thread_idx = f.tid;
    if (__sanitizer_start_switch_fiber) {
        __sanitizer_start_switch_fiber(&t_sched_fake, f.stack, f.stack_size);
    }
    emu_ctx_switch(&t_sched_sp, f.sp);
    if (__sanitizer_finish_switch_fiber) {
        __sanitizer_finish_switch_fiber(t_sched_fake, nullptr, nullptr);
    }
    b.cur = nullptr;
}

void new_warp_order(Block& b) {
    const unsigned nw = unsigned(b.warps.size());
    b.warp_order.resize(nw);
    for (unsigned i = 0; i < nw; ++i) {
        b.warp_order[i] = b.sched.warp_order == Mode::Reverse ? nw - 1 - i : i;
    }
    if (b.sched.warp_order == Mode::Random) {
        for (unsigned i = nw; i > 1; --i) {
            unsigned j = unsigned(splitmix(b.rng) % i);
            std::swap(b.warp_order[i - 1], b.warp_order[j]);
        }
    }
    b.warp_pos = 0;
}

Fiber* pick(Block& b) {
    std::vector<Fiber>& fs = *b.fibers;
    const unsigned n = b.nthreads;
    switch (b.sched.mode) {
        case Mode::Forward:
            for (unsigned s = 0; s < n; ++s) {
                unsigned i = (b.cursor + s) % n;
                if (fs[i].st == St::Ready) {
                    b.cursor = (i + 1) % n;
                    return &fs[i];
                }
            }
            return nullptr;
        case Mode::Reverse:
            for (unsigned s = 0; s < n; ++s) {
                unsigned i = (b.cursor + n - s) % n;
                if (fs[i].st == St::Ready) {
                    b.cursor = (i + n - 1) % n;
                    return &fs[i];
                }
            }
            return nullptr;
        case Mode::Random: {
            unsigned ready = 0;
            for (unsigned i = 0; i < n; ++i) ready += fs[i].st == St::Ready;
            if (!ready) return nullptr;
            unsigned pick = unsigned(splitmix(b.rng) % ready);
            for (unsigned i = 0; i < n; ++i) {
                if (fs[i].st == St::Ready && pick-- == 0) return &fs[i];
            }
            return nullptr;
        }
        case Mode::WarpSerial:
            // The current warp keeps the processor until none of its lanes can run.
            for (; b.warp_pos < b.warp_order.size(); ++b.warp_pos) {
                const unsigned w = b.warp_order[b.warp_pos];
                const unsigned lo = w * 32, hi = std::min(n, lo + 32);
                for (unsigned i = lo; i < hi; ++i) {
                    if (fs[i].st == St::Ready) return &fs[i];
                }
            }
            return nullptr;
    }
    return nullptr;
}

// Nothing can run: either the block is done, a barrier completes, or the block is stuck.
// Returns false when the block is finished or failed.
bool resolve_stall(Block& b) {
    std::vector<Fiber>& fs = *b.fibers;
    unsigned exited = 0, at_barrier = 0, in_coll = 0;
    const Fiber* first_bar = nullptr;
    for (unsigned i = 0; i < b.nthreads; ++i) {
        switch (fs[i].st) {
            case St::Exited: ++exited; break;
            case St::Barrier:
                ++at_barrier;
                if (!first_bar) first_bar = &fs[i];
                break;
            case St::Collective: ++in_coll; break;
            case St::Ready: break;
        }
    }
    if (exited == b.nthreads) return false;
    if (in_coll == 0 && at_barrier + exited == b.nthreads) {
        if (exited) {
            const Fiber* gone = nullptr;
            for (unsigned i = 0; i < b.nthreads && !gone; ++i) {
                if (fs[i].st == St::Exited) gone = &fs[i];
            }
            b.failed = true;
            b.error = where(b, first_bar) +
                      fmt(": __syncthreads() at %s:%d waits for thread (%u,%u,%u), which has "
                          "already exited (a barrier in divergent code; %u of %u threads exited)",
                          first_bar->file, first_bar->line, gone->tid.x, gone->tid.y, gone->tid.z,
                          exited, b.nthreads);
            return false;
        }
        for (unsigned i = 0; i < b.nthreads; ++i) {
            const Fiber& f = fs[i];
            if (f.line != first_bar->line || std::strcmp(f.file, first_bar->file) != 0) {
                b.failed = true;
                b.error = where(b, &f) +
                          fmt(": divergent barriers: this thread waits at __syncthreads() at "
                              "%s:%d while thread %u waits at %s:%d",
                              f.file, f.line, first_bar->index, first_bar->file, first_bar->line);
                return false;
            }
        }
        for (unsigned i = 0; i < b.nthreads; ++i) fs[i].st = St::Ready;
        b.cursor = b.sched.mode == Mode::Reverse ? b.nthreads - 1 : 0;
        if (b.sched.mode == Mode::WarpSerial) new_warp_order(b);
        return true;
    }
    // Stuck: some warp waits at a collective that cannot complete.
    for (unsigned i = 0; i < b.nthreads; ++i) {
        const Fiber& f = fs[i];
        if (f.st != St::Collective) continue;
        const Warp& w = b.warps[f.index / 32];
        for (unsigned l = 0; l < w.lanes; ++l) {
            const Fiber& o = fs[(f.index / 32) * 32 + l];
            if (o.st == St::Collective) continue;
            b.failed = true;
            b.error = where(b, &f) +
                      fmt(": deadlock: %s at %s:%d waits for lane %u of its warp, which %s", w.what,
                          w.file, w.line, l,
                          o.st == St::Exited ? "has exited"
                                             : fmt("waits at __syncthreads() at %s:%d", o.file,
                                                   o.line)
                                                   .c_str());
            return false;
        }
    }
    b.failed = true;
    b.error = where(b, nullptr) + ": deadlock (no thread can run)";
    return false;
}

void run_block(Block& b) {
    std::vector<Fiber>& fs = *b.fibers;
    for (unsigned i = 0; i < b.nthreads; ++i) {
        Fiber& f = fs[i];
        f.st = St::Ready;
        f.index = i;
        f.tid = uint3{i % t_idx.block_dim.x, (i / t_idx.block_dim.x) % t_idx.block_dim.y,
                      i / (t_idx.block_dim.x * t_idx.block_dim.y)};
        f.file = nullptr;
        f.line = 0;
        f.asan_fake = nullptr;
        f.open.clear();
        f.groups.clear();
        start_fiber(f);
    }
    b.cursor = b.sched.mode == Mode::Reverse ? b.nthreads - 1 : 0;
    if (b.sched.mode == Mode::WarpSerial) new_warp_order(b);
    for (;;) {
        Fiber* f = pick(b);
        if (f) {
            run_fiber(b, *f);
            if (b.failed) return;
            continue;
        }
        if (!resolve_stall(b)) return;
    }
}

void free_shared(Block& b) {
    for (auto& s : b.shared) std::free(s.second);
    b.shared.clear();
    b.shared_bytes.clear();
    b.static_total = 0;
    std::free(b.dyn);
    b.dyn = nullptr;
    b.windows.clear();
    b.next_base = 0;
}

void add_window(Block& b, void* host, size_t bytes, size_t align) {
    const uint32_t a = uint32_t(align < 16 ? 16 : align);
    const uint32_t base = (b.next_base + a - 1) / a * a;
    b.windows.push_back({static_cast<unsigned char*>(host), bytes, base});
    b.next_base = base + uint32_t(bytes);
}

// The host bytes behind shared addresses [addr, addr + n), which must lie in one allocation.
unsigned char* shared_at(uint32_t addr, size_t n, const char* what) {
    Block& b = *t_block;
    for (const Window& w : b.windows) {
        if (addr >= w.base && uint64_t(addr) + n <= uint64_t(w.base) + w.bytes) {
            return w.host + (addr - w.base);
        }
    }
    fail_here(fmt("%s: shared address 0x%x (+%zu bytes) is outside every shared allocation of "
                  "the block",
                  what, addr, n));
}

// cp.async.{ca,cg}.shared.global [dst], [src], size[, src_size].
void cp_async(const char* what, bool cg, uint32_t dst_addr, uint64_t src, long long size,
              long long src_size) {
    if (size != 4 && size != 8 && size != 16) {
        fail_here(fmt("%s: copy size %lld is not 4, 8 or 16", what, size));
    }
    if (cg && size != 16) fail_here(fmt("%s: .cg copies 16 bytes only, not %lld", what, size));
    if (src_size < 0 || src_size > size) {
        fail_here(fmt("%s: source size %lld outside 0..%lld", what, src_size, size));
    }
    if (dst_addr % uint32_t(size) != 0) {
        fail_here(fmt("%s: shared destination 0x%x is not %lld-byte aligned", what, dst_addr, size));
    }
    if (src % uint64_t(size) != 0) {
        fail_here(fmt("%s: global source 0x%llx is not %lld-byte aligned", what,
                      (unsigned long long)src, size));
    }
    unsigned char* dst = shared_at(dst_addr, size_t(size), what);
    Fiber::Copy c{dst, {}, unsigned(size)};
    if (src_size > 0) std::memcpy(c.bytes, reinterpret_cast<const void*>(src), size_t(src_size));
    // Until a wait retires it, the destination reads as poison (0xFF: NaN in every float), so a
    // read before the wait, or a wait for the wrong group, gives wrong results.
    std::memset(dst, 0xff, size_t(size));
    t_block->cur->open.push_back(c);
}

void cp_async_wait(long long keep) {
    Fiber* f = t_block->cur;
    if (keep < 0) fail_here(fmt("cp.async.wait_group %lld: a negative group count", keep));
    while (f->groups.size() > size_t(keep)) {
        for (const Fiber::Copy& c : f->groups.front()) std::memcpy(c.dst, c.bytes, c.n);
        f->groups.erase(f->groups.begin());
    }
}

struct LdmatrixOp {
    unsigned count;
    bool trans;
};

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row
// addresses of matrix i (16 contiguous, 16-byte aligned bytes each); lane l receives from each
// matrix the word holding row l/4, elements 2(l%4) and 2(l%4)+1 (the smaller index in the low
// half), or with .trans the same of the transposed matrix (PTX ISA, "ldmatrix").
void ldmatrix_resolve(const unsigned char* ins, unsigned char* outs, const void* ctx) {
    const LdmatrixOp& op = *static_cast<const LdmatrixOp*>(ctx);
    const uint32_t* addr = reinterpret_cast<const uint32_t*>(ins);
    uint32_t* out = reinterpret_cast<uint32_t*>(outs);
    uint16_t m[4][8][8];
    for (unsigned i = 0; i < op.count; ++i) {
        for (unsigned r = 0; r < 8; ++r) {
            const uint32_t a = addr[8 * i + r];
            if (a % 16 != 0) {
                fail_here(fmt("ldmatrix: lane %u's row address 0x%x is not 16-byte aligned",
                              8 * i + r, a));
            }
            std::memcpy(m[i][r], shared_at(a, 16, "ldmatrix"), 16);
        }
    }
    for (unsigned l = 0; l < 32; ++l) {
        for (unsigned i = 0; i < op.count; ++i) {
            const unsigned r = l / 4, c = 2 * (l % 4);
            const uint16_t lo = op.trans ? m[i][c][r] : m[i][r][c];
            const uint16_t hi = op.trans ? m[i][c + 1][r] : m[i][r][c + 1];
            out[l * 4 + i] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
    }
}

// ---- PTX ----------------------------------------------------------------------------------

float f32_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// cvt.rn.bf16.f32: round to nearest even; NaN -> canonical 0x7FFF.
uint16_t cvt_rn_bf16(float x) {
    uint32_t u = bits_of(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

// cvt.rn.f16.f32: round to nearest even, overflow to infinity, subnormals kept, NaN -> 0x7FFF.
uint16_t cvt_rn_f16(float x) {
    const uint32_t u = bits_of(x);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fff;
    if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (incl. inf) rounds to inf
    if (a < 0x38800000u) {                          // below 2^-14: an f16 subnormal (or 0)
        const float m = std::nearbyint(std::fabs(x) * 16777216.0f);  // units of 2^-24, RNE
        return sign | uint16_t(m);  // m == 1024 is exactly the smallest normal's encoding
    }
    const uint32_t e = (a >> 23) - 127 + 15;
    const uint32_t mant = a & 0x7fffffu;
    uint32_t h = (e << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return sign | uint16_t(h);
}

// cvt.f32.f16: exact.
float cvt_f32_f16(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (e == 0) {
        const float v = std::ldexp(float(mant), -24);
        return sign ? -v : v;
    }
    if (e == 31) return f32_of(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
    return f32_of(sign | ((e - 15 + 127) << 23) | (mant << 13));
}

// cvt.rna.tf32.f32: round half away from zero to 10 mantissa bits, low 13 bits cleared.
uint32_t cvt_rna_tf32(float x) {
    uint32_t u = bits_of(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
}

// ex2.approx.ftz.f32: subnormal inputs and results flushed to zero.
float ex2_approx_ftz(float x) {
    if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
    float y = std::exp2(x);
    if (std::fpclassify(y) == FP_SUBNORMAL) y = 0.0f;
    return y;
}

float bf16_val(uint16_t h) { return f32_of(uint32_t(h) << 16); }

struct MmaIn {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
};
static_assert(sizeof(MmaIn) <= kMaxCollectiveBytes, "mma inputs fit a collective slot");

// Element (row, col) positions of one lane's fragments, from the PTX ISA's "Matrix Fragments
// for mma.m16n8k16 with floating point type" and "... mma.m16n8k8 (.tf32)" figures; g is the
// lane's group (lane >> 2) and t its thread-in-group (lane & 3).
void frag_c(unsigned lane, unsigned i, unsigned& row, unsigned& col) {
    const unsigned g = lane >> 2, t = lane & 3;
    row = g + (i >= 2 ? 8 : 0);
    col = 2 * t + (i & 1);
}

template <int OP>
void mma_resolve(const unsigned char* ins, unsigned char* outs, const void*) {
    const MmaIn* in = reinterpret_cast<const MmaIn*>(ins);
    float* out = reinterpret_cast<float*>(outs);
    constexpr unsigned K = OP == PTX_MMA_M16N8K8_TF32 ? 8 : 16;
    double A[16][16], B[16][8], C[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane >> 2, t = lane & 3;
        const MmaIn& m = in[lane];
        if constexpr (OP == PTX_MMA_M16N8K8_TF32) {
            // The tensor core reads the top 19 bits of each tf32 operand.
            auto tf = [](uint32_t u) { return double(f32_of(u & 0xffffe000u)); };
            A[g][t] = tf(m.a[0]);
            A[g + 8][t] = tf(m.a[1]);
            A[g][t + 4] = tf(m.a[2]);
            A[g + 8][t + 4] = tf(m.a[3]);
            B[t][g] = tf(m.b[0]);
            B[t + 4][g] = tf(m.b[1]);
        } else {
            auto h = [](uint32_t word, unsigned i) {
                const uint16_t bitsv = uint16_t(i & 1 ? word >> 16 : word & 0xffffu);
                return OP == PTX_MMA_M16N8K16_BF16 ? double(bf16_val(bitsv))
                                                   : double(cvt_f32_f16(bitsv));
            };
            for (unsigned i = 0; i < 8; ++i) {
                const unsigned row = g + (((i >> 1) & 1) ? 8 : 0);
                const unsigned col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
                A[row][col] = h(m.a[i / 2], i);
            }
            for (unsigned i = 0; i < 4; ++i) {
                const unsigned k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
                B[k][g] = h(m.b[i / 2], i);
            }
        }
        for (unsigned i = 0; i < 4; ++i) {
            unsigned r, c;
            frag_c(lane, i, r, c);
            C[r][c] = m.c[i];
        }
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        for (unsigned i = 0; i < 4; ++i) {
            unsigned r, c;
            frag_c(lane, i, r, c);
            double s = C[r][c];
            for (unsigned k = 0; k < K; ++k) s += A[r][k] * B[k][c];
            out[lane * 4 + i] = float(s);
        }
    }
}

uint64_t reg_read(const Reg& r) {
    uint64_t v = 0;
    std::memcpy(&v, r.ptr ? r.ptr : &r.val, r.bytes);
    return v;
}
void reg_write(const Reg& r, uint64_t v) { std::memcpy(r.ptr, &v, r.bytes); }
float reg_f(const Reg& r) { return f32_of(uint32_t(reg_read(r))); }
void reg_wf(const Reg& r, float f) { reg_write(r, bits_of(f)); }

// A fiber that never reaches a barrier, collective or exit cannot be preempted, so an infinite
// loop in a kernel would hang the test run. A watchdog thread ends the process instead, naming
// the kernel and block, once a launch has run longer than CUDA_EMU_TIMEOUT_S (default 900).
struct Running {
    const char* kernel = nullptr;
    const Indices* idx = nullptr;
    std::chrono::steady_clock::time_point since;
};
std::mutex g_watch_mu;
std::vector<Running*> g_running;

void watchdog() {
    const char* e = std::getenv("CUDA_EMU_TIMEOUT_S");
    const long limit = e && *e ? std::strtol(e, nullptr, 10) : 900;
    for (;;) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        std::lock_guard<std::mutex> lk(g_watch_mu);
        const auto now = std::chrono::steady_clock::now();
        for (const Running* r : g_running) {
            const long s = long(std::chrono::duration_cast<std::chrono::seconds>(now - r->since).count());
            if (s > limit) {
                std::fprintf(stderr,
                             "cuda-emu: kernel `%s` (at block (%u,%u,%u)) has run for %ld s, more "
                             "than CUDA_EMU_TIMEOUT_S=%ld: an infinite loop in a thread that never "
                             "reaches a barrier; ending the process rather than hanging\n",
                             r->kernel, r->idx->block_idx.x, r->idx->block_idx.y,
                             r->idx->block_idx.z, s, limit);
                std::abort();
            }
        }
    }
}

struct Watched {
    Running r;
    explicit Watched(const char* kernel) {
        // One watchdog per process (a forked child has none until it launches).
        static pid_t watched_pid = 0;
        {
            std::lock_guard<std::mutex> lk(g_watch_mu);
            if (watched_pid != getpid()) {
                watched_pid = getpid();
                std::thread(watchdog).detach();
            }
        }
        r.kernel = kernel;
        r.idx = &t_idx;
        r.since = std::chrono::steady_clock::now();
        std::lock_guard<std::mutex> lk(g_watch_mu);
        g_running.push_back(&r);
    }
    ~Watched() {
        std::lock_guard<std::mutex> lk(g_watch_mu);
        for (size_t i = 0; i < g_running.size(); ++i) {
            if (g_running[i] == &r) {
                g_running.erase(g_running.begin() + long(i));
                break;
            }
        }
    }
};

}  // namespace

// ---- driver interface -----------------------------------------------------------------------

std::string schedule_name() { return schedule().text; }

bool run_kernel(const KernelInfo& k, const LaunchDims& d, void** params, std::string& error) {
    static uint64_t launches = 0;
    const uint64_t launch_no = __atomic_fetch_add(&launches, 1, __ATOMIC_RELAXED);
    Watched watched(k.name);
    const unsigned nthreads = d.block[0] * d.block[1] * d.block[2];
    ensure_fibers(nthreads);
    Block b;
    b.k = &k;
    b.params = params;
    b.nthreads = nthreads;
    b.fibers = &t_fibers;
    b.sched = schedule();
    b.warps.resize((nthreads + 31) / 32);
    for (size_t w = 0; w < b.warps.size(); ++w) {
        b.warps[w].lanes = std::min(32u, nthreads - unsigned(w) * 32);
    }
    t_idx.block_dim = dim3{d.block[0], d.block[1], d.block[2]};
    t_idx.grid_dim = dim3{d.grid[0], d.grid[1], d.grid[2]};
    Block* saved = t_block;
    t_block = &b;
    bool ok = true;
    for (unsigned z = 0; z < d.grid[2] && ok; ++z) {
        for (unsigned y = 0; y < d.grid[1] && ok; ++y) {
            for (unsigned x = 0; x < d.grid[0] && ok; ++x) {
                t_idx.block_idx = uint3{x, y, z};
                uint64_t s = b.sched.seed ^ (launch_no * 0x100000001b3ull) ^
                             ((uint64_t(z) << 42) | (uint64_t(y) << 21) | x);
                b.rng = splitmix(s);
                for (Warp& w : b.warps) w.arrived = 0;
                b.dyn_bytes = d.dyn_smem;
                b.dyn = std::malloc(d.dyn_smem ? d.dyn_smem : 1);
                std::memset(b.dyn, 0xff, d.dyn_smem);
                add_window(b, b.dyn, d.dyn_smem, 16);
                run_block(b);
                free_shared(b);
                if (b.failed) {
                    error = "cuda-emu: " + b.error;
                    ok = false;
                }
            }
        }
    }
    t_block = saved;
    return ok;
}

}  // namespace emu

using namespace emu;

extern "C" {

Indices* emu_indices() { return &t_idx; }

void emu_syncthreads(const char* file, int line) {
    Block& b = *t_block;
    Fiber* f = b.cur;
    f->st = St::Barrier;
    f->file = file;
    f->line = line;
    to_scheduler(f);
}

void emu_collective(const char* what, const char* file, int line, unsigned mask, const void* in,
                    unsigned in_bytes, void* out, unsigned out_bytes, ResolveFn resolve,
                    const void* ctx) {
    Block& b = *t_block;
    Fiber* f = b.cur;
    if (mask != 0xffffffffu) {
        fail_here(fmt("%s at %s:%d with member mask 0x%08x: only full-warp masks are "
                      "emulated (a partial mask needs its own model)",
                      what, file, line, mask));
    }
    Warp& w = b.warps[f->index / 32];
    const unsigned lane = f->index % 32;
    if (w.lanes != 32) {
        fail_here(fmt("%s at %s:%d in a partial warp of %u lanes (blockDim is not a multiple "
                      "of 32): the full mask names lanes that do not exist",
                      what, file, line, w.lanes));
    }
    if (in_bytes > kMaxCollectiveBytes || out_bytes > kMaxCollectiveBytes) {
        fail_here(fmt("%s: %u/%u-byte operands exceed the emulator's %u-byte slots", what,
                      in_bytes, out_bytes, kMaxCollectiveBytes));
    }
    std::vector<Fiber>& fs = *b.fibers;
    const unsigned base = f->index - lane;
    if (w.arrived == 0) {
        w.what = what;
        w.file = file;
        w.line = line;
        w.in_bytes = in_bytes;
        w.out_bytes = out_bytes;
        w.resolve = resolve;
        w.ctx = ctx;
    } else if (w.line != line || std::strcmp(w.file, file) != 0 || std::strcmp(w.what, what) != 0) {
        fail_here(fmt("divergent warp collectives: this lane reached %s at %s:%d while other "
                      "lanes of its warp wait at %s at %s:%d",
                      what, file, line, w.what, w.file, w.line));
    }
    for (unsigned l = 0; l < 32; ++l) {
        if (fs[base + l].st == St::Exited) {
            fail_here(fmt("%s at %s:%d: lane %u of this warp has already exited, so the "
                          "collective can never complete",
                          what, file, line, l));
        }
    }
    std::memcpy(w.in + lane * in_bytes, in, in_bytes);
    if (++w.arrived == 32) {
        w.resolve(w.in, w.out, w.ctx);
        w.arrived = 0;
        for (unsigned l = 0; l < 32; ++l) {
            if (l != lane) fs[base + l].st = St::Ready;
        }
    } else {
        f->st = St::Collective;
        f->file = file;
        f->line = line;
        to_scheduler(f);
    }
    std::memcpy(out, w.out + lane * out_bytes, out_bytes);
}

void emu_ptx(int op, const char* file, int line, Reg* r, int n) {
    if (op < 0 || op >= PTX_OP_COUNT || int(std::strlen(kPtxOps[op].signature)) != n) {
        fail_here(fmt("internal: PTX op %d with %d operands at %s:%d", op, n, file, line));
    }
    switch (op) {
        case PTX_CVT_RN_BF16_F32: reg_write(r[0], cvt_rn_bf16(reg_f(r[1]))); return;
        case PTX_CVT_RN_F16_F32: reg_write(r[0], cvt_rn_f16(reg_f(r[1]))); return;
        case PTX_CVT_F32_F16: reg_wf(r[0], cvt_f32_f16(uint16_t(reg_read(r[1])))); return;
        case PTX_CVT_RNA_TF32_F32: reg_write(r[0], cvt_rna_tf32(reg_f(r[1]))); return;
        case PTX_EX2_APPROX_FTZ_F32: reg_wf(r[0], ex2_approx_ftz(reg_f(r[1]))); return;
        case PTX_MMA_M16N8K16_BF16:
        case PTX_MMA_M16N8K16_F16:
        case PTX_MMA_M16N8K8_TF32: {
            MmaIn in;
            for (int i = 0; i < 4; ++i) in.a[i] = uint32_t(reg_read(r[4 + i]));
            for (int i = 0; i < 2; ++i) in.b[i] = uint32_t(reg_read(r[8 + i]));
            for (int i = 0; i < 4; ++i) in.c[i] = reg_f(r[10 + i]);
            float d[4];
            ResolveFn fn = op == PTX_MMA_M16N8K16_BF16  ? &mma_resolve<PTX_MMA_M16N8K16_BF16>
                           : op == PTX_MMA_M16N8K16_F16 ? &mma_resolve<PTX_MMA_M16N8K16_F16>
                                                        : &mma_resolve<PTX_MMA_M16N8K8_TF32>;
            emu_collective(kPtxOps[op].mnemonic, file, line, 0xffffffffu, &in, sizeof in, d,
                           sizeof d, fn, nullptr);
            for (int i = 0; i < 4; ++i) reg_wf(r[i], d[i]);
            return;
        }
        case PTX_CP_ASYNC_CA_16:
        case PTX_CP_ASYNC_CG_16:
        case PTX_CP_ASYNC_CA_ZFILL:
        case PTX_CP_ASYNC_CG_ZFILL: {
            const bool cg = op == PTX_CP_ASYNC_CG_16 || op == PTX_CP_ASYNC_CG_ZFILL;
            const long long size = (long long)reg_read(r[2]);
            const bool zfill = op == PTX_CP_ASYNC_CA_ZFILL || op == PTX_CP_ASYNC_CG_ZFILL;
            const long long src_size = zfill ? (long long)uint32_t(reg_read(r[3])) : size;
            cp_async(kPtxOps[op].mnemonic, cg, uint32_t(reg_read(r[0])), reg_read(r[1]), size,
                     src_size);
            return;
        }
        case PTX_CP_ASYNC_COMMIT: {
            Fiber* f = t_block->cur;
            f->groups.push_back(std::move(f->open));
            f->open.clear();
            return;
        }
        case PTX_CP_ASYNC_WAIT_GROUP: cp_async_wait((long long)reg_read(r[0])); return;
        case PTX_CP_ASYNC_WAIT_ALL: {
            Fiber* f = t_block->cur;
            f->groups.push_back(std::move(f->open));
            f->open.clear();
            cp_async_wait(0);
            return;
        }
        case PTX_LDMATRIX_X1:
        case PTX_LDMATRIX_X2:
        case PTX_LDMATRIX_X4:
        case PTX_LDMATRIX_X1_TRANS:
        case PTX_LDMATRIX_X2_TRANS:
        case PTX_LDMATRIX_X4_TRANS: {
            static const LdmatrixOp ops[6] = {{1, false}, {2, false}, {4, false},
                                              {1, true},  {2, true},  {4, true}};
            const LdmatrixOp& lo = ops[op - PTX_LDMATRIX_X1];
            const uint32_t addr = uint32_t(reg_read(r[lo.count]));
            uint32_t d[4];
            emu_collective(kPtxOps[op].mnemonic, file, line, 0xffffffffu, &addr, sizeof addr, d,
                           sizeof d, &ldmatrix_resolve, &lo);
            for (unsigned i = 0; i < lo.count; ++i) reg_write(r[i], d[i]);
            return;
        }
        default: break;
    }
    fail_here(fmt("internal: PTX op %d not executable", op));
}

void* emu_shared_static(const void* key, size_t bytes, size_t align, const char* name) {
    Block& b = *t_block;
    for (size_t i = 0; i < b.shared.size(); ++i) {
        if (b.shared[i].first == key) {
            if (b.shared_bytes[i] != bytes) {
                fail_here(fmt("__shared__ %s declared with %zu bytes, then %zu", name,
                              b.shared_bytes[i], bytes));
            }
            return b.shared[i].second;
        }
    }
    // An exact-size allocation per block: AddressSanitizer sees any access past its end, and
    // the 0xFF poison (a NaN in every float, -1 in every integer) exposes reads of memory that
    // no thread of this block wrote.
    void* p = nullptr;
    if (align <= 16) {
        p = std::malloc(bytes ? bytes : 1);
    } else if (posix_memalign(&p, align, bytes ? bytes : 1) != 0) {
        p = nullptr;
    }
    if (!p) fail_here(fmt("cannot allocate %zu bytes of shared memory for %s", bytes, name));
    std::memset(p, 0xff, bytes);
    add_window(b, p, bytes, align);
    b.shared.emplace_back(key, p);
    b.shared_bytes.push_back(bytes);
    b.static_total += bytes;
    if (b.static_total > b.k->static_smem) {
        fail_here(fmt("__shared__ %s brings static shared memory to %zu bytes, more than the %zu "
                      "bytes declared in the kernel body (shared memory declared in a device "
                      "function is not accounted for by cuFuncGetAttribute)",
                      name, b.static_total, b.k->static_smem));
    }
    return p;
}

void* emu_shared_dynamic(size_t align) {
    Block& b = *t_block;
    if (reinterpret_cast<uintptr_t>(b.dyn) % align != 0) {
        fail_here(fmt("extern __shared__ needs %zu-byte alignment; the emulator gives 16", align));
    }
    return b.dyn;
}

size_t emu_cvta_shared(const void* p) {
    Block& b = *t_block;
    const unsigned char* q = static_cast<const unsigned char*>(p);
    for (const Window& w : b.windows) {
        if (q >= w.host && q < w.host + w.bytes) return w.base + size_t(q - w.host);
    }
    fail_here("__cvta_generic_to_shared of an address that is not in the block's shared memory");
}

void emu_trap(const char* file, int line, const char* what) {
    fail_here(fmt("%s at %s:%d", what, file, line));
}

}  // extern "C"
