#include "checks.h"

namespace torch_wsl::check {

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    case c10::kShort: return "int16";
    case c10::kChar: return "int8";
    case c10::kByte: return "uint8";
    case c10::kBool: return "bool";
    case c10::kComplexFloat: return "complex64";
    case c10::kComplexDouble: return "complex128";
    default: return c10::toString(t);  // the rarer ones under c10's own name
  }
}

void fail(std::string_view op, std::string_view arg, const std::string& expectation, const std::string& got) {
  TORCH_CHECK(false, "torch_wsl.", op, ": expected ", arg, " ", expectation, ", got ", got);
}

void floating(std::string_view op, std::string_view arg, const at::Tensor& t) {
  const auto d = t.scalar_type();
  if (C10_UNLIKELY(!(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || d == at::kDouble))) {
    fail(op, arg, "to have a floating dtype (float32, float16, bfloat16 or float64)", dtype_name(d));
  }
}

void integer(std::string_view op, std::string_view arg, const at::Tensor& t) {
  const auto d = t.scalar_type();
  if (C10_UNLIKELY(!(d == at::kLong || d == at::kInt))) {
    fail(op, arg, "to have an integer dtype (int64 or int32)", dtype_name(d));
  }
}

void same_device(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref) {
  // Messages are built only on failure: these run on every operator call.
  if (C10_UNLIKELY(t.device() != ref.device())) {
    fail(op, arg, c10::str("to be on the same device as ", ref_arg, " (", ref.device(), ")"), c10::str(t.device()));
  }
}

void same_dtype(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref) {
  if (C10_UNLIKELY(t.scalar_type() != ref.scalar_type())) {
    fail(op, arg, c10::str("to have the dtype of ", ref_arg, " (", dtype_name(ref.scalar_type()), ")"),
         dtype_name(t.scalar_type()));
  }
}

void same_shape(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref) {
  if (C10_UNLIKELY(t.sizes() != ref.sizes())) {
    fail(op, arg, c10::str("to have the shape of ", ref_arg, " ", ref.sizes()), c10::str(t.sizes()));
  }
}

void like(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref) {
  same_device(op, arg, t, ref_arg, ref);
  same_shape(op, arg, t, ref_arg, ref);
  same_dtype(op, arg, t, ref_arg, ref);
}

void dim_at_least(std::string_view op, std::string_view arg, const at::Tensor& t, int64_t dims) {
  if (C10_UNLIKELY(t.dim() < dims)) fail(op, arg, c10::str("to have at least ", dims, " dimensions"), c10::str("shape ", t.sizes()));
}

void dim_is(std::string_view op, std::string_view arg, const at::Tensor& t, int64_t dims) {
  if (C10_UNLIKELY(t.dim() != dims)) fail(op, arg, c10::str("to have ", dims, " dimensions"), c10::str("shape ", t.sizes()));
}

}  // namespace torch_wsl::check
