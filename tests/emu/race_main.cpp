// Race-mode runner: generates the inputs of one case, runs the operator's kernels (forward, then
// backward where there is one) with one OS thread per CUDA thread under ThreadSanitizer, and prints
// the emulator's error log. TSan writes its reports to stderr. Arguments are key=value pairs:
//   common:   cc=9 sms=2 seed=1 prec=0|1|2 (fp32 matmul precision: highest, high, medium)
//             smem=OFFSET:SIZE,... (static __shared__ variables to poison)
//   info_nce: M N K D g t dtype=f32|f16|bf16|f64 train=0|1 need_q=0|1 need_k=0|1
//   bank_kl:  M K D ts tt dtype train=0|1
//   rank:     Q G max_rank ids cams dtype
//   rerank:   N Q D k1 k2 dense=0|1 stage1=0|1 (the neighbour stage alone) dtype=f32|f64
//   selftest: case threads (the kernels of selftest/selftest_kernel.cu)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

extern "C" {
void emu_configure(int major, int minor, int sms, int smem_optin, int binary_arch);
void emu_register_static_smem(const uint64_t* offsets, const uint64_t* sizes, int n);
size_t emu_error_log(char* buf, size_t cap);
void emu_set_fp32_precision(int v);
int emu_info_nce(int, int, const void*, const void*, const int64_t*, const void*, int64_t, int64_t, int64_t,
                 int64_t, int64_t, double, void*, void*, void*, const void*, const void*, const void*,
                 const void*, void*, void*, int, int);
int emu_bank_kl(int, int, const void*, const void*, const void*, int64_t, int64_t, int64_t, double, double,
                void*, void*, void*, const void*, const void*, const void*, const void*, void*);
int emu_bank_kl_train(int, const void*, const void*, const void*, int64_t, int64_t, int64_t, double, double,
                      void*, void*, void*, void*, void*);
int emu_rank_metrics(int, const void*, int64_t, int64_t, int64_t, const int64_t*, const int64_t*,
                     const int64_t*, const int64_t*, float*, float*, float*, bool*, int64_t*);
int emu_selftest(int, unsigned, unsigned, unsigned, size_t, int, void*, const void*, const void*, const void*);
int emu_rerank(int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, const void*,
               const void*, const void*, const void*, float*, int64_t*);
int emu_rerank_neighbors(int, int64_t, int64_t, int64_t, int64_t, const void*, const void*, const void*,
                         const void*, float*, int32_t*, void*, void*);
}

namespace {

std::map<std::string, std::string> g_args;
std::mt19937_64 g_rng(1);

double num(const char* k, double dflt) {
  auto it = g_args.find(k);
  return it == g_args.end() ? dflt : std::atof(it->second.c_str());
}
int64_t inum(const char* k, int64_t dflt) { return int64_t(num(k, double(dflt))); }
std::string str(const char* k, const char* dflt) {
  auto it = g_args.find(k);
  return it == g_args.end() ? dflt : it->second;
}
int dtype_code(const std::string& s) { return s == "f16" ? 1 : s == "bf16" ? 2 : s == "f64" ? 3 : 0; }
size_t dtype_size(int dt) { return dt == 3 ? 8 : dt == 0 ? 4 : 2; }
size_t acc_size(int dt) { return dt == 3 ? 8 : 4; }

// n rows of d unit-norm gaussian features in dtype dt
std::vector<unsigned char> feats(int64_t n, int64_t d, int dt) {
  std::normal_distribution<double> g;
  std::vector<unsigned char> out(size_t(n * d) * dtype_size(dt) + 16);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> row(static_cast<size_t>(d));
    double s = 0;
    for (auto& v : row) s += (v = g(g_rng)) * v;
    s = s > 0 ? std::sqrt(s) : 1;
    for (int64_t j = 0; j < d; ++j) {
      const double v = row[size_t(j)] / s;
      unsigned char* p = out.data() + size_t(i * d + j) * dtype_size(dt);
      if (dt == 0) {
        const float f = float(v);
        std::memcpy(p, &f, 4);
      } else if (dt == 3) {
        std::memcpy(p, &v, 8);
      } else if (dt == 1) {
        const __half h = __float2half_rn(float(v));
        std::memcpy(p, &h, 2);
      } else {
        const __nv_bfloat16 h = __float2bfloat16_rn(float(v));
        std::memcpy(p, &h, 2);
      }
    }
  }
  return out;
}
std::vector<unsigned char> acc_vec(int64_t n, int dt, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<unsigned char> out(size_t(n) * acc_size(dt) + 8);
  for (int64_t i = 0; i < n; ++i) {
    const double v = u(g_rng);
    if (dt == 3) {
      std::memcpy(out.data() + 8 * i, &v, 8);
    } else {
      const float f = float(v);
      std::memcpy(out.data() + 4 * i, &f, 4);
    }
  }
  return out;
}

int run_info_nce() {
  const int dt = dtype_code(str("dtype", "f32"));
  const int64_t M = inum("M", 8), N = inum("N", 8), K = inum("K", 40), D = inum("D", 20), g = inum("g", 0);
  const double t = num("t", 0.1);
  const bool train = inum("train", 0) != 0;
  const int need_q = int(inum("need_q", 1)), need_k = int(inum("need_k", 1));
  auto q = feats(M, D, dt), k = feats(N, D, dt), b = feats(K, D, dt);
  std::vector<int64_t> pos(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) pos[size_t(i)] = int64_t(g_rng() % uint64_t(N));
  const size_t as = acc_size(dt);
  std::vector<unsigned char> loss(size_t(M) * as), lse(size_t(M) * as), bm(size_t(M * D) * as + 8);
  int e = emu_info_nce(train ? 1 : 0, dt, q.data(), k.data(), pos.data(), b.data(), M, N, K, D, g, t, loss.data(),
                       lse.data(), train ? bm.data() : nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                       nullptr, 1, 1);
  if (e != 0) return e;
  auto gl = acc_vec(M, dt, -1, 1), gls = acc_vec(M, dt, -1, 1);
  std::vector<unsigned char> gq(size_t(M * D) * as + 8), gk(size_t(N * D) * as + 8, 0);
  return emu_info_nce(train ? 3 : 2, dt, q.data(), k.data(), pos.data(), b.data(), M, N, K, D, g, t, nullptr,
                      nullptr, nullptr, gl.data(), gls.data(), lse.data(), train ? bm.data() : nullptr,
                      need_q ? gq.data() : nullptr, need_k ? gk.data() : nullptr, need_q, need_k);
}

int run_bank_kl() {
  const int dt = dtype_code(str("dtype", "f32"));
  const int64_t M = inum("M", 8), K = inum("K", 40), D = inum("D", 20);
  const double ts = num("ts", 0.1), tt = num("tt", 0.05);
  auto s = feats(M, D, dt), te = feats(M, D, dt), b = feats(K, D, dt);
  const size_t as = acc_size(dt);
  std::vector<unsigned char> kl(size_t(M) * as), ls(size_t(M) * as), lt(size_t(M) * as);
  if (inum("train", 0) != 0) {  // the training forward (its backward is elementwise ATen)
    std::vector<unsigned char> ms(size_t(M * D) * as + 8), mt(size_t(M * D) * as + 8);
    return emu_bank_kl_train(dt, s.data(), te.data(), b.data(), M, K, D, ts, tt, kl.data(), ls.data(), lt.data(),
                             ms.data(), mt.data());
  }
  int e = emu_bank_kl(0, dt, s.data(), te.data(), b.data(), M, K, D, ts, tt, kl.data(), ls.data(), lt.data(),
                      nullptr, nullptr, nullptr, nullptr, nullptr);
  if (e != 0) return e;
  auto gkl = acc_vec(M, dt, -1, 1), gls = acc_vec(M, dt, -1, 1);
  std::vector<unsigned char> gs(size_t(M * D) * as + 8);
  return emu_bank_kl(1, dt, s.data(), te.data(), b.data(), M, K, D, ts, tt, nullptr, nullptr, nullptr, gkl.data(),
                     gls.data(), ls.data(), lt.data(), gs.data());
}

int run_rank() {
  const int dt = dtype_code(str("dtype", "f32"));
  const int64_t Q = inum("Q", 6), G = inum("G", 50), R = inum("max_rank", 10), ids = inum("ids", 5),
                cams = inum("cams", 3);
  std::vector<unsigned char> dist(size_t(Q * G) * dtype_size(dt) + 8);
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t i = 0; i < Q * G; ++i) {
    const double v = std::round(u(g_rng) * 64) / 64;  // ties on purpose
    unsigned char* p = dist.data() + size_t(i) * dtype_size(dt);
    if (dt == 0) {
      const float f = float(v);
      std::memcpy(p, &f, 4);
    } else if (dt == 3) {
      std::memcpy(p, &v, 8);
    } else if (dt == 1) {
      const __half h = __float2half_rn(float(v));
      std::memcpy(p, &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(float(v));
      std::memcpy(p, &h, 2);
    }
  }
  std::vector<int64_t> qp(static_cast<size_t>(Q)), gp(static_cast<size_t>(G)), qc(static_cast<size_t>(Q)), gc(static_cast<size_t>(G));
  for (auto& v : qp) v = int64_t(g_rng() % uint64_t(ids));
  for (auto& v : gp) v = int64_t(g_rng() % uint64_t(ids));
  for (auto& v : qc) v = int64_t(g_rng() % uint64_t(cams));
  for (auto& v : gc) v = int64_t(g_rng() % uint64_t(cams));
  std::vector<float> cmc(static_cast<size_t>(R)), ap(size_t(Q) + 1), inp(size_t(Q) + 1);
  std::vector<unsigned char> valid(size_t(Q) + 1);
  int64_t scratch = 0;
  return emu_rank_metrics(dt, dist.data(), Q, G, R, qp.data(), gp.data(), qc.data(), gc.data(), cmc.data(),
                          ap.data(), inp.data(), reinterpret_cast<bool*>(valid.data()), &scratch);
}

int64_t half_k(int64_t k1) {  // as rerank.h's rerank_half_k
  const int64_t h = k1 / 2;
  const bool half = (k1 % 2) != 0;
  return (half && (h % 2 != 0) ? h + 1 : h) + 1;
}

int run_rerank() {
  const int dt = str("dtype", "f32") == "f64" ? 3 : 0;
  const int64_t N = inum("N", 40), Q = inum("Q", 8), D = inum("D", 16), k1 = inum("k1", 6), k2 = inum("k2", 3);
  const bool dense = inum("dense", 0) != 0;
  const int64_t G = N - Q;
  auto x = feats(N, D, dt);
  std::vector<float> out(size_t(Q * G) + 1);
  int64_t scratch = 0;
  const int64_t K = std::min(k1 + 1, N), hk = std::min(half_k(k1), N), kq = std::min(k2, N);
  if (!dense && inum("stage1", 0) != 0) {  // the distance and neighbour stage alone
    std::vector<int32_t> nbr(size_t(N * K));
    std::vector<unsigned char> nd2(size_t(N * K) * dtype_size(dt)), rmax(size_t(N) * dtype_size(dt));
    return emu_rerank_neighbors(dt, N, Q, D, K, x.data(), nullptr, nullptr, nullptr, out.data(), nbr.data(),
                                nd2.data(), rmax.data());
  }
  if (!dense)
    return emu_rerank(dt, N, Q, D, K, hk, kq, k2, 0.3, x.data(), nullptr, nullptr, nullptr, out.data(), &scratch);
  // dense inputs: squared distances of the same features
  const size_t ts = dtype_size(dt);
  auto at = [&](int64_t i, int64_t d) {
    const unsigned char* p = x.data() + size_t(i * D + d) * ts;
    if (dt == 3) {
      double v;
      std::memcpy(&v, p, 8);
      return v;
    }
    float v;
    std::memcpy(&v, p, 4);
    return double(v);
  };
  auto d2 = [&](int64_t i, int64_t j) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += (at(i, d) - at(j, d)) * (at(i, d) - at(j, d));
    return s;
  };
  auto mat = [&](int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    std::vector<unsigned char> m(size_t(nr * nc) * ts + 8);
    for (int64_t i = 0; i < nr; ++i)
      for (int64_t j = 0; j < nc; ++j) {
        const double v = d2(r0 + i, c0 + j);
        if (dt == 3) {
          std::memcpy(m.data() + size_t(i * nc + j) * 8, &v, 8);
        } else {
          const float f = float(v);
          std::memcpy(m.data() + size_t(i * nc + j) * 4, &f, 4);
        }
      }
    return m;
  };
  auto qg = mat(0, Q, Q, G), qq = mat(0, Q, 0, Q), gg = mat(Q, G, Q, G);
  return emu_rerank(dt, N, Q, 0, K, hk, kq, k2, 0.3, nullptr, qg.data(), qq.data(), gg.data(), out.data(),
                    &scratch);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    const size_t eq = a.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "race_main: expected key=value, got %s\n", argv[i]);
      return 2;
    }
    g_args[a.substr(0, eq)] = a.substr(eq + 1);
  }
  g_rng.seed(uint64_t(inum("seed", 1)));
  const int cc = int(inum("cc", 9));
  emu_configure(cc, 0, int(inum("sms", 2)), int(inum("smem_optin", 232448)), cc * 10);
#if !defined(UPREID_EMU_OP_SELFTEST)
  // fp32 matmul precision: 0 highest, 1 high, 2 medium (what the glue reads from torch)
  emu_set_fp32_precision(int(inum("prec", 0)));
#endif
  // static __shared__ variables to poison: smem=offset:size,... (from the harness, which reads nm)
  std::vector<uint64_t> offs, sizes;
  const std::string sm = str("smem", "");
  for (size_t at = 0; at < sm.size();) {
    size_t end = sm.find(',', at);
    if (end == std::string::npos) end = sm.size();
    const std::string item = sm.substr(at, end - at);
    const size_t colon = item.find(':');
    offs.push_back(std::strtoull(item.c_str(), nullptr, 0));
    sizes.push_back(std::strtoull(item.c_str() + colon + 1, nullptr, 0));
    at = end + 1;
  }
  emu_register_static_smem(offs.data(), sizes.data(), int(offs.size()));
#if defined(UPREID_EMU_OP_INFO_NCE)
  const int rc = run_info_nce();
#elif defined(UPREID_EMU_OP_BANK_KL)
  const int rc = run_bank_kl();
#elif defined(UPREID_EMU_OP_RANK)
  const int rc = run_rank();
#elif defined(UPREID_EMU_OP_SELFTEST)
  std::vector<float> out(4096);
  const int rc = emu_selftest(int(inum("case", 0)), 1, 1, unsigned(inum("threads", 64)), 0, 0, out.data(), nullptr,
                              nullptr, nullptr);
#else
  const int rc = run_rerank();
#endif
  std::vector<char> log(1 << 16);
  emu_error_log(log.data(), log.size());
  std::printf("status=%d\n%s", rc, log.data());
  return 0;
}
