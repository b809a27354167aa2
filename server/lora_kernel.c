/* One LoRA-wrapped layer's LoRA for a decode-sized batch, every row with its own adapter, in one
 * call: the CPU kernel behind `server.lora_kernel` (see that module).
 *
 *   y[row, :out] += scale * (x[row] @ A[slot]^T) @ B[slot]      for each row whose slot >= 0
 *
 * A: (slots, slices * rank, in), fp32 or bf16 (the model's own copy, not converted: half the
 * bytes a step reads); B "compact": (slots, rank, out) fp32, where the columns of output slice i
 * take their rank-r coefficients from rows i*rank .. i*rank+rank-1 of A; x and y fp32 or bf16.
 * Rows are grouped by slot so each adapter's weights are read once per call; products and sums
 * are fp32 (bf16 x bf16 products are exact in fp32; on CPUs with AVX512-BF16 those are computed by
 * its dot-product instruction) and the result is rounded once into y. Rows with slot -1 (no
 * adapter) or a slot marked not live (no weights for this layer) are left exactly as they are.
 *
 * Threads: the caller hands over the OpenMP runtime torch itself uses (`loraplex_set_openmp`), so
 * the work is split over the same threads as the model's own ops, with no second thread pool.
 *
 * Built by `server.lora_kernel` with the C compiler of the machine; `target_clones` compiles the
 * entry point for AVX-512, AVX2+FMA and plain x86-64 and picks one at load time, so one build
 * runs on any x86-64 CPU (LORAPLEX_ONLY_AVX2 builds the AVX2+FMA code alone). Where Python's
 * headers are there (LORAPLEX_PYTHON), the library is also a Python extension module whose
 * `rows` calls the entry point: the per-layer call then skips ctypes' argument conversion, which
 * inside the model's run costs ~8 us a call (its code and data are out of the caches by the time
 * each layer comes round).
 */
#ifdef LORAPLEX_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python asks */
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#ifndef LORAPLEX_ONLY_AVX2
#define X86 1 /* AVX512-BF16's dot product compiled in, used where the CPU has it */
#endif
#endif

enum { LORAPLEX_F32 = 0, LORAPLEX_BF16 = 1 };

/* What a layer's call needs besides the batch; built once per layer weights (lora_kernel.py
 * keeps its layout in step with this struct). */
typedef struct {
    const void *a;       /* (slots, slices * rank, in), `dtype` */
    const void *b;       /* b_pairs 0: (slots, rank, out) fp32; 1: bf16 with ranks in pairs,
                            (slots, ceil(rank / 2), out, 2), for AVX512-BF16's dot product */
    const uint8_t *live; /* (slots,) 1 where the slot holds weights for this layer */
    int64_t slots, in, out, rank, slices;
    const int64_t *offsets; /* (slices + 1,) column where each output slice starts, then out */
    int64_t dtype;          /* of a */
    const int64_t *ranks;   /* (slots,) the rank each slot's adapter uses (<= rank): rows of A
                               and B past it are zero padding, neither read nor multiplied */
    int64_t b_pairs;
} loraplex_layer;

static int bf16_dot_allowed = 1;

/* 0: never use AVX512-BF16's dot product, whatever the CPU (the code other CPUs run; set before
 * the layers' weights are laid out). */
void loraplex_allow_bf16_dot(int allowed) { bf16_dot_allowed = allowed; }

/* Whether the kernel uses AVX512-BF16's dot product: the CPU has it and it is allowed (then bf16
 * models' B is kept in pairs). */
int loraplex_bf16_dot(void) {
#ifdef X86
    return bf16_dot_allowed && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* 1 where built with the AVX2+FMA code alone (LORAPLEX_ONLY_AVX2). */
int loraplex_only_avx2(void) {
#ifdef LORAPLEX_ONLY_AVX2
    return 1;
#else
    return 0;
#endif
}

/* libgomp's entry points, as torch loaded them (NULL: one thread). */
static void (*gomp_parallel)(void (*)(void *), void *, unsigned, unsigned);
static void (*gomp_barrier)(void);
static int (*omp_thread_num)(void);
static int (*omp_num_threads)(void);
static int (*omp_max_threads)(void);

void loraplex_set_openmp(void *parallel, void *barrier, void *thread_num, void *num_threads,
                         void *max_threads) {
    gomp_parallel = (void (*)(void (*)(void *), void *, unsigned, unsigned))parallel;
    gomp_barrier = (void (*)(void))barrier;
    omp_thread_num = (int (*)(void))thread_num;
    omp_num_threads = (int (*)(void))num_threads;
    omp_max_threads = (int (*)(void))max_threads;
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    /* a NaN stays a (quiet) NaN; branch-free so that loops of it vectorize */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

/* Element i of a weight array of dtype `bf16` (a constant at every call site, so each loop is
 * compiled once per dtype). */
static inline __attribute__((always_inline)) float weight(const void *w, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* h[j * width + k] = scale * (A[k] . x[j]) for k in [k0, k0 + count), count <= 4, j < n: four
 * rows of A at a time, so each load of x feeds four independent accumulator chains. */
static inline __attribute__((always_inline)) void shrink4(float *restrict h, const void *a,
                                                          const float *restrict x, int64_t n,
                                                          int64_t k0, int64_t count, int64_t width,
                                                          int64_t in, float scale, int bf16) {
    if (count < 4) {
        for (int64_t k = k0; k < k0 + count; k++)
            for (int64_t j = 0; j < n; j++) {
                float sum = 0;
                for (int64_t i = 0; i < in; i++) sum += weight(a, k * in + i, bf16) * x[j * in + i];
                h[j * width + k] = scale * sum;
            }
        return;
    }
    const int64_t r0 = k0 * in, r1 = r0 + in, r2 = r1 + in, r3 = r2 + in;
    for (int64_t j = 0; j < n; j++) {
        const float *xj = x + j * in;
        float p0[16] = {0}, p1[16] = {0}, p2[16] = {0}, p3[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= in; i += 16)
            for (int l = 0; l < 16; l++) {
                const float v = xj[i + l];
                p0[l] += weight(a, r0 + i + l, bf16) * v, p1[l] += weight(a, r1 + i + l, bf16) * v;
                p2[l] += weight(a, r2 + i + l, bf16) * v, p3[l] += weight(a, r3 + i + l, bf16) * v;
            }
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int l = 0; l < 16; l++) s0 += p0[l], s1 += p1[l], s2 += p2[l], s3 += p3[l];
        for (; i < in; i++) {
            const float v = xj[i];
            s0 += weight(a, r0 + i, bf16) * v, s1 += weight(a, r1 + i, bf16) * v;
            s2 += weight(a, r2 + i, bf16) * v, s3 += weight(a, r3 + i, bf16) * v;
        }
        float *hj = h + j * width + k0;
        hj[0] = scale * s0, hj[1] = scale * s1, hj[2] = scale * s2, hj[3] = scale * s3;
    }
}

#ifdef X86
/* shrink4 for bf16 A and x on CPUs with AVX512-BF16: 32 multiply-adds per instruction, two rows
 * of x at a time (eight independent accumulators: the instruction's latency, not its
 * throughput, bounds fewer). */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void shrink4_dpbf16(
    float *restrict h, const void *a, const uint16_t *restrict x, int64_t n, int64_t k0,
    int64_t width, int64_t in, float scale) {
    const uint16_t *a0 = (const uint16_t *)a + k0 * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
        const uint16_t *xj = x + j * in, *xk = xj + in;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        __m512 t0 = s0, t1 = s0, t2 = s0, t3 = s0;
        for (int64_t i = 0; i < in; i += 32) {
            const __mmask32 m = in - i >= 32 ? 0xffffffffu : (1u << (in - i)) - 1u;
            const __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(m, xj + i);
            const __m512bh u = (__m512bh)_mm512_maskz_loadu_epi16(m, xk + i);
            const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, a0 + i);
            const __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi16(m, a1 + i);
            const __m512bh w2 = (__m512bh)_mm512_maskz_loadu_epi16(m, a2 + i);
            const __m512bh w3 = (__m512bh)_mm512_maskz_loadu_epi16(m, a3 + i);
            s0 = _mm512_dpbf16_ps(s0, w0, v), t0 = _mm512_dpbf16_ps(t0, w0, u);
            s1 = _mm512_dpbf16_ps(s1, w1, v), t1 = _mm512_dpbf16_ps(t1, w1, u);
            s2 = _mm512_dpbf16_ps(s2, w2, v), t2 = _mm512_dpbf16_ps(t2, w2, u);
            s3 = _mm512_dpbf16_ps(s3, w3, v), t3 = _mm512_dpbf16_ps(t3, w3, u);
        }
        float *hj = h + j * width + k0, *hk = hj + width;
        hj[0] = scale * _mm512_reduce_add_ps(s0), hj[1] = scale * _mm512_reduce_add_ps(s1);
        hj[2] = scale * _mm512_reduce_add_ps(s2), hj[3] = scale * _mm512_reduce_add_ps(s3);
        hk[0] = scale * _mm512_reduce_add_ps(t0), hk[1] = scale * _mm512_reduce_add_ps(t1);
        hk[2] = scale * _mm512_reduce_add_ps(t2), hk[3] = scale * _mm512_reduce_add_ps(t3);
    }
    for (; j < n; j++) {
        const uint16_t *xj = x + j * in;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t i = 0; i < in; i += 32) {
            const __mmask32 m = in - i >= 32 ? 0xffffffffu : (1u << (in - i)) - 1u;
            const __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(m, xj + i);
            s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_maskz_loadu_epi16(m, a0 + i), v);
            s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_maskz_loadu_epi16(m, a1 + i), v);
            s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_maskz_loadu_epi16(m, a2 + i), v);
            s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_maskz_loadu_epi16(m, a3 + i), v);
        }
        float *hj = h + j * width + k0;
        hj[0] = scale * _mm512_reduce_add_ps(s0), hj[1] = scale * _mm512_reduce_add_ps(s1);
        hj[2] = scale * _mm512_reduce_add_ps(s2), hj[3] = scale * _mm512_reduce_add_ps(s3);
    }
}
#endif

#define CHUNK 64 /* output columns one expand step keeps in registers */

/* 16 floats as one value (GCC's vector extension: a zmm register in the AVX-512 clone, two ymm in
 * the AVX2 one), so the accumulators of a chunk stay in registers across k. */
typedef float f32x16 __attribute__((vector_size(64)));

static inline f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* y[c0 .. c0 + size) += t, rounded once into y's dtype. */
static inline __attribute__((always_inline)) void add_into(void *y, int ydtype,
                                                           const float *restrict t, int64_t c0,
                                                           int64_t size) {
    if (ydtype == LORAPLEX_BF16) {
        uint16_t *d = (uint16_t *)y + c0;
        for (int64_t l = 0; l < size; l++) d[l] = f32_to_bf16(bf16_to_f32(d[l]) + t[l]);
    } else {
        float *d = (float *)y + c0;
        for (int64_t l = 0; l < size; l++) d[l] += t[l];
    }
}

#ifdef X86
/* expand_chunk for B in rank pairs (bf16) on CPUs with AVX512-BF16: h rounded to bf16, as vLLM's
 * own expand step does, and each pair of ranks multiplied into 16 columns by one instruction. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void expand_pairs_dpbf16(
    void *y, int ydtype, const float *restrict h, const uint32_t *restrict b, int64_t out,
    int64_t rank, int64_t c0, int64_t size) {
    float t[CHUNK];
    const __mmask16 m0 = size >= 16 ? 0xffff : (__mmask16)((1u << size) - 1u);
    const __mmask16 m1 = size >= 32 ? 0xffff : size <= 16 ? 0 : (__mmask16)((1u << (size - 16)) - 1u);
    const __mmask16 m2 = size >= 48 ? 0xffff : size <= 32 ? 0 : (__mmask16)((1u << (size - 32)) - 1u);
    const __mmask16 m3 = size >= 64 ? 0xffff : size <= 48 ? 0 : (__mmask16)((1u << (size - 48)) - 1u);
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    for (int64_t p = 0; p < (rank + 1) / 2; p++) {
        const uint32_t lo = f32_to_bf16(h[2 * p]), hi = 2 * p + 1 < rank ? f32_to_bf16(h[2 * p + 1]) : 0;
        const __m512bh hv = (__m512bh)_mm512_set1_epi32((int)(lo | hi << 16));
        const uint32_t *bp = b + p * out + c0;
        t0 = _mm512_dpbf16_ps(t0, (__m512bh)_mm512_maskz_loadu_epi32(m0, bp), hv);
        t1 = _mm512_dpbf16_ps(t1, (__m512bh)_mm512_maskz_loadu_epi32(m1, bp + 16), hv);
        t2 = _mm512_dpbf16_ps(t2, (__m512bh)_mm512_maskz_loadu_epi32(m2, bp + 32), hv);
        t3 = _mm512_dpbf16_ps(t3, (__m512bh)_mm512_maskz_loadu_epi32(m3, bp + 48), hv);
    }
    _mm512_storeu_ps(t, t0), _mm512_storeu_ps(t + 16, t1);
    _mm512_storeu_ps(t + 32, t2), _mm512_storeu_ps(t + 48, t3);
    add_into(y, ydtype, t, c0, size);
}
#endif

/* y[c0 .. c0 + size) += sum over k < rank of h[k] * B[k, c0 + c] (size <= CHUNK). */
static inline __attribute__((always_inline)) void expand_chunk(void *y, int ydtype,
                                                               const float *restrict h,
                                                               const float *restrict b,
                                                               int64_t out, int64_t rank,
                                                               int64_t c0, int64_t size) {
    float t[CHUNK] = {0};
    if (size == CHUNK) {
        f32x16 t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
        for (int64_t k = 0; k < rank; k++) {
            const float hk = h[k], *bk = b + k * out + c0;
            t0 += hk * load16(bk), t1 += hk * load16(bk + 16);
            t2 += hk * load16(bk + 32), t3 += hk * load16(bk + 48);
        }
        memcpy(t, &t0, 64), memcpy(t + 16, &t1, 64), memcpy(t + 32, &t2, 64);
        memcpy(t + 48, &t3, 64);
    } else {
        for (int64_t k = 0; k < rank; k++)
            for (int64_t l = 0; l < size; l++) t[l] += h[k] * b[k * out + c0 + l];
    }
    add_into(y, ydtype, t, c0, size);
}

/* One call's work, shared by the threads. Shrink items: (group, block of 4 rows of A); expand
 * items: (group, output slice, chunk of columns). */
typedef struct {
    const loraplex_layer *layer;
    void *y;
    int64_t y_stride, ydtype, width, groups, rows;
    const int64_t *order;       /* the rows, grouped by slot */
    const int64_t *group_start; /* (groups + 1,) into order */
    const int64_t *group_slot;
    const float *xs;    /* (rows, in) fp32, in `order` */
    const uint16_t *xb; /* the same rows as bf16 where the dot-product instruction is used, or NULL */
    float *h;        /* (rows, width), in `order` */
    int64_t shrink_items, chunks_per_row;
    float scale;
} work;

static inline __attribute__((always_inline)) void run_share(const work *w, int thread,
                                                            int threads, int bf16) {
    const loraplex_layer *L = w->layer;
    const int64_t in = L->in, out = L->out, rank = L->rank;
    const int64_t per_slice = (rank + 3) / 4, blocks = L->slices * per_slice;
    for (int64_t item = thread; item < w->shrink_items; item += threads) {
        const int64_t g = item / blocks, block = item % blocks, first = w->group_start[g];
        const int64_t used = L->ranks[w->group_slot[g]], kb = (block % per_slice) * 4;
        if (kb >= used) continue; /* zero padding of a lower-rank adapter */
        const void *a = (const char *)L->a + w->group_slot[g] * w->width * in * (bf16 ? 2 : 4);
        const int64_t n = w->group_start[g + 1] - first, k0 = (block / per_slice) * rank + kb;
        const int64_t count = used - kb < 4 ? used - kb : 4;
#ifdef X86
        if (w->xb && count == 4) {
            shrink4_dpbf16(w->h + first * w->width, a, w->xb + first * in, n, k0, w->width, in,
                           w->scale);
            continue;
        }
#endif
        shrink4(w->h + first * w->width, a, w->xs + first * in, n, k0, count, w->width, in,
                w->scale, bf16);
    }
    if (threads > 1) gomp_barrier();
    const int64_t expand_items = w->groups * w->chunks_per_row;
    for (int64_t item = thread; item < expand_items; item += threads) {
        const int64_t g = item / w->chunks_per_row;
        int64_t chunk = item % w->chunks_per_row, s = 0;
        for (;; s++) { /* which slice the chunk falls in */
            const int64_t chunks = (L->offsets[s + 1] - L->offsets[s] + CHUNK - 1) / CHUNK;
            if (chunk < chunks) break;
            chunk -= chunks;
        }
        const int64_t c0 = L->offsets[s] + chunk * CHUNK;
        const int64_t end = L->offsets[s + 1], size = end - c0 < CHUNK ? end - c0 : CHUNK;
        const int64_t used = L->ranks[w->group_slot[g]];
        for (int64_t j = w->group_start[g]; j < w->group_start[g + 1]; j++) {
            void *yrow = (char *)w->y + w->order[j] * w->y_stride * (w->ydtype ? 2 : 4);
            const float *hj = w->h + j * w->width + s * rank;
#ifdef X86
            if (L->b_pairs) {
                const uint32_t *b = (const uint32_t *)L->b + w->group_slot[g] * ((rank + 1) / 2) * out;
                expand_pairs_dpbf16(yrow, (int)w->ydtype, hj, b, out, used, c0, size);
                continue;
            }
#endif
            expand_chunk(yrow, (int)w->ydtype, hj, (const float *)L->b + w->group_slot[g] * rank * out,
                         out, used, c0, size);
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(LORAPLEX_ONLY_AVX2)
/* The AVX2+FMA code alone, whatever the CPU has (LORAPLEX_LORA_KERNEL_ISA=avx2): what CPUs
 * without AVX-512 run, made checkable and measurable on CPUs with it. */
#define CLONES __attribute__((target("arch=x86-64-v3")))
#elif defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

CLONES static void run_f32(void *arg) {
    const int threads = omp_num_threads ? omp_num_threads() : 1;
    run_share(arg, threads > 1 ? omp_thread_num() : 0, threads, 0);
}

CLONES static void run_bf16(void *arg) {
    const int threads = omp_num_threads ? omp_num_threads() : 1;
    run_share(arg, threads > 1 ? omp_thread_num() : 0, threads, 1);
}

/* Below this many multiply-adds a call runs on the caller's thread alone: waking the others
 * costs more than it saves. */
#define PARALLEL_MIN_WORK 32768

/* Returns 0, -1 when out of memory (y untouched), -2 for an unknown dtype. Strides are in
 * elements; the last dimension of x and y is contiguous. */
CLONES int loraplex_lora_rows(void *y, int64_t y_stride, const void *x, int64_t x_stride,
                              int dtype, const int64_t *row_slots, int64_t rows, float scale,
                              const loraplex_layer *layer) {
    if ((dtype != LORAPLEX_F32 && dtype != LORAPLEX_BF16) ||
        (layer->dtype != LORAPLEX_F32 && layer->dtype != LORAPLEX_BF16))
        return -2;
    const int64_t in = layer->in, width = layer->slices * layer->rank;
    /* Scratch, kept per thread between calls (a fresh allocation this size would be an mmap
     * and page faults at every call). */
    static __thread char *scratch;
    static __thread size_t capacity;
    const size_t need = (size_t)rows * ((size_t)(in + width) * sizeof(float) + 3 * sizeof(int64_t) +
                                        (size_t)in * sizeof(uint16_t)) +
                        sizeof(int64_t);
    if (need > capacity) {
        char *grown = realloc(scratch, need);
        if (!grown) return -1;
        scratch = grown, capacity = need;
    }
    float *scratch_f32 = (float *)scratch, *h = scratch_f32 + rows * in;
    int64_t *order = (int64_t *)(h + rows * width), *group_slot = order + rows;
    int64_t *group_start = group_slot + rows, groups = 0, placed = 0;
    for (int64_t r = 0; r < rows; r++) { /* group the rows by slot, in order of first use */
        const int64_t slot = row_slots[r];
        if (slot < 0 || slot >= layer->slots || !layer->live[slot]) continue;
        int seen = 0;
        for (int64_t g = 0; g < groups; g++) seen |= group_slot[g] == slot;
        if (seen) continue;
        group_slot[groups] = slot, group_start[groups++] = placed;
        for (int64_t q = r; q < rows; q++)
            if (row_slots[q] == slot) order[placed++] = q;
    }
    group_start[groups] = placed;
    if (!groups) return 0;
    /* x's rows in `order`, contiguous: x itself where it already is (a batch on one adapter),
     * else copied into the scratch. The dot-product shrink reads them as bf16; the generic one
     * (other CPUs, and the last ranks of an adapter whose rank is not a multiple of 4) as fp32. */
    int in_place = x_stride == in;
    for (int64_t j = 0; j < placed; j++) in_place &= order[j] == j;
    const uint16_t *xb = NULL;
    int fp32_rows = 1;
#ifdef X86
    if (dtype == LORAPLEX_BF16 && layer->dtype == LORAPLEX_BF16 && loraplex_bf16_dot()) {
        fp32_rows = 0;
        for (int64_t g = 0; g < groups; g++) fp32_rows |= layer->ranks[group_slot[g]] % 4 != 0;
        if (in_place) {
            xb = x;
        } else {
            uint16_t *copy = (uint16_t *)(group_start + rows + 1);
            for (int64_t j = 0; j < placed; j++)
                memcpy(copy + j * in, (const uint16_t *)x + order[j] * x_stride, (size_t)in * 2);
            xb = copy;
        }
    }
#endif
    const float *xs = in_place && dtype == LORAPLEX_F32 ? x : scratch_f32;
    for (int64_t j = 0; fp32_rows && xs == scratch_f32 && j < placed; j++) {
        float *dst = scratch_f32 + j * in;
        if (dtype == LORAPLEX_BF16) {
            const uint16_t *src = (const uint16_t *)x + order[j] * x_stride;
            for (int64_t i = 0; i < in; i++) dst[i] = bf16_to_f32(src[i]);
        } else {
            memcpy(dst, (const float *)x + order[j] * x_stride, (size_t)in * sizeof(float));
        }
    }
    int64_t chunks_per_row = 0;
    for (int64_t s = 0; s < layer->slices; s++)
        chunks_per_row += (layer->offsets[s + 1] - layer->offsets[s] + CHUNK - 1) / CHUNK;
    work w = {layer, y, y_stride, dtype, width, groups, placed, order, group_start, group_slot,
              xs, xb, h, groups * layer->slices * ((layer->rank + 3) / 4), chunks_per_row, scale};
    void (*run)(void *) = layer->dtype == LORAPLEX_BF16 ? run_bf16 : run_f32;
    int64_t work_size = 0;
    for (int64_t g = 0; g < groups; g++)
        work_size += (group_start[g + 1] - group_start[g]) * layer->ranks[group_slot[g]] *
                     (in * layer->slices + layer->out);
    if (gomp_parallel && omp_max_threads() > 1 && work_size >= PARALLEL_MIN_WORK)
        gomp_parallel(run, &w, 0, 0);
    else
        run(&w);
    return 0;
}

#ifdef LORAPLEX_PYTHON
/* rows(y, y_stride, x, x_stride, dtype, row_slots, rows, scale, layer) -> int: loraplex_lora_rows
 * with the addresses as ints. Keeps the GIL: the call is short and the caller is the model's
 * only thread. */
static PyObject *py_rows(PyObject *self, PyObject *const *args, Py_ssize_t count) {
    (void)self;
    if (count != 9) {
        PyErr_SetString(PyExc_TypeError, "rows() takes 9 arguments");
        return NULL;
    }
    void *y = PyLong_AsVoidPtr(args[0]);
    const int64_t y_stride = PyLong_AsLongLong(args[1]);
    const void *x = PyLong_AsVoidPtr(args[2]);
    const int64_t x_stride = PyLong_AsLongLong(args[3]);
    const int dtype = (int)PyLong_AsLong(args[4]);
    const int64_t *row_slots = PyLong_AsVoidPtr(args[5]);
    const int64_t rows = PyLong_AsLongLong(args[6]);
    const double scale = PyFloat_AsDouble(args[7]);
    const loraplex_layer *layer = PyLong_AsVoidPtr(args[8]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLong(
        loraplex_lora_rows(y, y_stride, x, x_stride, dtype, row_slots, rows, (float)scale, layer));
}

static PyMethodDef methods[] = {
    {"rows", (PyCFunction)(void (*)(void))py_rows, METH_FASTCALL, "loraplex_lora_rows"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lora_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lora_kernel(void) { return PyModule_Create(&module); }
#endif
