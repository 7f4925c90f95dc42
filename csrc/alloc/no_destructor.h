// Process-lifetime storage that is never destroyed: allocators must outlive
// every tensor, and tensors may be freed during interpreter shutdown, after
// static destructors would have run.
#pragma once

#include <new>

namespace torch_wsl::alloc {

template <class T>
class NoDestructor {
 public:
  NoDestructor() { new (storage_) T(); }
  T& get() { return *std::launder(reinterpret_cast<T*>(storage_)); }

 private:
  alignas(T) unsigned char storage_[sizeof(T)];
};

}  // namespace torch_wsl::alloc
