// A fake NVRTC (libnvrtc.so.13) for cuda-emu: "compiling" a CUDA program translates it to host
// C++ (translate.cpp) and builds it into a shared object with the host compiler; the object's
// bytes are the program's "CUBIN", which the fake driver (driver.cpp) loads with dlopen.
//
// Environment:
//   CUDA_EMU_CXX       host compiler (default g++)
//   CUDA_EMU_SANITIZE  -fsanitize= list for the kernels (e.g. address,undefined); empty: none
//   CUDA_EMU_KEEP=1    keep the translated source and object in $TMPDIR (printed to stderr)
#include <dlfcn.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "translate.h"

extern char** environ;

namespace {

enum nvrtcResult {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_BUILTIN_OPERATION_FAILURE = 7,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
};

struct Program {
    std::string src, name, log, translated;
    std::vector<char> object;
    bool compiled = false;
};

std::string self_dir() {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&self_dir), &info) && info.dli_fname) {
        std::string p = info.dli_fname;
        const size_t s = p.rfind('/');
        return s == std::string::npos ? "." : p.substr(0, s);
    }
    return ".";
}

std::string include_dir() {
    if (const char* e = std::getenv("CUDA_EMU_INCLUDE")) return e;
    std::string d = self_dir();
    const size_t s = d.rfind('/');
    return (s == std::string::npos ? std::string("..") : d.substr(0, s)) + "/include";
}

bool read_file(const std::string& path, std::string& out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    std::stringstream ss;
    ss << f.rdbuf();
    out = ss.str();
    return true;
}

// Runs argv with the environment minus LD_PRELOAD (the sanitiser runtime the test process was
// started with must not be forced into the compiler), output to `log_path`.
int run(const std::vector<std::string>& argv, const std::string& cwd, const std::string& log_path) {
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    std::vector<char*> env;
    for (char** e = environ; *e; ++e) {
        if (std::strncmp(*e, "LD_PRELOAD=", 11) != 0) env.push_back(*e);
    }
    env.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawn_file_actions_addchdir_np(&fa, cwd.c_str());
    pid_t pid;
    const int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), env.data());
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) return -1;
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

nvrtcResult compile(Program& p, int n, const char* const* opts) {
    std::vector<std::string> defines;
    std::string arch = "900";
    std::string std_flag = "-std=c++17";
    for (int i = 0; i < n; ++i) {
        const std::string o = opts[i];
        if (o.rfind("-D", 0) == 0 && o.size() > 2) {
            defines.push_back(o);
        } else if (o.rfind("--define-macro=", 0) == 0) {
            defines.push_back("-D" + o.substr(15));
        } else if (o.rfind("--gpu-architecture=", 0) == 0 || o.rfind("-arch=", 0) == 0) {
            const std::string a = o.substr(o.find('=') + 1);
            if (a.rfind("sm_", 0) != 0 && a.rfind("compute_", 0) != 0) {
                p.log = "cuda-emu nvrtc: unsupported architecture " + a + "\n";
                return NVRTC_ERROR_INVALID_OPTION;
            }
            std::string digits;
            for (char c : a) {
                if (c >= '0' && c <= '9') digits += c;
            }
            if (digits.size() < 2 || std::atoi(digits.c_str()) < 70) {
                p.log = "cuda-emu nvrtc: emulates sm_70 and newer, not " + a + "\n";
                return NVRTC_ERROR_INVALID_OPTION;
            }
            arch = digits + "0";
        } else if (o.rfind("-std=", 0) == 0) {
            std_flag = o;
        } else if (o == "-lineinfo" || o == "--generate-line-info") {
        } else {
            p.log = "cuda-emu nvrtc: option " + o + " is not emulated\n";
            return NVRTC_ERROR_INVALID_OPTION;
        }
    }
    std::string err;
    if (!emu::translate(p.src, p.name.empty() ? "kernel.cu" : p.name, p.translated, err)) {
        p.log = err + "\n";
        return NVRTC_ERROR_COMPILATION;
    }
    // What the module was built from, for the launch trace (CUDA_EMU_TRACE): the program name
    // and its -D defines, in order, as recfuse keys its module cache.
    std::string desc = p.name + "\t";
    for (size_t i = 0; i < defines.size(); ++i) {
        desc += (i ? "," : "") + defines[i].substr(2);
    }
    std::string quoted;
    for (char c : desc) {
        if (c == '\\' || c == '"') quoted += '\\';
        quoted += c == '\t' ? std::string("\\t") : std::string(1, c);
    }
    p.translated += "extern \"C\" __attribute__((visibility(\"default\"))) const char "
                    "cuda_emu_module_desc[] = \"" + quoted + "\";\n";
    const char* tmp = std::getenv("TMPDIR");
    std::string dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/cuda-emu-XXXXXX";
    if (!mkdtemp(&dir[0])) {
        p.log = "cuda-emu nvrtc: cannot create a temporary directory\n";
        return NVRTC_ERROR_INTERNAL_ERROR;
    }
    // The compiler runs in `dir` on relative names, so no temporary path reaches the object.
    const std::string cpp_name = (p.name.empty() ? "kernel.cu" : p.name) + ".cpp";
    const std::string cpp = dir + "/" + cpp_name;
    const std::string so = dir + "/module.so", log = dir + "/build.log";
    {
        std::ofstream f(cpp, std::ios::binary);
        f << p.translated;
    }
    const char* cxx = std::getenv("CUDA_EMU_CXX");
    const char* san = std::getenv("CUDA_EMU_SANITIZE");
    const std::string lib = self_dir();
    std::vector<std::string> argv = {cxx && *cxx ? cxx : "g++", std_flag, "-fPIC", "-shared",
                                     "-fvisibility=hidden", "-fno-strict-aliasing", "-w",
                                     "-I" + include_dir(), "-include", "cuda_emu/device.h",
                                     "-D__CUDA_ARCH__=" + arch,
                                     // The same program builds to the same bytes (recfuse's
                                     // CUBIN cache test relies on it): no temporary paths.
                                     "-ffile-prefix-map=" + dir + "=cuda-emu",
                                     "-frandom-seed=" + p.name};
    if (san && *san) {
        for (const char* f : {"-O1", "-g", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"}) {
            argv.push_back(f);
        }
        argv.push_back(std::string("-fsanitize=") + san);
    } else {
        argv.push_back("-O2");
    }
    argv.insert(argv.end(), defines.begin(), defines.end());
    for (const std::string& a : {cpp_name, std::string("-o"), std::string("module.so"), "-L" + lib,
                                 std::string("-lcudaemu"),
                                 "-Wl,-rpath," + lib}) {
        argv.push_back(a);
    }
    const int rc = run(argv, dir, log);
    std::string out;
    read_file(log, out);
    nvrtcResult result = NVRTC_SUCCESS;
    if (rc != 0) {
        p.log = "cuda-emu nvrtc: the host compiler failed (exit " + std::to_string(rc) +
                ") on the translated " + p.name + ":\n" + out;
        result = NVRTC_ERROR_COMPILATION;
    } else {
        std::string bytes;
        if (!read_file(so, bytes)) {
            p.log = "cuda-emu nvrtc: the compiler wrote no object\n";
            result = NVRTC_ERROR_INTERNAL_ERROR;
        } else {
            p.object.assign(bytes.begin(), bytes.end());
            p.log = out;
            p.compiled = true;
        }
    }
    if (std::getenv("CUDA_EMU_KEEP")) {
        std::fprintf(stderr, "cuda-emu nvrtc: kept %s\n", dir.c_str());
    } else {
        unlink(cpp.c_str());
        unlink(so.c_str());
        unlink(log.c_str());
        rmdir(dir.c_str());
    }
    return result;
}

}  // namespace

extern "C" {

typedef Program* nvrtcProgram;

__attribute__((visibility("default"))) const char* nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_OUT_OF_MEMORY: return "NVRTC_ERROR_OUT_OF_MEMORY";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        default: return "NVRTC_ERROR_INTERNAL_ERROR";
    }
}

__attribute__((visibility("default"))) nvrtcResult nvrtcVersion(int* major, int* minor) {
    if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
    *major = 13;
    *minor = 0;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcCreateProgram(
    nvrtcProgram* prog, const char* src, const char* name, int num_headers,
    const char* const* /*headers*/, const char* const* /*include_names*/) {
    if (!prog || !src) return NVRTC_ERROR_INVALID_INPUT;
    if (num_headers != 0) return NVRTC_ERROR_INVALID_INPUT;  // recfuse's kernels are header-free
    Program* p = new Program;
    p->src = src;
    p->name = name ? name : "";
    *prog = p;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcDestroyProgram(nvrtcProgram* prog) {
    if (!prog || !*prog) return NVRTC_ERROR_INVALID_PROGRAM;
    delete *prog;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int n,
                                                                        const char* const* opts) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    if (n < 0 || (n > 0 && !opts)) return NVRTC_ERROR_INVALID_INPUT;
    return compile(*prog, n, opts);
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog,
                                                                           size_t* size) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    *size = prog->log.size() + 1;
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog,
                                                                       char* log) {
    if (!prog || !log) return NVRTC_ERROR_INVALID_INPUT;
    std::memcpy(log, prog->log.c_str(), prog->log.size() + 1);
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog,
                                                                      size_t* size) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    if (!prog->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = prog->object.size();
    return NVRTC_SUCCESS;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char* out) {
    if (!prog || !out) return NVRTC_ERROR_INVALID_INPUT;
    if (!prog->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    std::memcpy(out, prog->object.data(), prog->object.size());
    return NVRTC_SUCCESS;
}

// There is no PTX: the emulator never produces any, and pretending would let the offline
// ptxas check pass on something that is not PTX.
__attribute__((visibility("default"))) nvrtcResult nvrtcGetPTXSize(nvrtcProgram, size_t*) {
    std::fprintf(stderr, "cuda-emu nvrtc: nvrtcGetPTXSize: the emulator produces no PTX\n");
    return NVRTC_ERROR_INVALID_PROGRAM;
}

__attribute__((visibility("default"))) nvrtcResult nvrtcGetPTX(nvrtcProgram, char*) {
    std::fprintf(stderr, "cuda-emu nvrtc: nvrtcGetPTX: the emulator produces no PTX\n");
    return NVRTC_ERROR_INVALID_PROGRAM;
}

}  // extern "C"
