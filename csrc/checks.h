// Input validation for the native kernels. The messages are identical, character for
// character, to grass_index/ops/checks.py, and raise the same Python exception type
// (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK -> RuntimeError as torch._check does), so
// an error reads the same with or without the native build.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace grass_index {

// Python's spelling of a dtype ("torch.float32"), as the Python checks print it.
inline std::string py_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    case c10::ScalarType::ComplexFloat: return "torch.complex64";
    case c10::ScalarType::ComplexDouble: return "torch.complex128";
    case c10::ScalarType::ComplexHalf: return "torch.complex32";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Python's spelling of a shape tuple: (), (3,), (2, 3).
inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) os << ", ";
    os << s[i];
  }
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Half ||
         t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Double;
}

inline bool is_sign_dtype(c10::ScalarType t) {
  return is_float_dtype(t) || t == c10::ScalarType::Char || t == c10::ScalarType::Short ||
         t == c10::ScalarType::Int || t == c10::ScalarType::Long;
}

inline void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(is_float_dtype(x.scalar_type()), "grass_index.", op, ": x has dtype ",
                    py_dtype(x.scalar_type()),
                    "; expected float32, float16, bfloat16 or float64. Cast the input with x.float().");
  TORCH_CHECK_VALUE(x.dim() >= 1, "grass_index.", op,
                    ": x must have at least one dimension (the feature dim), got a scalar.");
}

inline void check_index(const char* op, const at::Tensor& idx) {
  TORCH_CHECK_VALUE(idx.scalar_type() == c10::ScalarType::Long, "grass_index.", op, ": idx has dtype ",
                    py_dtype(idx.scalar_type()), "; expected int64 (torch.long). Use idx.long().");
}

inline void check_sjlt_meta(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& sign, int64_t k) {
  check_x("sjlt", x);
  check_index("sjlt", idx);
  TORCH_CHECK_VALUE(idx.dim() == 1 || idx.dim() == 2, "grass_index.sjlt: idx must be [d] or [s, d], got shape ",
                    py_shape(idx.sizes()), ".");
  TORCH_CHECK_VALUE(is_sign_dtype(sign.scalar_type()), "grass_index.sjlt: sign has dtype ",
                    py_dtype(sign.scalar_type()), "; expected an integer or float tensor of +-1.");
  TORCH_CHECK_VALUE(sign.sizes() == idx.sizes(), "grass_index.sjlt: sign shape ", py_shape(sign.sizes()),
                    " must equal idx shape ", py_shape(idx.sizes()), ".");
  TORCH_CHECK(x.size(-1) == idx.size(-1), "grass_index.sjlt: x has ", x.size(-1), " features but idx has ",
              idx.size(-1), " columns; they must match (idx maps each input coordinate to an output bucket).");
  TORCH_CHECK(k >= 1, "grass_index.sjlt: k must be >= 1, got ", k, ".");
  TORCH_CHECK_VALUE(idx.device() == x.device() && sign.device() == x.device(), "grass_index.sjlt: x (",
                    x.device().str(), "), idx (", idx.device().str(), ") and sign (", sign.device().str(),
                    ") must be on the same device.");
}

inline void fail_idx_range(int64_t k, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(false, "grass_index.sjlt: idx values must lie in [0, k=", k, "), found range [", lo, ", ",
                    hi, "].");
}

inline void fail_sign_values() {
  TORCH_CHECK_VALUE(false, "grass_index.sjlt: sign entries must be +1 or -1.");
}

inline void check_mask_meta(const at::Tensor& x, const at::Tensor& idx) {
  check_x("mask", x);
  check_index("mask", idx);
  TORCH_CHECK_VALUE(idx.dim() == 1, "grass_index.mask: idx must be 1-D [k'], got shape ", py_shape(idx.sizes()),
                    ".");
  TORCH_CHECK_VALUE(idx.device() == x.device(), "grass_index.mask: x (", x.device().str(), ") and idx (",
                    idx.device().str(), ") must be on the same device.");
}

inline void fail_mask_range(int64_t d, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(false, "grass_index.mask: idx values must lie in [0, d=", d, "), found range [", lo, ", ",
                    hi, "].");
}

}  // namespace grass_index
