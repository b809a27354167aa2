/* A cache in front of CPython's arena allocator, so that a call that crosses a frame-stack chunk
 * boundary in a loop does not map and unmap memory on every call (server/frame_stack.py says
 * why: CPython issue gh-142183, fixed in 3.13 and 3.14 with a one-chunk cache per thread).
 *
 * CPython takes its frame-stack chunks (16 KiB) and its object arenas (256 KiB or 1 MiB) from
 * the arena allocator, mmap and munmap by default. Blocks of up to CACHED_MAX_BYTES that are
 * freed are kept here, up to CACHED_BLOCKS of them, and handed out again for an allocation of
 * the same size; everything else goes to the allocator this one replaced. Every block comes
 * from that allocator and every block given back to it came from it, so blocks allocated
 * before the cache was installed are freed as they must be.
 *
 * CPython calls the arena allocator with the GIL held (frame pushes and pops, obmalloc), so
 * the cache needs no lock. No Python headers: the allocator struct is PyObjectArenaAllocator's
 * layout, which is part of CPython's stable C API. */

#include <stddef.h>
#include <stdint.h>

typedef struct {
    void *ctx;
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
} arena_allocator;

#define CACHED_BLOCKS 8
#define CACHED_MAX_BYTES (64 << 10)

static arena_allocator replaced;
static struct {
    void *ptr;
    size_t size;
} cached[CACHED_BLOCKS];
static int cached_count;
static uint64_t reused_count, passed_count;

static void *cached_alloc(void *ctx, size_t size) {
    (void)ctx;
    for (int i = cached_count - 1; i >= 0; i--) {
        if (cached[i].size == size) {
            void *ptr = cached[i].ptr;
            cached[i] = cached[--cached_count];
            reused_count++;
            return ptr;
        }
    }
    passed_count++;
    return replaced.alloc(replaced.ctx, size);
}

static void cached_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    if (ptr != NULL && size <= CACHED_MAX_BYTES && cached_count < CACHED_BLOCKS) {
        cached[cached_count].ptr = ptr;
        cached[cached_count].size = size;
        cached_count++;
        return;
    }
    replaced.free(replaced.ctx, ptr, size);
}

/* Fill `cache` with this cache's allocator, in front of `current` (the allocator in use, as
 * PyObject_GetArenaAllocator gives it); the caller installs `cache` with
 * PyObject_SetArenaAllocator. Once per process. */
void loraplex_frame_stack_cache(const arena_allocator *current, arena_allocator *cache) {
    replaced = *current;
    cache->ctx = NULL;
    cache->alloc = cached_alloc;
    cache->free = cached_free;
}

/* Allocations served from the cache, and those passed to the replaced allocator. */
uint64_t loraplex_frame_stack_reused(void) { return reused_count; }
uint64_t loraplex_frame_stack_passed(void) { return passed_count; }
