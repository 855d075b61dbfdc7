// Input checks of the extension's ops: HF_CHECK(cond, parts...) is TORCH_CHECK with a message assembled here,
// without std::ostream. Integers go through std::to_string, shapes print as "[2, 3]", dtypes and devices by name.
// Why: on the H100 machine of the 2026-11-26 device run, every TORCH_CHECK whose message streamed an integer
// through an ostream inside this extension crashed the process, while string-only messages raised normally
// (docs/RESULTS.md); bad input must give an error, never a segfault, whatever the toolchain.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace haba_fast {
namespace msg {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <typename T, std::enable_if_t<std::is_integral<T>::value && !std::is_same<T, bool>::value, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename... Parts>
std::string make(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace msg
}  // namespace haba_fast

// The message is built only when the check fails (TORCH_CHECK evaluates its message lazily).
#define HF_CHECK(cond, ...) TORCH_CHECK(cond, ::haba_fast::msg::make(__VA_ARGS__))
