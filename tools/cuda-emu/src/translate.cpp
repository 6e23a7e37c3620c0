// The source translator: a small scanner that understands just enough of CUDA C++ to find
// `asm` statements, `__shared__` declarations and `__global__` functions in code (not in
// comments, strings or preprocessor lines) and rewrite them; everything else is left to the
// host compiler and cuda_emu/device.h.
#include "translate.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_emu/ptx_table.h"

namespace emu {
namespace {

struct Edit {
    size_t begin, end;
    std::string text;
};

struct Kernel {
    std::string name, max_threads;
    size_t body_begin, body_end;
    std::vector<std::string> shared_types;  // "TYPE DIMS" of each static __shared__ in the body
};

struct Shared {
    size_t pos;
    std::string type;  // TYPE DIMS
};

class Scanner {
   public:
    Scanner(const std::string& s, const std::string& name) : s_(s), name_(name), code_(s.size(), false) {
        classify();
    }

    bool is_code(size_t i) const { return i < s_.size() && code_[i]; }

    // "file:line" of position i, honouring #line directives.
    std::string where(size_t pos) const {
        std::string file = name_;
        long line = 1;
        size_t i = 0;
        while (i < pos && i < s_.size()) {
            size_t eol = s_.find('\n', i);
            if (eol == std::string::npos) eol = s_.size();
            if (eol >= pos) break;
            // A #line directive names the line that follows it.
            size_t j = i;
            while (j < eol && (s_[j] == ' ' || s_[j] == '\t')) ++j;
            long n;
            char name[512];
            if (j < eol && s_[j] == '#' &&
                std::sscanf(s_.c_str() + j, "#line %ld \"%511[^\"]\"", &n, name) == 2) {
                file = name;
                line = n;
            } else {
                ++line;
            }
            i = eol + 1;
        }
        return file + ":" + std::to_string(line);
    }

    // Next identifier `word` in code at or after `from`; npos when none.
    size_t find_word(const std::string& word, size_t from) const {
        for (size_t i = s_.find(word, from); i != std::string::npos; i = s_.find(word, i + 1)) {
            if (!is_code(i)) continue;
            if (i > 0 && ident(s_[i - 1])) continue;
            if (i + word.size() < s_.size() && ident(s_[i + word.size()])) continue;
            return i;
        }
        return std::string::npos;
    }

    size_t skip_ws(size_t i) const {
        while (i < s_.size() && (std::isspace(static_cast<unsigned char>(s_[i])) || !code_[i])) ++i;
        return i;
    }

    // Position just past the bracket matching the one at `open`; npos when unbalanced.
    size_t match(size_t open) const {
        const char o = s_[open];
        const char c = o == '(' ? ')' : o == '[' ? ']' : o == '{' ? '}' : '>';
        int depth = 0;
        for (size_t i = open; i < s_.size(); ++i) {
            if (!code_[i]) continue;
            if (s_[i] == o) ++depth;
            if (s_[i] == c && --depth == 0) return i + 1;
        }
        return std::string::npos;
    }

    static bool ident(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

   private:
    // Marks every byte that is code: not a comment, a string or char literal (their quotes
    // excepted), or a preprocessor line.
    void classify() {
        enum { Code, Line, Block, Str, Chr, Pre } st = Code;
        bool line_start = true;
        for (size_t i = 0; i < s_.size(); ++i) {
            const char c = s_[i], n = i + 1 < s_.size() ? s_[i + 1] : '\0';
            switch (st) {
                case Code:
                    if (c == '/' && n == '/') {
                        st = Line;
                    } else if (c == '/' && n == '*') {
                        st = Block;
                        ++i;
                    } else if (c == '"') {
                        code_[i] = true;
                        st = Str;
                    } else if (c == '\'') {
                        code_[i] = true;
                        st = Chr;
                    } else if (c == '#' && line_start) {
                        st = Pre;
                    } else {
                        code_[i] = true;
                    }
                    break;
                case Line:
                    if (c == '\n') {
                        st = Code;
                        code_[i] = true;
                    }
                    break;
                case Block:
                    if (c == '*' && n == '/') {
                        st = Code;
                        ++i;
                    }
                    break;
                case Str:
                case Chr:
                    if (c == '\\') {
                        ++i;
                    } else if (c == (st == Str ? '"' : '\'')) {
                        code_[i] = true;
                        st = Code;
                    }
                    break;
                case Pre:
                    if (c == '\\' && n == '\n') {
                        ++i;
                    } else if (c == '\n') {
                        st = Code;
                        code_[i] = true;
                    }
                    break;
            }
            if (c == '\n') line_start = true;
            else if (!std::isspace(static_cast<unsigned char>(c))) line_start = false;
        }
    }

    const std::string& s_;
    std::string name_;
    std::vector<bool> code_;
};

std::string trim(const std::string& s) {
    size_t a = 0, b = s.size();
    while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
    while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
    return s.substr(a, b - a);
}

// Keeps a rewrite on as many lines as the text it replaces, so later line numbers hold.
std::string keep_lines(const std::string& original, std::string replacement) {
    size_t nl = 0;
    for (char c : original) nl += c == '\n';
    for (char c : replacement) {
        if (c == '\n' && nl > 0) --nl;
    }
    replacement.append(nl, '\n');
    return replacement;
}

// Splits `s` at top-level occurrences of `sep` (outside brackets and string literals).
std::vector<std::string> split_top(const std::string& s, char sep) {
    std::vector<std::string> out;
    int depth = 0;
    bool str = false;
    size_t start = 0;
    for (size_t i = 0; i < s.size(); ++i) {
        const char c = s[i];
        if (str) {
            if (c == '\\') ++i;
            else if (c == '"') str = false;
            continue;
        }
        if (c == '"') str = true;
        else if (c == '(' || c == '[' || c == '{') ++depth;
        else if (c == ')' || c == ']' || c == '}') --depth;
        else if (c == sep && depth == 0) {
            // Operand expressions sit in parentheses, so a top-level `::` in an asm body is two
            // section separators (an empty output list), never scope resolution.
            out.push_back(s.substr(start, i - start));
            start = i + 1;
        }
    }
    out.push_back(s.substr(start));
    return out;
}

// Concatenated string literals -> their text (the escapes PTX templates use).
bool string_literals(const std::string& s, std::string& out) {
    size_t i = 0;
    out.clear();
    while (true) {
        while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
        if (i == s.size()) return !out.empty() || s.find('"') != std::string::npos;
        if (s[i] != '"') return false;
        for (++i; i < s.size() && s[i] != '"'; ++i) {
            if (s[i] == '\\' && i + 1 < s.size()) {
                const char e = s[++i];
                out += e == 'n' ? '\n' : e == 't' ? '\t' : e;
            } else {
                out += s[i];
            }
        }
        if (i == s.size()) return false;
        ++i;
    }
}

struct Operand {
    char kind;  // '=', '+' or 0 (input)
    char letter;
    std::string expr;
};

bool parse_operands(const std::string& sec, bool outputs, std::vector<Operand>& ops,
                    std::string& err) {
    if (trim(sec).empty()) return true;
    for (const std::string& raw : split_top(sec, ',')) {
        const std::string o = trim(raw);
        std::string cons;
        const size_t q = o.find('"', 1);
        if (o.empty() || o[0] != '"' || q == std::string::npos) {
            err = "cannot parse asm operand `" + o + "`";
            return false;
        }
        cons = o.substr(1, q - 1);
        const std::string rest = trim(o.substr(q + 1));
        if (rest.size() < 2 || rest.front() != '(' || rest.back() != ')') {
            err = "cannot parse asm operand `" + o + "`";
            return false;
        }
        Operand op{0, 0, rest.substr(1, rest.size() - 2)};
        if (outputs) {
            if (cons.size() != 2 || (cons[0] != '=' && cons[0] != '+')) {
                err = "asm output constraint \"" + cons + "\" is not \"=x\" or \"+x\"";
                return false;
            }
            op.kind = cons[0];
            op.letter = cons[1];
        } else {
            if (cons.size() != 1) {
                err = "asm input constraint \"" + cons + "\" is not a single register letter";
                return false;
            }
            op.letter = cons[0];
        }
        if (std::strchr("hrlfdn", op.letter) == nullptr) {
            err = std::string("asm constraint letter '") + op.letter + "' is not emulated";
            return false;
        }
        ops.push_back(op);
    }
    return true;
}

// One `asm(...)` statement -> a call of emu_ptx, or an error naming what is not emulated.
bool rewrite_asm(const std::string& body, std::string& out, std::string& err) {
    std::vector<std::string> secs = split_top(body, ':');
    if (secs.size() > 4) {
        err = "asm statement without the template : outputs : inputs form";
        return false;
    }
    std::string tmpl;
    if (!string_literals(secs[0], tmpl)) {
        err = "asm template is not a string literal";
        return false;
    }
    std::vector<Operand> ops;
    if (secs.size() > 1 && !parse_operands(secs[1], true, ops, err)) return false;
    const size_t n_out = ops.size();
    if (secs.size() > 2 && !parse_operands(secs[2], false, ops, err)) return false;
    if (secs.size() > 3) {
        for (const std::string& c : split_top(secs[3], ',')) {
            std::string lit;
            if (!string_literals(c, lit) || (lit != "memory" && lit != "cc")) {
                err = "asm clobber " + trim(c) + " is not emulated";
                return false;
            }
        }
    }
    // One instruction: "mnemonic operands;".
    std::string t = trim(tmpl);
    if (!t.empty() && t.back() == ';') t.pop_back();
    if (t.find(';') != std::string::npos || t.find('\n') != std::string::npos) {
        err = "asm template `" + trim(tmpl) + "` holds more than one instruction";
        return false;
    }
    size_t sp = 0;
    while (sp < t.size() && !std::isspace(static_cast<unsigned char>(t[sp]))) ++sp;
    const std::string mnemonic = t.substr(0, sp);
    // Operands: %N registers, [%N] addresses, integer literals, in {} vectors or not.
    struct Item {
        enum { Reg, Addr, Imm } kind;
        long long v;
    };
    std::vector<Item> items;
    const std::string args = t.substr(sp);
    for (size_t i = 0; i < args.size(); ++i) {
        const char c = args[i];
        if (std::isspace(static_cast<unsigned char>(c)) || c == ',' || c == '{' || c == '}') continue;
        const bool addr = c == '[';
        size_t j = addr ? i + 1 : i;
        while (j < args.size() && std::isspace(static_cast<unsigned char>(args[j]))) ++j;
        const bool reg = j < args.size() && args[j] == '%';
        size_t k = reg ? j + 1 : j;
        const size_t digits = k;
        while (k < args.size() && std::isdigit(static_cast<unsigned char>(args[k]))) ++k;
        if (k == digits || (addr && !reg)) {
            err = "operand syntax `" + trim(args) + "` of `" + mnemonic +
                  "` is not emulated (only %N registers, [%N] addresses, integer literals and {} "
                  "vectors)";
            return false;
        }
        const long long v = std::stoll(args.substr(digits, k - digits));
        if (addr) {
            while (k < args.size() && std::isspace(static_cast<unsigned char>(args[k]))) ++k;
            if (k >= args.size() || args[k] != ']') {
                err = "address operand of `" + mnemonic + "` is not `[%N]` (offsets are not emulated)";
                return false;
            }
        } else {
            --k;
        }
        items.push_back({addr ? Item::Addr : reg ? Item::Reg : Item::Imm, v});
        i = k;
    }
    const PtxOpInfo* info = nullptr;
    bool known = false;
    for (const PtxOpInfo& o : kPtxOps) {
        if (mnemonic != o.mnemonic) continue;
        known = true;
        if (std::strlen(o.signature) == items.size()) info = &o;
    }
    if (!info) {
        std::string names;
        for (const PtxOpInfo& o : kPtxOps) {
            if (names.find(o.mnemonic) == std::string::npos) {
                names += std::string(names.empty() ? "" : ", ") + o.mnemonic;
            }
        }
        err = known ? "`" + mnemonic + "` with " + std::to_string(items.size()) +
                          " operands is not an emulated form"
                    : "inline PTX instruction `" + mnemonic + "` is not emulated (cuda-emu knows: " +
                          names + ")";
        return false;
    }
    const std::string sig = info->signature;
    std::string call = "{ ::emu::Reg _emu_r[] = {";
    for (size_t p = 0; p < items.size(); ++p) {
        const Item& it = items[p];
        const char want = sig[p];
        const std::string pos = "operand " + std::to_string(p) + " of `" + mnemonic + "`";
        call += p ? ", " : " ";
        if (want == 'i') {
            if (it.kind == Item::Imm) {
                call += "::emu::reg_val<'l'>((long long)(" + std::to_string(it.v) + "))";
                continue;
            }
            if (it.kind != Item::Reg || it.v < 0 || size_t(it.v) >= ops.size() || ops[size_t(it.v)].letter != 'n') {
                err = pos + " must be an integer immediate (a literal or an \"n\" operand)";
                return false;
            }
            call += "::emu::reg_val<'l'>((long long)(" + ops[size_t(it.v)].expr + "))";
            continue;
        }
        if (it.kind == Item::Imm) {
            err = pos + " must be a register, not the literal " + std::to_string(it.v);
            return false;
        }
        const int r = int(it.v);
        if (r < 0 || size_t(r) >= ops.size()) {
            err = "`" + mnemonic + "` refers to %" + std::to_string(r) + ", which is not an operand";
            return false;
        }
        const Operand& op = ops[size_t(r)];
        const bool address = want == 's' || want == 'g';
        if (address != (it.kind == Item::Addr)) {
            err = pos + (address ? " must be an address [%N]" : " must be a register, not an address");
            return false;
        }
        const char letter = want == 's' ? 'r' : want == 'g' ? 'l'
                                                            : char(std::tolower(static_cast<unsigned char>(want)));
        const bool dest = std::isupper(static_cast<unsigned char>(want));
        if (letter != op.letter) {
            err = pos + " must be a \"" + std::string(1, letter) + "\" register, got \"" +
                  std::string(1, op.letter) + "\"";
            return false;
        }
        const bool is_out = size_t(r) < n_out;
        if (dest && !is_out) {
            err = pos + " is written, but %" + std::to_string(r) + " is an input";
            return false;
        }
        if (!dest && is_out && op.kind == '=') {
            err = pos + " is read, but %" + std::to_string(r) + " is write-only (\"=\")";
            return false;
        }
        call += is_out ? "::emu::reg_ref<'" : "::emu::reg_val<'";
        call += op.letter;
        call += "'>(" + op.expr + ")";
    }
    if (items.empty()) call += " ::emu::Reg{nullptr, 0, 0}";
    call += " }; emu_ptx(" + std::to_string(int(info->op)) + ", __FILE__, __LINE__, _emu_r, " +
            std::to_string(items.size()) + "); }";
    out = call;
    return true;
}

}  // namespace

bool translate(const std::string& src, const std::string& name, std::string& out,
               std::string& error) {
    Scanner sc(src, name);
    std::vector<Edit> edits;
    std::vector<Kernel> kernels;
    std::vector<Shared> shared;
    auto fail = [&](size_t pos, const std::string& what) {
        error = sc.where(pos) + ": cuda-emu: " + what;
        return false;
    };

    // asm statements.
    for (const char* kw : {"asm", "__asm__"}) {
        for (size_t p = sc.find_word(kw, 0); p != std::string::npos; p = sc.find_word(kw, p + 1)) {
            size_t i = sc.skip_ws(p + std::strlen(kw));
            for (const char* q : {"volatile", "__volatile__"}) {
                if (src.compare(i, std::strlen(q), q) == 0 && !Scanner::ident(src[i + std::strlen(q)])) {
                    i = sc.skip_ws(i + std::strlen(q));
                }
            }
            if (i >= src.size() || src[i] != '(') return fail(p, "`asm` without a parenthesised body");
            const size_t close = sc.match(i);
            if (close == std::string::npos) return fail(p, "unbalanced asm statement");
            size_t semi = sc.skip_ws(close);
            if (semi >= src.size() || src[semi] != ';') return fail(p, "asm statement without `;`");
            std::string call, err;
            if (!rewrite_asm(src.substr(i + 1, close - i - 2), call, err)) return fail(p, err);
            edits.push_back({p, semi + 1, keep_lines(src.substr(p, semi + 1 - p), call)});
        }
    }

    // __shared__ declarations.
    for (size_t p = sc.find_word("__shared__", 0); p != std::string::npos;
         p = sc.find_word("__shared__", p + 1)) {
        size_t begin = p;
        bool dynamic = false;
        // `extern __shared__ T name[];` is the dynamic shared memory of the launch.
        size_t back = p;
        while (back > 0 && std::isspace(static_cast<unsigned char>(src[back - 1]))) --back;
        if (back >= 6 && src.compare(back - 6, 6, "extern") == 0 &&
            (back == 6 || !Scanner::ident(src[back - 7]))) {
            dynamic = true;
            begin = back - 6;
        }
        size_t end = p;
        while (end < src.size() && !(sc.is_code(end) && src[end] == ';')) ++end;
        if (end == src.size()) return fail(p, "__shared__ declaration without `;`");
        std::string decl = src.substr(p + 10, end - p - 10);
        std::string align = "0";
        const size_t a = decl.find("__align__");
        if (a != std::string::npos) {
            const size_t o = decl.find('(', a), c = decl.find(')', a);
            if (o == std::string::npos || c == std::string::npos) return fail(p, "bad __align__");
            align = decl.substr(o + 1, c - o - 1);
            decl.erase(a, c + 1 - a);
        }
        decl = trim(decl);
        if (decl.find('=') != std::string::npos) return fail(p, "__shared__ variables cannot have initialisers");
        if (split_top(decl, ',').size() != 1) return fail(p, "one declarator per __shared__ declaration, please");
        const size_t br = decl.find('[');
        size_t name_end = br == std::string::npos ? decl.size() : br;
        while (name_end > 0 && std::isspace(static_cast<unsigned char>(decl[name_end - 1]))) --name_end;
        size_t name_begin = name_end;
        while (name_begin > 0 && Scanner::ident(decl[name_begin - 1])) --name_begin;
        const std::string name = decl.substr(name_begin, name_end - name_begin);
        const std::string type = trim(decl.substr(0, name_begin));
        const std::string dims = br == std::string::npos ? "" : trim(decl.substr(br));
        if (name.empty() || type.empty()) return fail(p, "cannot parse __shared__ declaration `" + decl + "`");
        std::string rep;
        if (dynamic) {
            if (dims != "[]") return fail(p, "extern __shared__ must be an unsized array `T name[]`");
            rep = type + "* const " + name + " = ::emu::shared_dynamic<" + type + ">(" + align + ");";
        } else {
            rep = "static char " + name + "_emu_key_; auto& " + name + " = ::emu::shared_static<" + type +
                  dims + ">(&" + name + "_emu_key_, " + align + ", \"" + name + "\");";
            shared.push_back({p, type + dims});
        }
        edits.push_back({begin, end + 1, keep_lines(src.substr(begin, end + 1 - begin), rep)});
    }

    // Kernel entry points.
    for (size_t p = sc.find_word("__global__", 0); p != std::string::npos;
         p = sc.find_word("__global__", p + 1)) {
        Kernel k;
        k.max_threads = "1024";
        size_t i = sc.skip_ws(p + 10);
        while (i < src.size()) {
            if (src.compare(i, 4, "void") == 0 && !Scanner::ident(src[i + 4])) {
                i = sc.skip_ws(i + 4);
            } else if (src.compare(i, 17, "__launch_bounds__") == 0) {
                const size_t o = sc.skip_ws(i + 17);
                const size_t c = sc.match(o);
                if (o >= src.size() || src[o] != '(' || c == std::string::npos) return fail(p, "bad __launch_bounds__");
                k.max_threads = trim(split_top(src.substr(o + 1, c - o - 2), ',')[0]);
                i = sc.skip_ws(c);
            } else {
                break;
            }
        }
        size_t e = i;
        while (e < src.size() && Scanner::ident(src[e])) ++e;
        k.name = src.substr(i, e - i);
        const size_t paren = sc.skip_ws(e);
        if (k.name.empty() || paren >= src.size() || src[paren] != '(') {
            return fail(p, "cannot find the name of this __global__ function (template kernels are not supported)");
        }
        const size_t params_end = sc.match(paren);
        const size_t brace = params_end == std::string::npos ? params_end : sc.skip_ws(params_end);
        if (brace >= src.size() || src[brace] != '{') return fail(p, "__global__ function without a body");
        k.body_begin = brace;
        k.body_end = sc.match(brace);
        if (k.body_end == std::string::npos) return fail(p, "unbalanced kernel body");
        for (const Shared& s : shared) {
            if (s.pos > k.body_begin && s.pos < k.body_end) k.shared_types.push_back(s.type);
        }
        // The entry point goes right after the body, on the same line: inside the same
        // preprocessor conditional as the kernel, and without moving any later line.
        std::string smem = "0";
        for (const std::string& t : k.shared_types) smem += " + sizeof(" + t + ")";
        std::string entry = " namespace { void cuda_emu_body_" + k.name + "(void** kp) { ::emu::invoke(&" +
                            k.name + ", kp); } } extern \"C\" __attribute__((visibility(\"default\"))) "
                            "const ::emu::KernelInfo cuda_emu_kernel_" + k.name + " = {\"" + k.name +
                            "\", &cuda_emu_body_" + k.name + ", (unsigned)(" + k.max_threads +
                            "), (std::size_t)(" + smem + ")}; static ::emu::Registrar cuda_emu_reg_" +
                            k.name + "{&cuda_emu_kernel_" + k.name + "};";
        edits.push_back({k.body_end, k.body_end, entry});
        kernels.push_back(k);
    }

    // Apply the edits back to front.
    std::sort(edits.begin(), edits.end(), [](const Edit& a, const Edit& b) { return a.begin > b.begin; });
    out = src;
    size_t limit = std::string::npos;
    for (const Edit& e : edits) {
        if (e.end > limit) return fail(e.begin, "internal: overlapping rewrites");
        out.replace(e.begin, e.end - e.begin, e.text);
        limit = e.begin;
    }
    // Sources without #line directives are named by the program, as NVRTC does.
    out.insert(0, "#line 1 \"" + name + "\"\n");

    out += "\n";
    out += "extern \"C\" __attribute__((visibility(\"default\"))) const int cuda_emu_module_abi = 1;\n";
    out += "extern \"C\" __attribute__((visibility(\"default\"))) const ::emu::ModuleKernels* "
           "cuda_emu_module_kernels() { return &::emu::module_kernels(); }\n";
    return true;
}

}  // namespace emu
