// Argument checks shared by every operator: each message names the operator, the argument, what was
// expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>
#include <string>

namespace upreid {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": argument '", name, "' is undefined");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  check_defined(t, op, name);
  TORCH_CHECK(t.dim() == dim, op, ": '", name, "' must be ", dim, "-D ", layout, ", got shape ",
              shape_str(t));
}

inline bool is_feature_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

inline void check_feature_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_feature_dtype(t.scalar_type()), op, ": '", name,
              "' must be a floating tensor (float32, float16, bfloat16 or float64), got ",
              t.scalar_type());
}

inline void check_index_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": '", name, "' must be int64, got ",
              t.scalar_type());
}

// Same dtype and device as the reference argument.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name, const char* op, bool same_dtype = true) {
  TORCH_CHECK(t.device() == ref.device(), op, ": '", name, "' is on ", t.device(), " but '",
              ref_name, "' is on ", ref.device(), "; all tensors must be on one device");
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": '", name, "' has dtype ",
                t.scalar_type(), " but '", ref_name, "' has dtype ", ref.scalar_type(),
                "; feature tensors must share one dtype");
  }
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                       const char* what, const char* op) {
  TORCH_CHECK(t.size(dim) == expected, op, ": '", name, "' has ", t.size(dim), " ", what,
              " (shape ", shape_str(t), ") but ", expected, " were expected");
}

inline void check_positive_finite(double v, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(v) && v > 0.0, op, ": '", name,
              "' must be a finite number > 0, got ", v);
}

// Range check of an index tensor. On the CPU the offending range is reported. On CUDA the check
// runs on the device (at::_assert_async: no host synchronisation, so a training step stays
// capturable in a CUDA graph); a bad index is a device-side assertion with this message.
inline void check_index_range(const at::Tensor& idx, int64_t upper, const char* op,
                              const char* name, const char* upper_name) {
  if (idx.numel() == 0) return;
  if (idx.is_cuda()) {
    std::ostringstream msg;
    msg << op << ": '" << name << "' must index rows of " << upper_name << " in [0, " << upper
        << ")";
    at::_assert_async(at::logical_and(idx.ge(0), idx.lt(upper)).all(), msg.str());
    return;
  }
  auto mm = at::aminmax(idx);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < upper, op, ": '", name, "' must index rows of ", upper_name,
              " in [0, ", upper, "), got values in [", lo, ", ", hi, "]");
}

// A vector argument of a backward op: 1-D with `n` entries, on the device of `ref`.
inline void check_vector(const at::Tensor& t, int64_t n, const char* name, const at::Tensor& ref,
                         const char* ref_name, const char* op) {
  check_dim(t, 1, op, name, "[M]");
  check_size(t, 0, n, name, "entries", op);
  check_like(t, name, ref, ref_name, op, /*same_dtype=*/false);
}

// Accumulation type of a feature dtype: fp32 for every dtype but fp64.
inline at::ScalarType acc_dtype(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace upreid

namespace upreid {

// NaN/Inf check of a whole tensor (one pass; the temporary is numel bytes of bool).
inline void check_all_finite(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), op, ": '", name,
              "' contains NaN or Inf; every value must be finite");
}

// Integer label tensor (pids, camera ids) of `n` entries, returned as contiguous int64.
inline at::Tensor check_labels(const at::Tensor& t, int64_t n, const char* op, const char* name,
                               const char* n_name) {
  check_dim(t, 1, op, name, "[n]");
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                  t.scalar_type() != at::kBool,
              op, ": '", name, "' must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == n, op, ": '", name, "' has ", t.size(0), " entries but ", n_name,
              " has ", n, "; the lengths must match");
  return t.to(at::kLong).contiguous();
}

}  // namespace upreid
