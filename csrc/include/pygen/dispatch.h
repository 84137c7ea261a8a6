// Turn run-time flags into template parameters (one instantiation per combination).
#pragma once
#include <type_traits>

namespace pygen {

template <typename F>
inline void with_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace pygen
