// CUDA source -> host C++ for cuda-emu.
#pragma once

#include <string>

namespace emu {

// Rewrites what host C++ cannot compile as written — inline PTX (`asm`), `__shared__`
// declarations and kernel entry points — and appends one exported `KernelInfo` per
// `__global__` function. Line numbers are preserved (every rewrite keeps its newlines), so the
// source's own `#line` directives still point at the right file and line. Returns false with
// `error` set ("file:line: what") for anything the emulator cannot execute.
bool translate(const std::string& src, const std::string& name, std::string& out,
               std::string& error);

}  // namespace emu
