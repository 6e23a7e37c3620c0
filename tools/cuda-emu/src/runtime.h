// The cuda-emu runtime's interface to the fake driver (libcuda.so): run one kernel launch.
#pragma once

#include <cstddef>
#include <string>

#include "cuda_emu/device.h"

namespace emu {

struct LaunchDims {
    unsigned grid[3];
    unsigned block[3];
    unsigned dyn_smem;
};

// Runs every block of the launch on the calling OS thread, one block at a time, its threads as
// fibers under the schedule chosen by CUDA_EMU_SCHEDULE. Returns false and fills `error` (kernel,
// block, thread, what, where) when the emulator detects a defect; memory errors are reported by
// AddressSanitizer, which aborts the process.
bool run_kernel(const KernelInfo& k, const LaunchDims& d, void** params, std::string& error);

// The schedule in force, as text (for the device name and logs).
std::string schedule_name();

}  // namespace emu
