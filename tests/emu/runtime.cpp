// The emulator's runtime: launch checks, the block scheduler (fibers or OS threads), barriers and
// warp collectives with their checks, shared-memory poisoning, the runtime API and the error log.
// See upreid_emu.h for the model and tests/emu/README.md for what each mode checks.
#include "upreid_emu.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <cxxabi.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define UPREID_EMU_TSAN 1
extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* f, int l);
void AnnotateIgnoreReadsEnd(const char* f, int l);
void AnnotateIgnoreWritesBegin(const char* f, int l);
void AnnotateIgnoreWritesEnd(const char* f, int l);
void AnnotateIgnoreSyncBegin(const char* f, int l);
void AnnotateIgnoreSyncEnd(const char* f, int l);
}
#endif

#ifdef UPREID_EMU_RACE
constexpr bool kRace = true;
#else
constexpr bool kRace = false;
#endif

thread_local upreid_emu::Thread* upreid_emu::t_cur = nullptr;

namespace upreid_emu {
namespace {

// ---- configuration, error state -------------------------------------------------------------------
struct Config {
  int major = 9, minor = 0, sms = 132;
  int smem_optin = 232448, smem_per_sm = 233472, max_threads_sm = 2048, max_blocks_sm = 32;
  int binary_arch = 90;  // what cudaFuncGetAttributes reports as binaryVersion / ptxVersion
};
Config g_cfg;
std::mutex g_log_mu;
std::string g_log;       // every error since the last clear, one per line
std::string g_launches;  // "name grid block smem" per launch since the last clear
// Work counters since the last clear (they show how often a kernel re-forms the same products):
// completed block barriers (each __syncthreads of each block once) and warp-level mma_sync calls.
std::atomic<int64_t> g_barriers{0}, g_mmas{0}, g_async_copies{0};  // + cp.async copies issued
cudaError_t g_last = cudaSuccess;
std::map<const void*, int> g_max_dyn;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::vector<std::pair<unsigned char*, size_t>> g_static_smem;  // registered __shared__ statics

void log_error(const std::string& msg) {
  std::lock_guard<std::mutex> g(g_log_mu);
  g_log += msg;
  g_log += '\n';
}

std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d != nullptr ? std::string(d) : std::string(info.dli_sname);
    std::free(d);
    // drop the parameter list: "ns::kernel<...>(args)" -> "ns::kernel<...>"
    int depth = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '<') ++depth;
      if (s[i] == '>') --depth;
      if (s[i] == '(' && depth == 0) return s.substr(0, i);
    }
    return s;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "kernel@%p", fn);
  return buf;
}

// Hides the emulator's own memory accesses and locks from TSan: only the annotations below create
// happens-before edges, exactly where CUDA orders memory (__syncthreads, __syncwarp).
struct Quiet {
  Quiet() {
#ifdef UPREID_EMU_TSAN
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#endif
  }
  ~Quiet() {
#ifdef UPREID_EMU_TSAN
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
#endif
  }
};
inline void hb_release(void* a) {
#ifdef UPREID_EMU_TSAN
  __tsan_release(a);
#else
  (void)a;
#endif
}
inline void hb_acquire(void* a) {
#ifdef UPREID_EMU_TSAN
  __tsan_acquire(a);
#else
  (void)a;
#endif
}

struct Abort {};  // unwinds a CUDA thread after an error of its block

// ---- fibers (functional mode) ---------------------------------------------------------------------
struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  unsigned char* stack = nullptr;
  bool started = false;
  bool done = true;
  Thread* th = nullptr;
  const Body* body = nullptr;
};
constexpr size_t kStack = 512 * 1024;
jmp_buf g_sched;
Fiber* g_running = nullptr;
std::vector<std::unique_ptr<Fiber>> g_pool;

void run_thread(Thread* t, const Body& body);

void fiber_yield() {
  Fiber* f = g_running;
  if (!_setjmp(f->jb)) _longjmp(g_sched, 1);
}

void fiber_entry() {
  for (;;) {
    Fiber* f = g_running;
    run_thread(f->th, *f->body);
    f->done = true;
    fiber_yield();
  }
}

void fiber_resume(Fiber* f) {
  g_running = f;
  t_cur = f->th;
  if (!_setjmp(g_sched)) {
    if (!f->started) {
      f->started = true;
      setcontext(&f->uc);
    } else {
      _longjmp(f->jb, 1);
    }
  }
  g_running = nullptr;
  t_cur = nullptr;
}

Fiber* fiber_get(size_t i) {
  while (g_pool.size() <= i) {
    auto f = std::make_unique<Fiber>();
    // one guard page below the stack: an overflow faults instead of corrupting a neighbour
    void* mem = mmap(nullptr, kStack + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "upreid emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, 4096, PROT_NONE);
    f->stack = static_cast<unsigned char*>(mem) + 4096;
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = kStack;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, fiber_entry, 0);
    g_pool.push_back(std::move(f));
  }
  return g_pool[i].get();
}

}  // namespace

// ---- block state ----------------------------------------------------------------------------------
struct Warp {
  unsigned present = 0;  // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;
  unsigned arrived = 0;  // lanes waiting in a collective
  unsigned mask[32] = {};
  Op op[32] = {};
  const char* file[32] = {};
  int line[32] = {};
  uint64_t in[32] = {};
  int arg[32] = {};
  int width[32] = {};
  uint64_t out[32] = {};
  unsigned release[32] = {};  // bumped when the lane's collective completes
  unsigned parity[32] = {};   // __syncwarp happens-before slot each participant released into
  unsigned parbits[32] = {};  // per participant: the parities of its collective's lanes (bit k)
  float mma_in[32][24] = {};
  float mma_out[32][8] = {};
  char hb[32][2] = {};  // per-lane __syncwarp happens-before objects
};

struct Block {
  int n = 0, live = 0, blocked = 0;
  int bar_count = 0;
  unsigned bar_gen = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  int bar_first = 0;
  bool abort = false;
  std::string where;  // "kernel block (x,y,z)"
  std::vector<Warp> warps;
  std::vector<Thread>* threads = nullptr;
  char hb_bar[2] = {};
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
  std::mutex mu;
  std::condition_variable cv;
};

namespace {

constexpr size_t kCanary = 64;

std::string thread_str(const Thread* t) {
  std::ostringstream s;
  s << "thread (" << t->tid.x << "," << t->tid.y << "," << t->tid.z << ")";
  return s.str();
}
const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kMma: return "wmma::mma_sync";
  }
  return "?";
}
std::string site(const char* f, int l) {
  std::string s = f != nullptr ? f : "?";
  const size_t k = s.rfind("csrc/");
  if (k != std::string::npos) s = s.substr(k);
  return s + ":" + std::to_string(l);
}

// Records the block's first error and wakes every waiter (they unwind with Abort). Lock held.
void fail_locked(Block& b, const std::string& what) {
  if (!b.abort) log_error("upreid emu: " + b.where + ": " + what);
  b.abort = true;
  if (kRace) b.cv.notify_all();
}

// Waits (lock held) until `ready`; `t` is counted as blocked, and the thread that satisfies the
// condition subtracts the waiters it frees. If every live thread would be waiting, nothing can
// release them: a deadlock, reported with every thread's wait site.
template <class R>
void wait_locked(Block& b, std::unique_lock<std::mutex>& lk, Thread* t, const char* what,
                 const char* file, int line, R ready) {
  if (ready()) return;
  t->wait_what = what;
  t->wait_file = file;
  t->wait_line = line;
  ++b.blocked;
  if (b.blocked >= b.live) {
    std::map<std::string, int> sites;
    for (Thread& o : *b.threads)
      if (o.wait_what != nullptr) sites[std::string(o.wait_what) + " at " + site(o.wait_file, o.wait_line)]++;
    std::string msg = "deadlock: every live thread (" + std::to_string(b.live) + ") waits:";
    for (auto& kv : sites) msg += " " + std::to_string(kv.second) + " in " + kv.first + ";";
    fail_locked(b, msg);
  }
  while (!ready() && !b.abort) {
    if (kRace) {
      b.cv.wait(lk);
    } else {
      lk.unlock();
      fiber_yield();
      lk.lock();
    }
  }
  t->wait_what = nullptr;
  if (!ready()) throw Abort{};  // aborted while still waiting
}

void check_abort(Block& b) {
  if (b.abort) throw Abort{};
}

// A warp collective completes: compute every participant's result. Lock held.
void complete_locked(Block& b, Warp& w, unsigned m) {
  const Op op = w.op[__builtin_ctz(m)];
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((m >> l) & 1u) ballot |= (w.in[l] != 0 ? 1u : 0u) << l;
  for (int l = 0; l < 32; ++l) {
    if (!((m >> l) & 1u)) continue;
    const int width = w.width[l];
    const int seg = l & ~(width - 1);
    int src = l;
    bool own = false;
    switch (op) {
      case Op::kShfl: src = seg + (w.arg[l] & (width - 1)); break;
      case Op::kShflXor: src = l ^ w.arg[l]; own = src >= seg + width || src < seg; break;
      case Op::kShflUp: src = l - w.arg[l]; own = src < seg; break;
      case Op::kShflDown: src = l + w.arg[l]; own = src >= seg + width; break;
      default: break;
    }
    switch (op) {
      case Op::kShfl:
      case Op::kShflXor:
      case Op::kShflUp:
      case Op::kShflDown:
        if (own) {
          w.out[l] = w.in[l];
        } else if (!((m >> src) & 1u)) {
          fail_locked(b, std::string(op_name(op)) + " at " + site(w.file[l], w.line[l]) + ": lane " +
                             std::to_string(l) + " reads lane " + std::to_string(src) +
                             ", which is not in the mask");
          return;
        } else {
          w.out[l] = w.in[src];
        }
        break;
      case Op::kBallot: w.out[l] = ballot; break;
      case Op::kAny: w.out[l] = ballot != 0; break;
      case Op::kAll: w.out[l] = ballot == m; break;
      case Op::kMma: break;
    }
  }
  if (op == Op::kMma) {
    float A[256], B[256], C[256];
    int lane_of[256], slot_of[256];
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 8; ++i) {
        const int e = frag_elem(l, i);
        lane_of[e] = l;
        slot_of[e] = i;
        A[e] = w.mma_in[l][i];
        B[e] = w.mma_in[l][8 + i];
        C[e] = w.mma_in[l][16 + i];
      }
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) {
        float acc = C[r * 16 + n];
        for (int k = 0; k < 16; ++k) acc = std::fma(A[r * 16 + k], B[k * 16 + n], acc);
        const int e = r * 16 + n;
        w.mma_out[lane_of[e]][slot_of[e]] = acc;
      }
  }
  unsigned pb = 0;
  for (int l = 0; l < 32; ++l)
    if ((m >> l) & 1u) pb |= (w.parity[l] & 1u) << l;
  w.arrived &= ~m;
  for (int l = 0; l < 32; ++l)
    if ((m >> l) & 1u) {
      w.release[l]++;
      w.parbits[l] = pb;
    }
  b.blocked -= __builtin_popcount(m) - 1;  // the completing lane was not waiting
  if (kRace) b.cv.notify_all();
}

// Arrival of the calling lane at a warp collective (or __syncwarp when op is 0). Lock held.
// Returns after the collective completed.
void warp_arrive(Block& b, std::unique_lock<std::mutex>& lk, Thread* t, Op op, const char* name,
                 const char* file, int line, unsigned m, uint64_t value, int arg, int width) {
  Warp& w = b.warps[t->linear >> 5];
  const int l = t->linear & 31;
  const unsigned me = 1u << l;
  auto bad = [&](const std::string& why) {
    fail_locked(b, std::string(name) + " at " + site(file, line) + ", " + thread_str(t) + ": " + why);
    throw Abort{};
  };
  char buf[160];
  if (!(m & me)) {
    std::snprintf(buf, sizeof(buf), "lane %d calls it with mask 0x%08x, which excludes the lane itself", l, m);
    bad(buf);
  }
  if (m & ~w.present) {
    std::snprintf(buf, sizeof(buf), "mask 0x%08x names lanes that do not exist (warp has 0x%08x)", m, w.present);
    bad(buf);
  }
  if (m & w.exited) {
    std::snprintf(buf, sizeof(buf), "mask 0x%08x names lanes that have exited (0x%08x)", m, m & w.exited);
    bad(buf);
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) bad("width must be a power of two <= 32");
  w.arrived |= me;
  w.mask[l] = m;
  w.op[l] = op;
  w.file[l] = file;
  w.line[l] = line;
  w.in[l] = value;
  w.arg[l] = arg;
  w.width[l] = width;
  w.parity[l] = t->nwarp & 1u;
  const unsigned my = w.release[l];
  if ((w.arrived & m) == m) {
    for (int k = 0; k < 32; ++k) {
      if (!((m >> k) & 1u)) continue;
      if (w.mask[k] != m || w.op[k] != op) {
        std::snprintf(buf, sizeof(buf),
                      "lanes disagree: lane %d is in %s at %s with mask 0x%08x, lane %d in %s at %s "
                      "with mask 0x%08x",
                      l, name, site(file, line).c_str(), m, k,
                      w.op[k] == Op(0) ? "__syncwarp" : op_name(w.op[k]), site(w.file[k], w.line[k]).c_str(),
                      w.mask[k]);
        bad(buf);
      }
    }
    complete_locked(b, w, m);
    check_abort(b);
    return;
  }
  wait_locked(b, lk, t, name, file, line, [&] { return w.release[l] != my; });
  check_abort(b);
}

}  // namespace

// ---- the API kernels call ------------------------------------------------------------------------
void syncthreads(const char* file, int line) {
  Thread* t = t_cur;
  Block& b = *t->block;
  const unsigned g = t->nbar++;
  hb_release(&b.hb_bar[g & 1]);
  {
    Quiet q;
    std::unique_lock<std::mutex> lk(b.mu);
    check_abort(b);
    if (b.bar_count == 0) {
      b.bar_file = file;
      b.bar_line = line;
      b.bar_first = t->linear;
    } else if (std::strcmp(b.bar_file, file) != 0 || b.bar_line != line) {
      fail_locked(b, "__syncthreads divergence: thread " + std::to_string(b.bar_first) + " waits at " +
                         site(b.bar_file, b.bar_line) + ", thread " + std::to_string(t->linear) +
                         " arrives at " + site(file, line));
      throw Abort{};
    }
    ++b.bar_count;
    if (b.bar_count == b.live) {
      g_barriers.fetch_add(1, std::memory_order_relaxed);
      b.blocked -= b.bar_count - 1;
      b.bar_count = 0;
      ++b.bar_gen;
      if (kRace) b.cv.notify_all();
    } else {
      wait_locked(b, lk, t, "__syncthreads", file, line, [&] { return b.bar_gen != g; });
    }
    check_abort(b);
  }
  hb_acquire(&b.hb_bar[g & 1]);
}

void syncwarp(const char* file, int line, unsigned mask) {
  Thread* t = t_cur;
  Block& b = *t->block;
  Warp& w = b.warps[t->linear >> 5];
  const int l = t->linear & 31;
  hb_release(&w.hb[l][t->nwarp & 1u]);
  unsigned pb = 0;
  {
    Quiet q;
    std::unique_lock<std::mutex> lk(b.mu);
    check_abort(b);
    warp_arrive(b, lk, t, Op(0), "__syncwarp", file, line, mask, 0, 0, 32);
    pb = w.parbits[l];
  }
  ++t->nwarp;
  for (int k = 0; k < 32; ++k)
    if ((mask >> k) & 1u) hb_acquire(&w.hb[k][(pb >> k) & 1u]);
}

uint64_t warp_op(const char* file, int line, Op op, unsigned mask, uint64_t value, int arg, int width) {
  Thread* t = t_cur;
  Block& b = *t->block;
  Quiet q;
  std::unique_lock<std::mutex> lk(b.mu);
  check_abort(b);
  warp_arrive(b, lk, t, op, op_name(op), file, line, mask, value, arg, width);
  return b.warps[t->linear >> 5].out[t->linear & 31];
}

void warp_mma(const char* file, int line, const float* a, const float* bb, const float* c, float* d) {
  Thread* t = t_cur;
  Block& b = *t->block;
  float res[8];
  {
    Quiet q;
    std::unique_lock<std::mutex> lk(b.mu);
    check_abort(b);
    Warp& w = b.warps[t->linear >> 5];
    const int l = t->linear & 31;
    if (l == 0) g_mmas.fetch_add(1, std::memory_order_relaxed);
    for (int i = 0; i < 8; ++i) {
      w.mma_in[l][i] = a[i];
      w.mma_in[l][8 + i] = bb[i];
      w.mma_in[l][16 + i] = c[i];
    }
    warp_arrive(b, lk, t, Op::kMma, "wmma::mma_sync", file, line, 0xffffffffu, 0, 0, 32);
    std::memcpy(res, w.mma_out[l], sizeof(res));
  }
  std::memcpy(d, res, sizeof(res));
}

void trap(const char* file, int line) {
  Thread* t = t_cur;
  Block& b = *t->block;
  {
    Quiet q;
    std::unique_lock<std::mutex> lk(b.mu);
    fail_locked(b, "__trap() at " + site(file, line) + " by " + thread_str(t));
  }
  throw Abort{};
}

unsigned char* dynamic_smem() { return t_cur->block->dyn; }

namespace {
[[noreturn]] void async_fail(const char* file, int line, const std::string& what) {
  Thread* t = t_cur;
  Block& b = *t->block;
  {
    Quiet q;
    std::unique_lock<std::mutex> lk(b.mu);
    fail_locked(b, "cp.async at " + site(file, line) + " by " + thread_str(t) + ": " + what);
  }
  throw Abort{};
}

bool in_shared(const Block& b, const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (b.dyn != nullptr && c >= b.dyn && c + n <= b.dyn + b.dyn_bytes) return true;
  for (const auto& r : g_static_smem)
    if (c >= r.first && c + n <= r.first + r.second) return true;
  return false;
}
}  // namespace

// __pipeline_memcpy_async(dst, src, bytes, zfill): 4, 8 or 16 bytes, both sides aligned to the size,
// dst in shared memory; the last zfill bytes are zero-filled instead of read.
void async_copy(const char* file, int line, void* dst, const void* src, size_t bytes, size_t zfill) {
  Thread* t = t_cur;
  if (bytes != 4 && bytes != 8 && bytes != 16)
    async_fail(file, line, "size " + std::to_string(bytes) + " (must be 4, 8 or 16)");
  if (zfill > bytes) async_fail(file, line, "zero-fill larger than the copy");
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0)
    async_fail(file, line, "source or destination not aligned to the " + std::to_string(bytes) + "-byte copy");
  if (!in_shared(*t->block, dst, bytes)) async_fail(file, line, "destination outside shared memory");
  // From the issue on, the destination is undefined until the wait: poison it now with a store of
  // this thread, so a copy issued while another thread still reads the buffer is a race (race mode)
  // and a read before the wait sees NaN (the data itself lands at the wait, the latest it can).
  std::memset(dst, 0xff, bytes);
  t->async.push_back(Thread::AsyncCopy{dst, src, bytes, zfill, t->committed});
  g_async_copies.fetch_add(1, std::memory_order_relaxed);
}

void async_commit() { ++t_cur->committed; }

// Performs (in issue order) this thread's copies of every committed group but the newest `prior`.
void async_wait_prior(size_t prior) {
  Thread* t = t_cur;
  const uint64_t limit = t->committed >= prior ? t->committed - prior : 0;  // groups < limit complete
  size_t keep = 0;
  for (size_t i = 0; i < t->async.size(); ++i) {
    Thread::AsyncCopy& c = t->async[i];
    if (c.group < limit) {
      std::memcpy(c.dst, c.src, c.bytes - c.zfill);
      std::memset(static_cast<unsigned char*>(c.dst) + (c.bytes - c.zfill), 0, c.zfill);
    } else {
      t->async[keep++] = c;
    }
  }
  t->async.resize(keep);
}

namespace {

void thread_exit(Block& b, Thread* t) {
  Quiet q;
  std::unique_lock<std::mutex> lk(b.mu);
  Warp& w = b.warps[t->linear >> 5];
  const unsigned me = 1u << (t->linear & 31);
  w.exited |= me;
  --b.live;
  if (!b.abort) {
    for (int k = 0; k < 32; ++k) {
      if (((w.arrived >> k) & 1u) && (w.mask[k] & me)) {
        fail_locked(b, thread_str(t) + " exited while lane " + std::to_string(k) + " waits for it in " +
                           (w.op[k] == Op(0) ? "__syncwarp" : op_name(w.op[k])) + " at " +
                           site(w.file[k], w.line[k]));
        return;
      }
    }
    if (b.bar_count > 0 && b.bar_count == b.live) {  // the exited thread no longer counts
      b.blocked -= b.bar_count;
      b.bar_count = 0;
      ++b.bar_gen;
      if (kRace) b.cv.notify_all();
    } else if (b.live > 0 && b.blocked >= b.live) {
      fail_locked(b, "deadlock: every remaining thread waits after " + thread_str(t) + " exited");
    }
  }
}

void run_thread(Thread* t, const Body& body) {
  Block& b = *t->block;
  try {
    body();
    if (!t->async.empty()) {  // on a GPU the data may land after the kernel's last read of it
      Quiet q;
      std::unique_lock<std::mutex> lk(b.mu);
      fail_locked(b, thread_str(t) + " exited with " + std::to_string(t->async.size()) +
                         " cp.async copies never waited for");
    }
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    Quiet q;
    std::unique_lock<std::mutex> lk(b.mu);
    fail_locked(b, thread_str(t) + " threw: " + e.what());
  }
  thread_exit(b, t);
}

bool run_block(const std::string& name, dim3 grid, dim3 bdim, uint3 bid, size_t smem, const Body& body) {
  const int n = int(bdim.x * bdim.y * bdim.z);
  Block b;
  b.n = b.live = n;
  b.where = name + " block (" + std::to_string(bid.x) + "," + std::to_string(bid.y) + "," +
            std::to_string(bid.z) + ")";
  b.warps.resize((n + 31) / 32);
  for (int w = 0; w < int(b.warps.size()); ++w) {
    const int lanes = std::min(32, n - 32 * w);
    b.warps[w].present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    b.warps[w].exited = ~b.warps[w].present;
  }
  // Shared memory starts as garbage on a GPU: poison it (0xff bytes: NaN in every float format).
  for (auto& r : g_static_smem) std::memset(r.first, 0xff, r.second);
  std::unique_ptr<unsigned char, void (*)(void*)> dyn(nullptr, std::free);
  if (smem > 0) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, smem + kCanary) != 0) {
      log_error("upreid emu: cannot allocate " + std::to_string(smem) + " bytes of dynamic shared memory");
      return false;
    }
    dyn.reset(static_cast<unsigned char*>(p));
    std::memset(dyn.get(), 0xff, smem);
    std::memset(dyn.get() + smem, 0xa5, kCanary);
    b.dyn = dyn.get();
    b.dyn_bytes = smem;
  }
  std::vector<Thread> threads(n);
  b.threads = &threads;
  for (int i = 0; i < n; ++i) {
    Thread& t = threads[i];
    t.tid = uint3{unsigned(i) % bdim.x, (unsigned(i) / bdim.x) % bdim.y, unsigned(i) / (bdim.x * bdim.y)};
    t.bid = bid;
    t.bdim = bdim;
    t.gdim = grid;
    t.linear = i;
    t.block = &b;
  }
  if (kRace) {
    std::vector<std::thread> os;
    os.reserve(n);
    for (int i = 0; i < n; ++i)
      os.emplace_back([&, i] {
        t_cur = &threads[i];
        run_thread(&threads[i], body);
        t_cur = nullptr;
      });
    for (auto& th : os) th.join();
  } else {
    std::vector<Fiber*> fibers(n);
    for (int i = 0; i < n; ++i) {
      fibers[i] = fiber_get(size_t(i));
      fibers[i]->th = &threads[i];
      fibers[i]->body = &body;
      fibers[i]->done = false;
    }
    int remaining = n;
    while (remaining > 0) {
      remaining = 0;
      for (int i = 0; i < n; ++i) {
        if (fibers[i]->done) continue;
        fiber_resume(fibers[i]);
        if (!fibers[i]->done) ++remaining;
      }
    }
  }
  if (!b.abort && smem > 0) {
    for (size_t i = 0; i < kCanary; ++i)
      if (dyn.get()[smem + i] != 0xa5) {
        log_error("upreid emu: " + b.where + ": wrote past the end of its " + std::to_string(smem) +
                  " bytes of dynamic shared memory");
        return false;
      }
  }
  return !b.abort;
}

}  // namespace

void run_launch(const void* kernel, dim3 grid, dim3 block, size_t smem, const Body& body) {
  const std::string name = kernel_name(kernel);
  {
    std::lock_guard<std::mutex> g(g_log_mu);
    g_launches += name + " grid=" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                  std::to_string(grid.z) + " block=" + std::to_string(block.x) + "," +
                  std::to_string(block.y) + "," + std::to_string(block.z) + " smem=" + std::to_string(smem) +
                  "\n";
  }
  auto bad = [&](cudaError_t e, const std::string& why) {
    log_error("upreid emu: launch of " + name + ": " + why);
    g_last = e;
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    return bad(cudaErrorInvalidConfiguration, "empty grid or block");
  if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    return bad(cudaErrorInvalidConfiguration,
               "block of " + std::to_string(threads) + " threads exceeds the device limit (1024; z <= 64)");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return bad(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
                                                  "," + std::to_string(grid.z) +
                                                  ") exceeds the device limit (y, z <= 65535)");
  if (smem > 48 * 1024) {
    auto it = g_max_dyn.find(kernel);
    const int allowed = it == g_max_dyn.end() ? 48 * 1024 : it->second;
    if (smem > size_t(allowed))
      return bad(cudaErrorInvalidValue, std::to_string(smem) +
                                            " bytes of dynamic shared memory need cudaFuncSetAttribute("
                                            "cudaFuncAttributeMaxDynamicSharedMemorySize) first (allowed: " +
                                            std::to_string(allowed) + ")");
  }
  if (smem > size_t(g_cfg.smem_optin))
    return bad(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory exceed the device's " +
                                          std::to_string(g_cfg.smem_optin));
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x)
        if (!run_block(name, grid, block, uint3{x, y, z}, smem, body)) {
          g_last = cudaErrorLaunchFailure;
          return;
        }
}

cudaError_t func_set_attribute(const void* kernel, int attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > g_cfg.smem_optin) return cudaErrorInvalidValue;
    g_max_dyn[kernel] = value;
  }
  return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes* a, const void* kernel) {
  std::memset(a, 0, sizeof(*a));
  a->maxThreadsPerBlock = 1024;
  a->ptxVersion = g_cfg.binary_arch;
  a->binaryVersion = g_cfg.binary_arch;
  auto it = g_max_dyn.find(kernel);
  a->maxDynamicSharedSizeBytes = it == g_max_dyn.end() ? 48 * 1024 : it->second;
  return cudaSuccess;
}

cudaError_t occupancy(int* blocks, const void*, int block_size, size_t smem) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  int n = std::min(g_cfg.max_blocks_sm, g_cfg.max_threads_sm / block_size);
  if (smem > 0) n = std::min<int>(n, int(size_t(g_cfg.smem_per_sm) / (smem + 1024)));
  *blocks = std::max(n, 0);
  return cudaSuccess;
}

}  // namespace upreid_emu

// ---- runtime API ---------------------------------------------------------------------------------
using upreid_emu::g_cfg;
using upreid_emu::g_last;

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
    default: return "cudaError";
  }
}
const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last; }
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = g_cfg.sms; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = g_cfg.max_threads_sm; break;
    case cudaDevAttrComputeCapabilityMajor: *v = g_cfg.major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = g_cfg.minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = g_cfg.smem_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = g_cfg.smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// ---- control from the test harness (C ABI) -------------------------------------------------------
extern "C" {

// The emulated device: compute capability, SM count, opt-in shared memory per block, and the
// architecture the "binary" was built for (cudaFuncGetAttributes).
void emu_configure(int major, int minor, int sms, int smem_optin, int binary_arch) {
  g_cfg.major = major;
  g_cfg.minor = minor;
  g_cfg.sms = sms;
  g_cfg.smem_optin = smem_optin;
  g_cfg.smem_per_sm = smem_optin + 1024;
  g_cfg.binary_arch = binary_arch;
  upreid_emu::g_max_dyn.clear();
}

// Offsets (from the library's load address) and sizes of the static __shared__ variables.
void emu_register_static_smem(const uint64_t* offsets, const uint64_t* sizes, int n) {
  Dl_info info;
  dladdr(reinterpret_cast<void*>(&emu_register_static_smem), &info);
  unsigned char* base = static_cast<unsigned char*>(info.dli_fbase);
  upreid_emu::g_static_smem.clear();
  for (int i = 0; i < n; ++i) upreid_emu::g_static_smem.emplace_back(base + offsets[i], size_t(sizes[i]));
}

// Copies the error log (or the launch log) into buf, returns its full length; clear empties both.
size_t emu_error_log(char* buf, size_t cap) {
  std::lock_guard<std::mutex> g(upreid_emu::g_log_mu);
  const std::string& s = upreid_emu::g_log;
  if (cap > 0) {
    const size_t n = std::min(cap - 1, s.size());
    std::memcpy(buf, s.data(), n);
    buf[n] = 0;
  }
  return s.size();
}
size_t emu_launch_log(char* buf, size_t cap) {
  std::lock_guard<std::mutex> g(upreid_emu::g_log_mu);
  const std::string& s = upreid_emu::g_launches;
  if (cap > 0) {
    const size_t n = std::min(cap - 1, s.size());
    std::memcpy(buf, s.data(), n);
    buf[n] = 0;
  }
  return s.size();
}
void emu_clear_log() {
  std::lock_guard<std::mutex> g(upreid_emu::g_log_mu);
  upreid_emu::g_log.clear();
  upreid_emu::g_launches.clear();
  upreid_emu::g_barriers = 0;
  upreid_emu::g_mmas = 0;
  upreid_emu::g_async_copies = 0;
  g_last = cudaSuccess;
}
// Completed block barriers and warp mma_sync calls since the last clear.
int64_t emu_barrier_count() { return upreid_emu::g_barriers.load(); }
int64_t emu_mma_count() { return upreid_emu::g_mmas.load(); }
int64_t emu_async_copy_count() { return upreid_emu::g_async_copies.load(); }
int emu_is_race_build() { return kRace ? 1 : 0; }

// The library's load address (the harness maps launch addresses to symbol names with it).
uint64_t emu_base() {
  Dl_info info;
  dladdr(reinterpret_cast<void*>(&emu_base), &info);
  return reinterpret_cast<uint64_t>(info.dli_fbase);
}

}  // extern "C"
