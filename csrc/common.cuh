// Shared device helpers of fdpg's CUDA kernels: dtype tags, 16-byte vector loads and stores, fast exp2.
// Plain CUDA (no torch headers), so every .cu file compiles with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

namespace fdpg {

// dtype codes shared with the binding (csrc/binding.cpp) and fdpg/_cuda.py.
enum DtypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kMaxFloat = 3.402823466e38f;

// 2^x with the hardware approximation (max relative error 2^-22); 2^-inf = 0, results below 2^-126 flush to 0.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ---- dtype tags: raw storage type, scalar load/store, and decoding of packed 32-bit words -----------------

struct F32 {
    using raw = float;
    static constexpr int code = kF32;
    static constexpr int per_word = 1;
    __device__ __forceinline__ static float load(raw r) { return r; }
    __device__ __forceinline__ static raw store(float f) { return f; }
    __device__ __forceinline__ static void unpack(uint32_t w, float* f) { f[0] = __uint_as_float(w); }
    __device__ __forceinline__ static uint32_t pack(const float* f) { return __float_as_uint(f[0]); }
};

struct BF16 {
    using raw = uint16_t;
    static constexpr int code = kBF16;
    static constexpr int per_word = 2;
    __device__ __forceinline__ static float load(raw r) { return __uint_as_float(static_cast<uint32_t>(r) << 16); }
    __device__ __forceinline__ static raw store(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
    __device__ __forceinline__ static void unpack(uint32_t w, float* f) {
        f[0] = __uint_as_float(w << 16);
        f[1] = __uint_as_float(w & 0xffff0000u);
    }
    __device__ __forceinline__ static uint32_t pack(const float* f) {
        __nv_bfloat162 h = __floats2bfloat162_rn(f[0], f[1]);  // .x = f[0] in the low half
        uint32_t w;
        memcpy(&w, &h, 4);
        return w;
    }
};

struct F16 {
    using raw = uint16_t;
    static constexpr int code = kF16;
    static constexpr int per_word = 2;
    __device__ __forceinline__ static float load(raw r) { return __half2float(__ushort_as_half(r)); }
    __device__ __forceinline__ static raw store(float f) { return __half_as_ushort(__float2half_rn(f)); }
    __device__ __forceinline__ static void unpack(uint32_t w, float* f) {
        f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
        f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
    }
    __device__ __forceinline__ static uint32_t pack(const float* f) {
        __half2 h = __floats2half2_rn(f[0], f[1]);
        uint32_t w;
        memcpy(&w, &h, 4);
        return w;
    }
};

// ---- vector memory access: NW 32-bit words from an address aligned to min(16, 4 * NW) bytes ----------------

template <int NW>
__device__ __forceinline__ void load_words(const void* p, uint32_t (&w)[NW]) {
    static_assert(NW == 1 || NW == 2 || NW % 4 == 0, "unsupported vector width");
    if constexpr (NW == 1) {
        w[0] = __ldcs(reinterpret_cast<const unsigned int*>(p));
    } else if constexpr (NW == 2) {
        const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
        w[0] = v.x;
        w[1] = v.y;
    } else {
#pragma unroll
        for (int k = 0; k < NW / 4; ++k) {
            const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p) + k);
            w[4 * k + 0] = v.x;
            w[4 * k + 1] = v.y;
            w[4 * k + 2] = v.z;
            w[4 * k + 3] = v.w;
        }
    }
}

template <int NW>
__device__ __forceinline__ void store_words(void* p, const uint32_t (&w)[NW]) {
    static_assert(NW == 1 || NW == 2 || NW % 4 == 0, "unsupported vector width");
    if constexpr (NW == 1) {
        __stcs(reinterpret_cast<unsigned int*>(p), w[0]);
    } else if constexpr (NW == 2) {
        __stcs(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
    } else {
#pragma unroll
        for (int k = 0; k < NW / 4; ++k)
            __stcs(reinterpret_cast<uint4*>(p) + k, make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]));
    }
}

// N elements of dtype K as float, from an address aligned to min(16, N * sizeof(raw)) bytes.
template <class K, int N>
__device__ __forceinline__ void load_vec(const typename K::raw* p, float (&f)[N]) {
    constexpr int NW = N / K::per_word;
    static_assert(NW * K::per_word == N, "vector width must fill whole 32-bit words");
    uint32_t w[NW];
    load_words<NW>(p, w);
#pragma unroll
    for (int i = 0; i < NW; ++i) K::unpack(w[i], f + i * K::per_word);
}

template <class K, int N>
__device__ __forceinline__ void store_vec(typename K::raw* p, const float (&f)[N]) {
    constexpr int NW = N / K::per_word;
    static_assert(NW * K::per_word == N, "vector width must fill whole 32-bit words");
    uint32_t w[NW];
#pragma unroll
    for (int i = 0; i < NW; ++i) w[i] = K::pack(f + i * K::per_word);
    store_words<NW>(p, w);
}

// Dispatch a dtype code to its tag: f(F32{}) etc. Returns cudaErrorInvalidValue for an unknown code.
template <class Fn>
inline cudaError_t dispatch_dtype(int code, Fn&& fn) {
    switch (code) {
        case kF32: return fn(F32{});
        case kF16: return fn(F16{});
        case kBF16: return fn(BF16{});
        default: return cudaErrorInvalidValue;
    }
}

inline unsigned int rows_grid(int64_t rows) {
    return static_cast<unsigned int>(rows < 0x7fffffffLL ? rows : 0x7fffffffLL);
}

}  // namespace fdpg
