/* One decode step of one sequence through a GLM: the whole of `GLM.forward` for one new token after a
 * KV cache, in one call.
 *
 * Why native: at batch 1 a small model's step is a chain of ~200 tiny tensor ops, and on a CPU each
 * op costs several microseconds of dispatch plus cold caches (the weights stream through the cache
 * between them). Here the step is straight C over the weights in place: each weight is read once,
 * everything between the matrix-vector products stays in fp32 in L1.
 *
 * Float weights, norms, biases and the cache are fp32 or bf16 (all of one dtype); the block linears
 * may instead be INT8/INT4 with bf16 scales (the layouts of openglm/quantize.py, see glm_linear).
 * Arithmetic and activations are fp32 (bf16 values are widened exactly; new keys/values are rounded
 * to the cache's dtype, nearest-even).
 * openglm/native.py builds the structs below from a model and checks every shape and stride first;
 * this file trusts them. Compiled on first use with the system C compiler (-O3 -march=native -pthread).
 *
 * Threads: a call may split each linear's output rows (in whole 8-row passes or INT4 tiles) and the
 * attention heads over `threads` threads: the caller and a pool of POSIX threads that sleep between
 * calls (no OpenMP runtime beside torch's). Every output row and head is computed by the same code
 * in the same order whichever thread takes it, so the logits are bit-equal at every thread count.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

enum { FLOAT_WEIGHT = 0, INT8_ROWS = 1, INT4_ROWS = 2, INT4_TILED = 3 };

typedef struct {
    const void *weight; /* by kind, below */
    const void *bias;   /* [out_features] in the model's dtype, or NULL */
    int64_t out_features, in_features;
    int32_t kind;
    int32_t block;           /* INT4_TILED: rows per tile */
    const uint16_t *scales;  /* bf16 bits: [out, in / group] (INT8_ROWS, INT4_ROWS); [in / group, out, 2] (INT4_TILED) */
    int64_t group;           /* inputs per scale */
} glm_linear;
/* Weight kinds (openglm/quantize.py makes them):
 * FLOAT_WEIGHT  the model's dtype, [out, in] row-major.
 * INT8_ROWS     int8 [out, in]; w = q * scale[o, i / group].
 * INT4_ROWS     `pack_int4`: uint8 [out, in / 2], inputs 2i and 2i+1 in the low and high nibble
 *               (two's complement); w = q * scale[o, i / group].
 * INT4_TILED    torch's CPU INT4 kernel layout: rows in tiles of `block`, each tile [in, block / 2]
 *               bytes whose low nibble is row j and high nibble row j + block / 2 (in the last,
 *               shorter tile: rows 2j and 2j + 1); nibbles are q + 8; the scale of (o, i) is the
 *               first of the bf16 pair at [i / group, o]. */

typedef struct {
    const void *norm1_weight, *norm1_bias;
    glm_linear qkv; /* per head [q | k | v], each head_dim rows */
    glm_linear dense;
    const void *norm2_weight, *norm2_bias;
    glm_linear up;   /* GeGLU: [x1 | x2] -> x1 * gelu(x2) */
    glm_linear down;
} glm_layer;

typedef struct {
    int64_t hidden, heads, head_dim, rotary_dim, ffn_hidden, layers, vocab;
    int32_t geglu, tanh_gelu, bf16;
    float alpha, eps;
    const void *embedding; /* [vocab, hidden] */
    const void *final_norm_weight, *final_norm_bias;
    glm_linear head; /* [vocab, hidden] (the embedding when tied) */
    const glm_layer *layers_array;
} glm_model;

typedef struct {
    void *keys, *values; /* this row's [layers, heads, capacity, head_dim] views, element strides below */
    int64_t layer_stride, head_stride, position_stride;
} glm_cache;

typedef uint16_t bf16_t;

static inline float bf16_to_float(bf16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline bf16_t float_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((bits >> 16) | 0x40u); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16_t)(bits >> 16);
}

static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const bf16_t *)p)[i]) : ((const float *)p)[i];
}

/* y = W x + b, the weights streamed once. With AVX-512: eight output rows per pass share each
 * load of x, 16 lanes each (bf16 widened to fp32 exactly, by a shift), masked loads for the tail.
 * Otherwise portable loops that the compiler vectorises (`omp simd` lets it reorder the sums, as
 * any BLAS does). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

static inline __m512 load16(const void *p, int64_t i, __mmask16 k, int bf16) {
    if (bf16) {
        const __m256i half = _mm256_maskz_loadu_epi16(k, (const bf16_t *)p + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    return _mm512_maskz_loadu_ps(k, (const float *)p + i);
}

static inline void dot_rows(const void *w, int64_t n, const float *x, float *y, const int rows, const int bf16) {
    __m512 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(load16(w, r * n + i, 0xffff, bf16), xv, acc[r]);
    }
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 xv = _mm512_maskz_loadu_ps(k, x + i);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(load16(w, r * n + i, k, bf16), xv, acc[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) y[r] = _mm512_reduce_add_ps(acc[r]);
}

static void float_linear(const glm_linear *l, const float *x, float *y, int bf16, int64_t o, int64_t end) {
    const int64_t n = l->in_features, size = bf16 ? 2 : 4;
    const char *w = l->weight;
    if (bf16) {
        for (; o + 8 <= end; o += 8) dot_rows(w + o * n * size, n, x, y + o, 8, 1);
        for (; o < end; o++) dot_rows(w + o * n * size, n, x, y + o, 1, 1);
    } else {
        for (; o + 8 <= end; o += 8) dot_rows(w + o * n * size, n, x, y + o, 8, 0);
        for (; o < end; o++) dot_rows(w + o * n * size, n, x, y + o, 1, 0);
    }
}
#else
static void float_linear(const glm_linear *l, const float *x, float *y, int bf16, int64_t o, int64_t end) {
    const int64_t n = l->in_features;
    for (; o < end; o++) {
        float a = 0;
        if (bf16) {
            const bf16_t *w = (const bf16_t *)l->weight + o * n;
#pragma omp simd reduction(+ : a)
            for (int64_t i = 0; i < n; i++) a += bf16_to_float(w[i]) * x[i];
        } else {
            const float *w = (const float *)l->weight + o * n;
#pragma omp simd reduction(+ : a)
            for (int64_t i = 0; i < n; i++) a += w[i] * x[i];
        }
        y[o] = a;
    }
}
#endif

/* The quantized kinds: plain loops over the integers that the compiler vectorises; each group's
 * integer-weighted sum is scaled once. */
static void int8_rows_linear(const glm_linear *l, const float *x, float *y, int64_t o, int64_t end) {
    const int64_t n = l->in_features, group = l->group, groups = n / group;
    for (; o < end; o++) {
        const int8_t *w = (const int8_t *)l->weight + o * n;
        float total = 0;
        for (int64_t g = 0; g < groups; g++) {
            float a = 0;
#pragma omp simd reduction(+ : a)
            for (int64_t i = g * group; i < (g + 1) * group; i++) a += (float)w[i] * x[i];
            total += a * bf16_to_float(l->scales[o * groups + g]);
        }
        y[o] = total;
    }
}

static void int4_rows_linear(const glm_linear *l, const float *x, float *y, int64_t o, int64_t end) {
    const int64_t n = l->in_features, group = l->group, groups = n / group;
    for (; o < end; o++) {
        const uint8_t *w = (const uint8_t *)l->weight + o * (n / 2);
        float total = 0;
        for (int64_t g = 0; g < groups; g++) {
            float a = 0;
#pragma omp simd reduction(+ : a)
            for (int64_t b = g * group / 2; b < (g + 1) * group / 2; b++) {
                const int low = (int)(w[b] & 15u) - (int)((w[b] & 0x08u) << 1), high = (int)(w[b] >> 4) - (int)((w[b] & 0x80u) >> 3);
                a += (float)low * x[2 * b] + (float)high * x[2 * b + 1];
            }
            total += a * bf16_to_float(l->scales[o * groups + g]);
        }
        y[o] = total;
    }
}

/* One tile of `rows` rows starting at row `first`, `rows / 2` bytes per input; `paired`: rows 2j and
 * 2j + 1 share byte j (the last tile), else rows j and j + rows / 2. */
static void int4_tile(const glm_linear *l, const uint8_t *tile, int64_t first, int64_t rows, int paired, const float *x, float *y) {
    const int64_t n = l->in_features, group = l->group, half = rows / 2, out = l->out_features;
    float total[128], low[64], high[64];
    for (int64_t j = 0; j < rows; j++) total[j] = 0;
    for (int64_t g = 0; g < n / group; g++) {
        for (int64_t j = 0; j < half; j++) low[j] = high[j] = 0;
        for (int64_t i = g * group; i < (g + 1) * group; i++) {
            const uint8_t *bytes = tile + i * half;
            const float xi = x[i];
#pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                low[j] += (float)((int)(bytes[j] & 15u) - 8) * xi;
                high[j] += (float)((int)(bytes[j] >> 4) - 8) * xi;
            }
        }
        const uint16_t *scale = l->scales + 2 * (g * out + first);
        for (int64_t j = 0; j < half; j++) {
            const int64_t a = paired ? 2 * j : j, b = paired ? 2 * j + 1 : j + half;
            total[a] += low[j] * bf16_to_float(scale[2 * a]);
            total[b] += high[j] * bf16_to_float(scale[2 * b]);
        }
    }
    for (int64_t j = 0; j < rows; j++) y[first + j] = total[j];
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* INT8, groups a multiple of 16 wide: eight rows per pass; each group's vector sums are scaled
 * into the totals, one horizontal sum per row at the end. */
static inline void int8_dot_rows(const glm_linear *l, int64_t first, const float *x, float *y, const int rows) {
    const int64_t n = l->in_features, group = l->group, groups = n / group;
    const int8_t *w = (const int8_t *)l->weight + first * n;
    __m512 total[8], acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++) {
                const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + r * n + i)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), xv, acc[r]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++)
            total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(bf16_to_float(l->scales[(first + r) * groups + g])), total[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) y[first + r] = _mm512_reduce_add_ps(total[r]);
}

static void int8_rows_linear_avx512(const glm_linear *l, const float *x, float *y, int64_t o, int64_t end) {
    for (; o + 8 <= end; o += 8) int8_dot_rows(l, o, x, y, 8);
    for (; o < end; o++) int8_dot_rows(l, o, x, y, 1);
}

/* One full 64-row INT4 tile: per input, 32 bytes hold rows 0..31 (low nibbles) and 32..63 (high). */
static void int4_tile64(const glm_linear *l, const uint8_t *tile, int64_t first, const float *x, float *y) {
    const int64_t group = l->group, out = l->out_features;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    __m512 total[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < l->in_features / group; g++) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t i = g * group; i < (g + 1) * group; i++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(tile + i * 32));
            const __m256i low = _mm256_and_si256(bytes, nibble), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
            const __m128i parts[4] = {_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1),
                                      _mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)};
            const __m512 xv = _mm512_set1_ps(x[i]);
            for (int k = 0; k < 4; k++) {
                const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(parts[k]), eight);
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), xv, acc[k]);
            }
        }
        for (int k = 0; k < 4; k++) { /* the (scale, zero) bf16 pairs of 16 rows as 16 int32: scale in the low half */
            const __m512i pairs = _mm512_loadu_si512((const void *)(l->scales + 2 * (g * out + first + 16 * k)));
            total[k] = _mm512_fmadd_ps(acc[k], _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), total[k]);
        }
    }
    for (int k = 0; k < 4; k++) _mm512_storeu_ps(y + first + 16 * k, total[k]);
}
#endif

/* Tiles `tile`..`end - 1`; the tile after the last full one is the shorter last tile. */
static void int4_tiled_linear(const glm_linear *l, const float *x, float *y, int64_t tile, int64_t end) {
    const int64_t block = l->block, out = l->out_features, full = out / block, bytes = l->in_features / 2;
    const uint8_t *w = l->weight;
    for (; tile < end; tile++) {
        const int64_t first = tile * block;
        if (tile == full) {
            int4_tile(l, w + first * bytes, first, out - first, 1, x, y);
            continue;
        }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
        if (block == 64) {
            int4_tile64(l, w + first * bytes, first, x, y);
            continue;
        }
#endif
        int4_tile(l, w + first * bytes, first, block, 0, x, y);
    }
}

/* A linear is split across threads in units: INT4 tiles, else passes of 8 rows. */
static int64_t units(const glm_linear *l) {
    if (l->kind == INT4_TILED) return (l->out_features + l->block - 1) / l->block;
    return (l->out_features + 7) / 8;
}

/* Units `begin`..`end - 1` of y = W x + b. */
static void linear_units(const glm_linear *l, const float *x, float *y, int bf16, int64_t begin, int64_t end) {
    int64_t o = begin * 8, stop = end * 8 < l->out_features ? end * 8 : l->out_features;
    switch (l->kind) {
    case INT8_ROWS:
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
        if (l->group % 16 == 0) {
            int8_rows_linear_avx512(l, x, y, o, stop);
            break;
        }
#endif
        int8_rows_linear(l, x, y, o, stop);
        break;
    case INT4_ROWS: int4_rows_linear(l, x, y, o, stop); break;
    case INT4_TILED:
        int4_tiled_linear(l, x, y, begin, end);
        o = begin * l->block, stop = end * l->block < l->out_features ? end * l->block : l->out_features;
        break;
    default: float_linear(l, x, y, bf16, o, stop);
    }
    if (l->bias)
        for (; o < stop; o++) y[o] += load(l->bias, o, bf16);
}

/* The thread pool. `parallel(task, arg, parts)` runs task(arg, k, parts) for k = 0..parts-1, part 0
 * on the caller, and returns when all are done. Workers wait for a new generation spinning briefly
 * (regions of one call follow each other within microseconds), then sleep on a condition variable
 * (between calls). One region at a time: a second caller that finds the pool busy runs alone. */
typedef void (*glm_task)(void *arg, int64_t part, int64_t parts);
enum { MAX_THREADS = 256, SPINS = 20000 };
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER, pool_busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_workers; /* started, ids 1..pool_workers */
static atomic_ulong pool_generation;
static atomic_int pool_pending;
static glm_task pool_task;
static void *pool_arg;
static int64_t pool_parts;
static unsigned long pool_born[MAX_THREADS]; /* the generation when worker i was started: it runs every later one */

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *pool_worker(void *self) {
    const int64_t id = (int64_t)(intptr_t)self;
    unsigned long seen = pool_born[id];
    for (;;) {
        unsigned long now = seen;
        for (int spin = 0; spin < SPINS && (now = atomic_load_explicit(&pool_generation, memory_order_acquire)) == seen; spin++) relax();
        if (now == seen) {
            pthread_mutex_lock(&pool_lock);
            while ((now = atomic_load(&pool_generation)) == seen) pthread_cond_wait(&pool_wake, &pool_lock);
            pthread_mutex_unlock(&pool_lock);
        }
        seen = now;
        if (id < pool_parts) pool_task(pool_arg, id, pool_parts);
        if (atomic_fetch_sub(&pool_pending, 1) == 1) {
            pthread_mutex_lock(&pool_lock);
            pthread_cond_broadcast(&pool_done);
            pthread_mutex_unlock(&pool_lock);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&pool_busy, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_workers = 0;
}

static void parallel(glm_task task, void *arg, int64_t parts) {
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    if (parts <= 1 || pthread_mutex_trylock(&pool_busy) != 0) {
        task(arg, 0, 1);
        return;
    }
    static int registered;
    if (!registered) registered = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool_workers < parts - 1) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        pool_born[pool_workers + 1] = atomic_load(&pool_generation);
        const int failed = pthread_create(&thread, &attributes, pool_worker, (void *)(intptr_t)(pool_workers + 1));
        pthread_attr_destroy(&attributes);
        if (failed) break;
        pool_workers++;
    }
    if (parts > pool_workers + 1) parts = pool_workers + 1;
    pool_task = task, pool_arg = arg, pool_parts = parts;
    atomic_store(&pool_pending, pool_workers);
    pthread_mutex_lock(&pool_lock);
    atomic_fetch_add_explicit(&pool_generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    task(arg, 0, parts);
    for (int spin = 0; spin < SPINS && atomic_load_explicit(&pool_pending, memory_order_acquire) > 0; spin++) relax();
    pthread_mutex_lock(&pool_lock);
    while (atomic_load(&pool_pending) > 0) pthread_cond_wait(&pool_done, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&pool_busy);
}

typedef struct {
    const glm_linear *l;
    const float *x;
    float *y;
    int bf16;
} linear_job;

static void linear_part(void *arg, int64_t part, int64_t parts) {
    const linear_job *job = arg;
    const int64_t total = units(job->l);
    linear_units(job->l, job->x, job->y, job->bf16, total * part / parts, total * (part + 1) / parts);
}

static void linear(const glm_linear *l, const float *x, float *y, int bf16, int64_t threads) {
    linear_job job = {l, x, y, bf16};
    const int64_t total = units(l);
    parallel(linear_part, &job, threads < total ? threads : total);
}

static void layer_norm(const float *x, const void *weight, const void *bias, int64_t n, float eps, int bf16, float *y) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) var += ((double)x[i] - mean) * ((double)x[i] - mean);
    const float inv_std = (float)(1.0 / sqrt(var / (double)n + eps)), m = (float)mean;
    for (int64_t i = 0; i < n; i++)
        y[i] = (x[i] - m) * inv_std * (weight ? load(weight, i, bf16) : 1.0f) + (bias ? load(bias, i, bf16) : 0.0f);
}

static inline float gelu(float x, int tanh_gelu) {
    if (tanh_gelu) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

/* RoPE on one head vector: every rotary_dim slice turns its halves, x*cos + roll(x, half)*signed_sin
 * (signed_sin has the first half of each slice negated, as GLM._rope_tables makes it). */
static void rotate(const float *x, const void *cos, const void *signed_sin, int64_t head_dim, int64_t rotary_dim, int bf16, float *out) {
    const int64_t half = rotary_dim / 2;
    for (int64_t s = 0; s < head_dim; s += rotary_dim)
        for (int64_t i = 0; i < rotary_dim; i++) {
            const int64_t partner = s + (i < half ? i + half : i - half);
            out[s + i] = x[s + i] * load(cos, s + i, bf16) + x[partner] * load(signed_sin, s + i, bf16);
        }
}

static void store(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((bf16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* Softmax attention of one query over keys 0..start (those with mask[t] != 0, or all when mask is
 * NULL) of one head; the new key and value are already in the cache at `start`. */
static void attend(const float *q, const void *keys, const void *values, int64_t position_stride, int64_t start,
                   const uint8_t *mask, int64_t head_dim, int bf16, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    float best = -INFINITY;
    for (int64_t t = 0; t <= start; t++) {
        if (mask && !mask[t]) {
            scores[t] = -INFINITY;
            continue;
        }
        float dot = 0;
        for (int64_t i = 0; i < head_dim; i++) dot += q[i] * load(keys, t * position_stride + i, bf16);
        scores[t] = dot * scale;
        if (scores[t] > best) best = scores[t];
    }
    float total = 0;
    for (int64_t t = 0; t <= start; t++) {
        scores[t] = scores[t] == -INFINITY ? 0.0f : expf(scores[t] - best);
        total += scores[t];
    }
    for (int64_t i = 0; i < head_dim; i++) out[i] = 0;
    for (int64_t t = 0; t <= start; t++) {
        if (scores[t] == 0.0f) continue;
        const float p = scores[t] / total;
        for (int64_t i = 0; i < head_dim; i++) out[i] += p * load(values, t * position_stride + i, bf16);
    }
}

/* fp32 scratch floats that openglm_decode_row needs for a cache of `capacity` positions and
 * `threads` threads (each a query, a key and the scores of one head). */
int64_t openglm_scratch_floats(const glm_model *m, int64_t capacity, int64_t threads) {
    const glm_layer *l = &m->layers_array[0];
    return 4 * m->hidden + l->qkv.out_features + l->up.out_features + threads * (2 * m->head_dim + capacity);
}

/* Heads `part * heads / parts` up to the next part's: RoPE, the cache write and attention. */
typedef struct {
    const glm_model *m;
    const glm_cache *cache;
    const void *cos, *signed_sin;
    const uint8_t *mask;
    const float *qkv;
    float *attention, *work; /* work: per part, query [head_dim], key [head_dim], scores [capacity] */
    int64_t layer, start, work_floats;
} attention_job;

static void attention_part(void *arg, int64_t part, int64_t parts) {
    const attention_job *job = arg;
    const glm_model *m = job->m;
    const glm_cache *cache = job->cache;
    const int bf16 = m->bf16;
    const int64_t head_dim = m->head_dim, start = job->start;
    float *query = job->work + part * job->work_floats, *key = query + head_dim, *scores = key + head_dim;
    for (int64_t j = m->heads * part / parts; j < m->heads * (part + 1) / parts; j++) {
        const float *head = job->qkv + j * 3 * head_dim;
        rotate(head, job->cos, job->signed_sin, head_dim, m->rotary_dim, bf16, query);
        rotate(head + head_dim, job->cos, job->signed_sin, head_dim, m->rotary_dim, bf16, key);
        const int64_t offset = job->layer * cache->layer_stride + j * cache->head_stride;
        const int64_t at = offset + start * cache->position_stride;
        for (int64_t i = 0; i < head_dim; i++) {
            store(cache->keys, at + i, key[i], bf16);
            store(cache->values, at + i, head[2 * head_dim + i], bf16);
        }
        const size_t bytes = bf16 ? sizeof(bf16_t) : sizeof(float);
        attend(query, (const char *)cache->keys + offset * bytes, (const char *)cache->values + offset * bytes,
               cache->position_stride, start, job->mask, head_dim, bf16, scores, job->attention + j * head_dim);
    }
}

/* The FFN's activation in place: up[i] = up[i] * gelu(up[ffn + i]) (GeGLU) or gelu(up[i]). */
typedef struct {
    const glm_model *m;
    float *up;
} activation_job;

static void activation_part(void *arg, int64_t part, int64_t parts) {
    const activation_job *job = arg;
    const glm_model *m = job->m;
    const int64_t ffn = m->ffn_hidden;
    float *up = job->up;
    for (int64_t i = ffn * part / parts; i < ffn * (part + 1) / parts; i++)
        up[i] = m->geglu ? up[i] * gelu(up[ffn + i], m->tanh_gelu) : gelu(up[i], m->tanh_gelu);
}

/* Logits [vocab] (fp32) of `token` fed at position `start` of one row, whose cache holds the
 * positions before it; writes the token's keys and values at `start`. `cos`/`signed_sin`: the
 * row's rotary tables at that position ([head_dim], the model's dtype); `mask`: the row's padding
 * mask over positions 0..start (nonzero: a real token), or NULL; `scratch`: openglm_scratch_floats
 * for the cache's capacity and `threads`, the threads to split the work over (1: this one only). */
void openglm_decode_row(const glm_model *m, int64_t token, const void *cos, const void *signed_sin, const glm_cache *cache,
                        int64_t start, const uint8_t *mask, float *logits, float *scratch, int64_t threads) {
    const int bf16 = m->bf16;
    const int64_t hidden = m->hidden, heads = m->heads;
    const glm_layer *first = &m->layers_array[0];
    float *h = scratch, *y = h + hidden, *attention = y + hidden, *branch = attention + hidden;
    float *qkv = branch + hidden, *up = qkv + first->qkv.out_features, *work = up + first->up.out_features;
    threads = threads < 1 ? 1 : threads;
    attention_job attend_job = {m, cache, cos, signed_sin, mask, qkv, attention, work, 0, start, 2 * m->head_dim + start + 1};
    activation_job activate_job = {m, up};

    for (int64_t i = 0; i < hidden; i++) h[i] = load(m->embedding, token * hidden + i, bf16);
    for (int64_t index = 0; index < m->layers; index++) {
        const glm_layer *l = &m->layers_array[index];
        layer_norm(h, l->norm1_weight, l->norm1_bias, hidden, m->eps, bf16, y);
        linear(&l->qkv, y, qkv, bf16, threads);
        attend_job.layer = index;
        parallel(attention_part, &attend_job, threads < heads ? threads : heads);
        /* DeepNorm: h = f(y) + alpha * y, y the normalised input of the sublayer. */
        linear(&l->dense, attention, branch, bf16, threads);
        for (int64_t i = 0; i < hidden; i++) h[i] = branch[i] + m->alpha * y[i];
        layer_norm(h, l->norm2_weight, l->norm2_bias, hidden, m->eps, bf16, y);
        linear(&l->up, y, up, bf16, threads);
        parallel(activation_part, &activate_job, threads);
        linear(&l->down, up, branch, bf16, threads);
        for (int64_t i = 0; i < hidden; i++) h[i] = branch[i] + m->alpha * y[i];
    }
    layer_norm(h, m->final_norm_weight, m->final_norm_bias, hidden, m->eps, bf16, y);
    linear(&m->head, y, logits, bf16, threads);
}

/* What openglm/native.py checks on load: a library whose structs differ from its ctypes mirrors
 * would read every pointer at the wrong offset, so a mismatch is refused, not called. */
#define OPENGLM_ABI_VERSION 2
int openglm_abi_version(void) { return OPENGLM_ABI_VERSION; }
size_t openglm_sizeof_linear(void) { return sizeof(glm_linear); }
size_t openglm_sizeof_layer(void) { return sizeof(glm_layer); }
size_t openglm_sizeof_model(void) { return sizeof(glm_model); }
size_t openglm_sizeof_cache(void) { return sizeof(glm_cache); }
