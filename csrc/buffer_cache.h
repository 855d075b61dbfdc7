// A scoped cache of large CPU buffers for the trajectory engine.
//
// Why: every unrolled step allocates the same large activations (a ConvNet-128 step at batch 100 makes ~10
// buffers of 50-100 MB). glibc hands blocks that large out as fresh mmap'd pages and unmaps them on free, so
// each step pays a page fault and a kernel page-zeroing per 4 KiB touched: measured at ~27% of an HVP step on
// the 2-core CI machine (1.03 s -> 0.75 s with huge pages, which cut the faults 512-fold). Reusing freed blocks
// of the same size removes both costs, and the steps of one trajectory all have the same shapes.
//
// Opt-in (HABA_FAST_BUFFER_CACHE=1; off by default): ATen allocates the convolutions' outputs itself, so the
// only way to reuse those blocks is to wrap c10's CPU allocator, which is process-wide, and a library must not
// swap its user's allocator unasked. Off, no scope touches the allocator and the engine pays the page faults
// (measured cost: docs/RESULTS.md, "Buffer reuse").
//
// How (when on): the first BufferCacheScope wraps c10's CPU allocator once (SetCPUAllocator). The wrapper passes
// every allocation straight to the allocator it replaced, except blocks of at least kMinCachedBytes requested by
// a thread inside a scope (the engine's own thread: other threads of the process never draw from the cache):
// those come from a free list of same-size blocks, and go back to it when their tensor dies while a scope is
// alive. When the last scope ends, the free lists are returned to the system, so memory held by the cache never
// outlives an engine call -- unless the engine asked to retain some (buffer_cache_retain below: a memory budget's
// kept steps between iterations) or a run holds them all (buffer_cache_hold: distill() between its sweeps and
// iterations). Blocks still in use at that point (returned tensors) are freed normally later.
// HABA_FAST_BUFFER_CACHE_MB caps the bytes kept free (default 4096) beyond the retained bytes.
//
// A request that finds no free block of its size takes the smallest free block up to buffer_cache_fit(ratio) times
// larger (per thread; ratio in [1, 16], default 1: exact sizes only; returns the previous ratio), which keeps its
// own size.
//
// Ops: buffer_cache_stats() (counters), buffer_cache_retain(sizes), buffer_cache_hold(on), buffer_cache_fit(ratio),
// and buffer_cache_enter() / buffer_cache_leave(), which hold a scope on the calling thread across several op calls:
// the per-step ops of one unrolled sweep (Python's haba_fast._ext.buffer_cache_scope), whose steps then reuse each
// other's blocks instead of each starting empty.
#pragma once

#include <cstdint>
#include <vector>

namespace haba_fast {

class BufferCacheScope {
 public:
  BufferCacheScope();
  ~BufferCacheScope();
  BufferCacheScope(const BufferCacheScope&) = delete;
  BufferCacheScope& operator=(const BufferCacheScope&) = delete;

 private:
  bool active_;
};

// Counters since the process started: {hits, misses, bytes kept free now, live cached blocks, scopes alive,
// installed (0/1: whether the wrapper was ever installed, i.e. the cache was switched on), bytes retained, held
// (0/1), free cap (the bytes a scope may keep free beyond the retained ones: HABA_FAST_BUFFER_CACHE_MB, read
// now)}. For tests, `haba-fast info` and the run's hold policy (haba_fast.engines.memory).
std::vector<int64_t> buffer_cache_stats();

// Free blocks of these sizes (a multiset, one entry per block; blocks under 1 MiB are never cached and are
// ignored) outlive the last scope, to serve the next one: the exact engine's kept steps, whose blocks the next
// iteration allocates again (fresh pages cost a fault and a zeroing per 4 KiB, and on a VM far more). While
// retaining, a scope may also hold that many more free bytes (beyond HABA_FAST_BUFFER_CACHE_MB). The empty list (the
// start) hands them back: at once when no scope is alive, else when the last one ends. Retaining is a no-op while
// the cache is off; handing back works whenever the wrapper was installed.
void buffer_cache_retain(const std::vector<int64_t>& sizes);

// While held, every free block outlives the last scope and serves the next one: a run's sweeps and iterations
// allocate the same blocks again, and between two sweeps the pages would otherwise go back to the system (a VM
// that hands freed guest pages to its host charges up to ~30 us per 4 KiB page to touch them again). The free
// bytes stay capped (HABA_FAST_BUFFER_CACHE_MB beyond the retained bytes). Releasing the hold trims to the
// retained sizes. Holding is a no-op while the cache is off.
void buffer_cache_hold(bool on);

}  // namespace haba_fast
