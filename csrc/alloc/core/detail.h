// Allocation-free building blocks of the allocator's hot path: an
// open-addressing pointer map, an object pool, and the size-bin index.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace torch_wsl::alloc::detail {

// uintptr_t -> T* with linear probing and backward-shift deletion (no
// tombstones). Grows at half load; in a steady state it never allocates.
template <class T>
class FlatPtrMap {
 public:
  FlatPtrMap() { rehash(64); }

  std::size_t size() const { return size_; }

  void insert(std::uintptr_t key, T* value) {
    if (2 * (size_ + 1) > slots_.size()) rehash(2 * slots_.size());
    std::size_t i = slot_of(key);
    while (slots_[i].key != 0) i = (i + 1) & mask_;
    slots_[i] = Slot{key, value};
    ++size_;
  }

  // Key 0 marks an empty slot, so it is never stored: find(0) and erase(0) find nothing.
  T* find(std::uintptr_t key) const {
    if (key == 0) return nullptr;
    for (std::size_t i = slot_of(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return slots_[i].value;
      if (slots_[i].key == 0) return nullptr;
    }
  }

  // Removes `key` and returns its value (nullptr when absent).
  T* erase(std::uintptr_t key) {
    if (key == 0) return nullptr;
    std::size_t i = slot_of(key);
    while (slots_[i].key != key) {
      if (slots_[i].key == 0) return nullptr;
      i = (i + 1) & mask_;
    }
    T* value = slots_[i].value;
    // Backward shift: move later entries of the probe run into the hole.
    std::size_t hole = i;
    for (std::size_t j = (i + 1) & mask_; slots_[j].key != 0; j = (j + 1) & mask_) {
      const std::size_t home = slot_of(slots_[j].key);
      // Entry j may fill the hole if its home is not in (hole, j] cyclically.
      const bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
      if (!stays) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = Slot{};
    --size_;
    return value;
  }

  template <class F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_)
      if (s.key != 0) f(s.key, s.value);
  }

 private:
  struct Slot {
    std::uintptr_t key = 0;
    T* value = nullptr;
  };

  std::size_t slot_of(std::uintptr_t key) const {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }

  void rehash(std::size_t capacity) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    shift_ = 64 - __builtin_ctzll(capacity);
    size_ = 0;
    for (const Slot& s : old)
      if (s.key != 0) insert(s.key, s.value);
  }

  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  int shift_ = 64;
  std::size_t size_ = 0;
};

// Fixed-address objects recycled through a free list; memory is allocated in
// chunks and kept until the pool is destroyed. T needs a `pool_next` member.
template <class T>
class ObjectPool {
 public:
  T* make() {
    if (free_ == nullptr) grow();
    T* t = free_;
    free_ = t->pool_next;
    t->pool_next = nullptr;
    return t;
  }

  void recycle(T* t) {
    t->reset();
    t->pool_next = free_;
    free_ = t;
  }

 private:
  static constexpr std::size_t kChunk = 256;
  void grow() {
    chunks_.push_back(std::make_unique<T[]>(kChunk));
    T* chunk = chunks_.back().get();
    for (std::size_t i = 0; i < kChunk; ++i) {
      chunk[i].pool_next = free_;
      free_ = &chunk[i];
    }
  }
  std::vector<std::unique_ptr<T[]>> chunks_;
  T* free_ = nullptr;
};

// Size bins: sizes are counted in units of the minimum block size; below 64
// units every size has its own bin, above that each power of two is split
// into 32 bins (so a bin's sizes differ by less than 1/32).
constexpr int kSubBinBits = 5;
constexpr int kNumBins = 1920;  // any 64-bit unit count: (63 - 5) * 32 + 64 bins
constexpr int kBinWords = kNumBins / 64;

inline int bin_of(std::uint64_t units) {
  if (units < (2u << kSubBinBits)) return static_cast<int>(units);
  const int msb = 63 - __builtin_clzll(units);
  const int shift = msb - kSubBinBits;
  return (shift << kSubBinBits) + static_cast<int>(units >> shift);
}

// A two-level bitmap over the bins: which bins hold a free block.
class BinBitmap {
 public:
  void set(int bin) {
    words_[bin >> 6] |= 1ull << (bin & 63);
    summary_ |= 1ull << (bin >> 6);
  }
  void clear(int bin) {
    words_[bin >> 6] &= ~(1ull << (bin & 63));
    if (words_[bin >> 6] == 0) summary_ &= ~(1ull << (bin >> 6));
  }
  // The first non-empty bin >= `bin`, or -1.
  int next_at_or_after(int bin) const {
    if (bin >= kNumBins) return -1;
    int w = bin >> 6;
    const std::uint64_t here = words_[w] & (~0ull << (bin & 63));
    if (here != 0) return (w << 6) + __builtin_ctzll(here);
    const std::uint64_t rest = w + 1 < 64 ? summary_ & (~0ull << (w + 1)) : 0;
    if (rest == 0) return -1;
    w = __builtin_ctzll(rest);
    return (w << 6) + __builtin_ctzll(words_[w]);
  }

 private:
  static_assert(kBinWords <= 64, "the summary word covers 64 words");
  std::array<std::uint64_t, kBinWords> words_{};
  std::uint64_t summary_ = 0;
};

}  // namespace torch_wsl::alloc::detail
