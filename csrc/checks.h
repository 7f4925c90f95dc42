// Argument checks for every operator, with one message format:
//   torch_wsl.<op>: expected <arg> <expectation>, got <what was given>
// The fake (meta) kernels run the same checks through the Python mirror
// torch_wsl/ops/_checks.py, which words them identically (a test compares the
// two on every registered bad input), so an error reads the same eager, under
// torch.compile and on every device. Dtypes are written as Python spells them
// (float32, bfloat16, int64), shapes as [2, 3].
#pragma once

#include <string>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace torch_wsl::check {

// torch.float32 -> "float32": the name a Python user knows.
std::string dtype_name(c10::ScalarType t);

// Throws the one message format (a RuntimeError in Python).
[[noreturn]] void fail(std::string_view op, std::string_view arg, const std::string& expectation, const std::string& got);

// The general form: when !ok, "expected <arg> <expectation>, got <got...>". The expectation string is
// built by the caller before the test: on hot paths, test first and call fail() (as checks.cpp does).
template <typename... Got>
void that(bool ok, std::string_view op, std::string_view arg, const std::string& expectation, const Got&... got) {
  if (C10_UNLIKELY(!ok)) fail(op, arg, expectation, c10::str(got...));
}

// float32, float16, bfloat16 or float64.
void floating(std::string_view op, std::string_view arg, const at::Tensor& t);
// int64 or int32 (class indices, positions).
void integer(std::string_view op, std::string_view arg, const at::Tensor& t);
void same_device(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref);
void same_dtype(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref);
void same_shape(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref);
// Device, shape and dtype of ref (in that order).
void like(std::string_view op, std::string_view arg, const at::Tensor& t, std::string_view ref_arg, const at::Tensor& ref);
void dim_at_least(std::string_view op, std::string_view arg, const at::Tensor& t, int64_t dims);
void dim_is(std::string_view op, std::string_view arg, const at::Tensor& t, int64_t dims);

}  // namespace torch_wsl::check
