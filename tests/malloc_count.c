/* Live-bytes counter over the C heap, loaded with LD_PRELOAD by tests/memprobe.py (glibc only).
 *
 * Every malloc-family call is forwarded to glibc's own __libc_* entry points and counted by the
 * block's usable size, so the counter sees the op's own allocations (ATen's CPU allocator,
 * std::vector, NumPy) and nothing else: no resident-page effects, no allocator caching. The peak is
 * a running maximum of the live total since the last memcount_reset(). */
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void* __libc_valloc(size_t);
extern void* __libc_pvalloc(size_t);
extern void __libc_free(void*);

static _Atomic int64_t live_bytes, peak_bytes;

static void add(void* p) {
  if (!p) return;
  const int64_t n = (int64_t)malloc_usable_size(p);
  const int64_t now = atomic_fetch_add_explicit(&live_bytes, n, memory_order_relaxed) + n;
  int64_t seen = atomic_load_explicit(&peak_bytes, memory_order_relaxed);
  while (now > seen && !atomic_compare_exchange_weak_explicit(&peak_bytes, &seen, now,
                                                              memory_order_relaxed,
                                                              memory_order_relaxed)) {
  }
}

static void sub(void* p) {
  if (p) atomic_fetch_sub_explicit(&live_bytes, (int64_t)malloc_usable_size(p), memory_order_relaxed);
}

void* malloc(size_t n) {
  void* p = __libc_malloc(n);
  add(p);
  return p;
}

void* calloc(size_t m, size_t n) {
  void* p = __libc_calloc(m, n);
  add(p);
  return p;
}

void* realloc(void* old, size_t n) {
  const int64_t before = old ? (int64_t)malloc_usable_size(old) : 0;
  void* p = __libc_realloc(old, n);
  if (p || n == 0) atomic_fetch_sub_explicit(&live_bytes, before, memory_order_relaxed);
  add(p);
  return p;
}

void* reallocarray(void* old, size_t m, size_t n) {
  if (n && m > SIZE_MAX / n) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(old, m * n);
}

void free(void* p) {
  sub(p);
  __libc_free(p);
}

void* memalign(size_t align, size_t n) {
  void* p = __libc_memalign(align, n);
  add(p);
  return p;
}

void* aligned_alloc(size_t align, size_t n) { return memalign(align, n); }

int posix_memalign(void** out, size_t align, size_t n) {
  if (align < sizeof(void*) || (align & (align - 1)) != 0) return EINVAL;
  void* p = memalign(align, n);
  if (!p && n) return ENOMEM;
  *out = p;
  return 0;
}

void* valloc(size_t n) {
  void* p = __libc_valloc(n);
  add(p);
  return p;
}

void* pvalloc(size_t n) {
  void* p = __libc_pvalloc(n);
  add(p);
  return p;
}

/* The probe's interface (ctypes). */
void memcount_reset(void) {
  atomic_store(&peak_bytes, atomic_load(&live_bytes));
}

int64_t memcount_live(void) { return atomic_load(&live_bytes); }

int64_t memcount_peak(void) { return atomic_load(&peak_bytes); }
