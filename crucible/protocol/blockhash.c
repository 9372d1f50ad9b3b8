/* crucible.protocol._blockhash: the xxh64 (seed 0) of each block of a buffer,
 * in one call. Part of the compiled build (scripts/compile); integrity.py
 * falls back to the xxhash package without it, with the same results.
 *
 * Why by hand: every MiB written is hashed in four processes (the upstairs,
 * and each downstairs to check it), 256 blocks each. The xxhash package takes
 * one block per call, one 64-bit lane at a time. xxh64 keeps four
 * accumulators per block in a 32-byte stripe, so with AVX-512 (VL and DQ:
 * 64-bit multiplies on 256-bit vectors) one vector register holds a block's
 * four, loaded straight from the data with no shuffling, and eight blocks
 * run side by side: about 4x faster here. The tail of each block (past its
 * last whole stripe) and the final mixing are scalar, shared with the
 * scalar path, which serves CPUs without AVX-512 and the last blocks of a
 * buffer that do not make a group of eight.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_VECTOR 1
#else
#define HAVE_VECTOR 0
#endif

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL
#define STRIPE 32
#define GROUP 8 /* blocks hashed side by side */
#define RELEASE_GIL_BYTES (64 * 1024)

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t read64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian hosts only: see module init */
    return v;
}

static inline uint32_t read32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t round64(uint64_t acc, uint64_t input)
{
    acc += input * P2;
    return rotl(acc, 31) * P1;
}

static inline uint64_t merge(uint64_t acc, uint64_t v)
{
    acc ^= round64(0, v);
    return acc * P1 + P4;
}

/* The hash of a `len`-byte block from its accumulators after its whole
 * stripes; `tail` is what follows them (len % 32 bytes). */
static uint64_t finish(const uint64_t acc[4], const uint8_t *tail, size_t len)
{
    uint64_t h;
    size_t rest = len % STRIPE;
    if (len >= STRIPE) {
        h = rotl(acc[0], 1) + rotl(acc[1], 7) + rotl(acc[2], 12) + rotl(acc[3], 18);
        for (int i = 0; i < 4; i++)
            h = merge(h, acc[i]);
    } else {
        h = P5;
    }
    h += (uint64_t)len;
    for (; rest >= 8; rest -= 8, tail += 8)
        h = rotl(h ^ round64(0, read64(tail)), 27) * P1 + P4;
    if (rest >= 4) {
        h = rotl(h ^ ((uint64_t)read32(tail) * P1), 23) * P2 + P3;
        rest -= 4;
        tail += 4;
    }
    for (; rest; rest--, tail++)
        h = rotl(h ^ (*tail * P5), 11) * P1;
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

static uint64_t hash_one(const uint8_t *p, size_t len)
{
    uint64_t acc[4] = {P1 + P2, P2, 0, (uint64_t)0 - P1};
    size_t stripes = len / STRIPE;
    for (size_t s = 0; s < stripes; s++, p += STRIPE)
        for (int i = 0; i < 4; i++)
            acc[i] = round64(acc[i], read64(p + 8 * i));
    return finish(acc, p, len);
}

#if HAVE_VECTOR
__attribute__((target("avx512f,avx512dq,avx512vl"))) static void
hash_group(const uint8_t *p, size_t bs, uint64_t *out)
{
    const __m256i p1 = _mm256_set1_epi64x((long long)P1);
    const __m256i p2 = _mm256_set1_epi64x((long long)P2);
    const __m256i init = _mm256_set_epi64x(-(long long)P1, 0, (long long)P2, (long long)(P1 + P2));
    size_t stripes = bs / STRIPE;
    __m256i acc[GROUP];
    for (int k = 0; k < GROUP; k++)
        acc[k] = init;
    for (size_t s = 0; s < stripes; s++)
        for (int k = 0; k < GROUP; k++) {
            __m256i in = _mm256_loadu_si256((const void *)(p + k * bs + s * STRIPE));
            __m256i a = _mm256_add_epi64(acc[k], _mm256_mullo_epi64(in, p2));
            acc[k] = _mm256_mullo_epi64(_mm256_rol_epi64(a, 31), p1);
        }
    for (int k = 0; k < GROUP; k++) {
        uint64_t lanes[4];
        _mm256_storeu_si256((void *)lanes, acc[k]);
        out[k] = finish(lanes, p + k * bs + stripes * STRIPE, bs);
    }
}
#endif

static int vector_ok; /* the CPU runs hash_group */

/* The hash of each `bs`-byte block of p[0:len], the last one short if len is
 * not a multiple of bs (as slicing would give). */
static void hash_blocks(const uint8_t *p, size_t len, size_t bs, int vector, uint64_t *out)
{
    size_t n = len / bs, k = 0;
#if HAVE_VECTOR
    if (vector && vector_ok && bs >= STRIPE)
        for (; k + GROUP <= n; k += GROUP)
            hash_group(p + k * bs, bs, out + k);
#else
    (void)vector;
#endif
    for (; k < n; k++)
        out[k] = hash_one(p + k * bs, bs);
    if (len % bs)
        out[n] = hash_one(p + n * bs, len % bs);
}

static PyObject *block_hashes(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t bs;
    int vector = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*n|p:block_hashes", &view, &bs, &vector))
        return NULL;
    if (bs <= 0) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "block size %zd is not positive", bs);
    }
    size_t len = (size_t)view.len, count = (len + (size_t)bs - 1) / (size_t)bs;
    uint64_t one, *out = count > 1 ? PyMem_RawMalloc(count * sizeof(uint64_t)) : &one;
    if (out == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    if (len >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        hash_blocks(view.buf, len, (size_t)bs, vector, out);
        Py_END_ALLOW_THREADS
    } else if (len) {
        hash_blocks(view.buf, len, (size_t)bs, vector, out);
    }
    PyBuffer_Release(&view);
    PyObject *list = PyList_New((Py_ssize_t)count);
    for (size_t k = 0; list != NULL && k < count; k++) {
        PyObject *h = PyLong_FromUnsignedLongLong(out[k]);
        if (h == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)k, h);
    }
    if (out != &one)
        PyMem_RawFree(out);
    return list;
}

static PyMethodDef methods[] = {
    {"block_hashes", block_hashes, METH_VARARGS,
     "block_hashes(data, block_size, vector=True) -> list[int]\n\n"
     "xxh64 (seed 0) of each block_size bytes of data, the last block short\n"
     "if the length is not a multiple. vector=False takes the scalar path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_blockhash",
    .m_doc = "xxh64 of each block of a buffer, in one call.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__blockhash(void)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    /* read64 takes the host's order; xxh64 reads little-endian words. */
    PyErr_SetString(PyExc_ImportError, "_blockhash: little-endian hosts only");
    return NULL;
#endif
#if HAVE_VECTOR
    __builtin_cpu_init();
    vector_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vl");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VECTOR", vector_ok) < 0)
        Py_CLEAR(m);
    return m;
}
