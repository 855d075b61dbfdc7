// See buffer_cache.h for why and how.
#include "buffer_cache.h"

#include "check.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace haba_fast {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;  // smaller blocks come from glibc's heap, not from mmap

// Opt-in: the cache has to replace c10's process-wide CPU allocator, which a library should not do behind its
// user's back. Off unless HABA_FAST_BUFFER_CACHE=1.
bool cache_enabled() {
  const char* v = std::getenv("HABA_FAST_BUFFER_CACHE");
  return v && std::string(v) == "1";
}

// Scopes alive on this thread: only the engine's own thread draws from the cache; every other thread of the
// process (and the intra-op worker threads) is served by the replaced allocator exactly as before.
thread_local int tl_scopes = 0;

// Largest block / request ratio this thread accepts for a request that finds no free block of its exact size
// (buffer_cache_fit): 1 = exact sizes only (the engine's sweeps, whose steps repeat their sizes exactly); a training
// loop sets 2, so that a ragged last batch reuses the full batches' blocks instead of adding blocks of its own sizes.
thread_local double tl_fit = 1.0;

size_t cache_cap_bytes() {
  const char* v = std::getenv("HABA_FAST_BUFFER_CACHE_MB");
  long long mb = v ? std::atoll(v) : 4096;
  return mb > 0 ? size_t(mb) << 20 : 0;
}

void release(void* ptr);

class CachingCPUAllocator final : public c10::Allocator {
 public:
  explicit CachingCPUAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    if (tl_scopes == 0 || n < kMinCachedBytes) return base_->allocate(n);
    void* ptr = nullptr;
    size_t block = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(n);
      if ((it == free_.end() || it->second.empty()) && tl_fit > 1.0) it = best_fit_locked(n);
      if (it != free_.end() && !it->second.empty()) {
        ptr = it->second.back();
        it->second.pop_back();
        block = it->first;  // the block keeps its own size: it goes back to the free list of that size
        free_bytes_ -= block;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (ptr == nullptr) ptr = c10::alloc_cpu(n);  // throws c10::Error on out-of-memory
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[ptr] = block;
    }
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // One deleter for both kinds of block: raw_deallocate (used by oneDNN's scratch buffers) must free whatever
  // raw_allocate returned, ours or the base allocator's.
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter() ? &release : nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base_->copy_data(dest, src, count);
  }

  void free_block(void* ptr) {
    size_t n = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(ptr);
      if (it != live_.end()) {
        n = it->second;
        live_.erase(it);
        if (scopes_.load(std::memory_order_acquire) > 0 && free_bytes_ + n <= cap_) {
          free_[n].push_back(ptr);
          free_bytes_ += n;
          return;
        }
      }
    }
    if (n > 0) {
      c10::free_cpu(ptr);
    } else {
      base_->raw_deleter()(ptr);  // not ours: the base allocator's raw block
    }
  }

  void enter() {
    std::lock_guard<std::mutex> lock(mu_);
    if (scopes_.load() == 0) set_cap_locked();
    scopes_.fetch_add(1, std::memory_order_acq_rel);
    ++tl_scopes;
  }

  void leave() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --tl_scopes;
      if (scopes_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      trim_locked(&drop);
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  // Free blocks of these sizes (a multiset: one entry per block) outlive the last scope and serve the next one;
  // the empty list hands every free block back to the system, now when no scope is alive (else when the last
  // one ends).
  void retain(const std::vector<size_t>& sizes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      retain_counts_.clear();
      retain_bytes_ = 0;
      for (size_t n : sizes) {
        ++retain_counts_[n];
        retain_bytes_ += n;
      }
      set_cap_locked();
      if (scopes_.load() == 0) trim_locked(&drop);
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  // While held, every free block outlives the last scope (the cap still bounds what a scope keeps free); releasing
  // the hold trims to the retained sizes, now when no scope is alive (else when the last one ends).
  void hold(bool on) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      hold_ = on;
      if (!on && scopes_.load() == 0) trim_locked(&drop);
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {hits_,
            misses_,
            int64_t(free_bytes_),
            int64_t(live_.size()),
            int64_t(scopes_.load()),
            /*installed=*/1,
            int64_t(retain_bytes_),
            int64_t(hold_),
            int64_t(cache_cap_bytes())};
  }

 private:
  // The free bytes a scope may keep: HABA_FAST_BUFFER_CACHE_MB beyond the retained blocks. Holds mu_.
  void set_cap_locked() { cap_ = cache_cap_bytes() + retain_bytes_; }

  // The smallest size with a free block in [n, n * tl_fit], or free_.end(). Holds mu_.
  std::unordered_map<size_t, std::vector<void*>>::iterator best_fit_locked(size_t n) {
    auto best = free_.end();
    const double limit = double(n) * tl_fit;
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first > n && double(it->first) <= limit && !it->second.empty() &&
          (best == free_.end() || it->first < best->first))
        best = it;
    }
    return best;
  }

  // Keep, of each size, at most as many free blocks as retained (all of them while held); move the rest to `drop`
  // (freed by the caller outside the lock). Holds mu_.
  void trim_locked(std::vector<void*>* drop) {
    if (hold_) return;
    size_t kept = 0;
    for (auto it = free_.begin(); it != free_.end();) {
      auto want = retain_counts_.find(it->first);
      const size_t keep = want == retain_counts_.end() ? 0 : want->second;
      auto& blocks = it->second;
      while (blocks.size() > keep) {
        drop->push_back(blocks.back());
        blocks.pop_back();
      }
      kept += it->first * blocks.size();
      it = blocks.empty() ? free_.erase(it) : std::next(it);
    }
    free_bytes_ = kept;
  }

  c10::Allocator* base_;
  std::mutex mu_;
  std::atomic<int> scopes_{0};
  std::unordered_map<size_t, std::vector<void*>> free_;  // size -> freed blocks of exactly that size
  std::unordered_map<void*, size_t> live_;               // blocks handed out -> block size (>= the request)
  std::unordered_map<size_t, size_t> retain_counts_;     // size -> free blocks of that size to keep past a scope
  size_t free_bytes_ = 0, cap_ = 0, retain_bytes_ = 0;
  bool hold_ = false;
  int64_t hits_ = 0, misses_ = 0;
};

// The wrapper, published before it becomes the CPU allocator: release() may run on any thread from then on.
std::atomic<CachingCPUAllocator*> g_alloc{nullptr};

void release(void* ptr) { g_alloc.load(std::memory_order_acquire)->free_block(ptr); }

// Installed once and never destroyed: tensors made through it may outlive any scope (and static destruction).
// nullptr when another component holds the CPU allocator at a higher priority: then we stay out of the way.
CachingCPUAllocator* installed() {
  static CachingCPUAllocator* alloc = [] {
    auto* a = new CachingCPUAllocator(c10::GetCPUAllocator());
    g_alloc.store(a, std::memory_order_release);
    c10::SetCPUAllocator(a, /*priority=*/0);
    return c10::GetCPUAllocator() == a ? a : nullptr;
  }();
  return alloc;
}

}  // namespace

BufferCacheScope::BufferCacheScope() : active_(false) {
  if (!cache_enabled()) return;
  CachingCPUAllocator* a = installed();
  if (a == nullptr) return;
  a->enter();
  active_ = true;
}

BufferCacheScope::~BufferCacheScope() {
  if (active_) installed()->leave();
}

void buffer_cache_retain(const std::vector<int64_t>& sizes) {
  std::vector<size_t> blocks;
  for (int64_t n : sizes) {
    HF_CHECK(n >= 0, "buffer_cache_retain: block sizes must be >= 0, got ", n);
    if (size_t(n) >= kMinCachedBytes) blocks.push_back(size_t(n));  // smaller blocks never enter the cache
  }
  // Retaining needs the cache switched on; handing back works whenever the wrapper was installed.
  if (!blocks.empty() && !cache_enabled()) return;
  if (blocks.empty() && g_alloc.load(std::memory_order_acquire) == nullptr) return;
  CachingCPUAllocator* a = installed();
  if (a != nullptr) a->retain(blocks);
}

void buffer_cache_hold(bool on) {
  // Holding needs the cache switched on; releasing works whenever the wrapper was installed.
  if (on && !cache_enabled()) return;
  if (!on && g_alloc.load(std::memory_order_acquire) == nullptr) return;
  CachingCPUAllocator* a = installed();
  if (a != nullptr) a->hold(on);
}

std::vector<int64_t> buffer_cache_stats() {
  CachingCPUAllocator* a = g_alloc.load(std::memory_order_acquire);
  if (a == nullptr || installed() != a) return {0, 0, 0, 0, 0, 0, 0, 0, int64_t(cache_cap_bytes())};
  return a->stats();
}

namespace {
std::vector<int64_t> buffer_cache_stats_op() { return buffer_cache_stats(); }

void buffer_cache_retain_op(c10::IntArrayRef sizes) { buffer_cache_retain(sizes.vec()); }

void buffer_cache_hold_op(bool on) { buffer_cache_hold(on); }

// Scopes held from Python across several op calls (a whole unrolled sweep of per-step ops), innermost last.
thread_local std::vector<std::unique_ptr<BufferCacheScope>> tl_held;

void buffer_cache_enter_op() { tl_held.push_back(std::make_unique<BufferCacheScope>()); }

double buffer_cache_fit_op(double ratio) {
  HF_CHECK(ratio >= 1.0 && ratio <= 16.0, "buffer_cache_fit: the ratio must be in [1, 16], got ", std::to_string(ratio));
  const double previous = tl_fit;
  tl_fit = ratio;
  return previous;
}

void buffer_cache_leave_op() {
  TORCH_CHECK(!tl_held.empty(), "buffer_cache_leave: no scope entered on this thread (call buffer_cache_enter first)");
  tl_held.pop_back();
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(haba_fast, m) {
  m.def("buffer_cache_stats() -> int[]", &buffer_cache_stats_op);
  m.def("buffer_cache_enter() -> ()", &buffer_cache_enter_op);
  m.def("buffer_cache_leave() -> ()", &buffer_cache_leave_op);
  m.def("buffer_cache_retain(int[] sizes) -> ()", &buffer_cache_retain_op);
  m.def("buffer_cache_hold(bool on) -> ()", &buffer_cache_hold_op);
  m.def("buffer_cache_fit(float ratio) -> float", &buffer_cache_fit_op);
}

}  // namespace haba_fast
