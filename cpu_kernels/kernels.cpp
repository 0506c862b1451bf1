// Fused CPU optimizer steps: every family's whole update in one pass over memory, over many tensors
// per call (pointer tables), OpenMP threads over fixed-size chunks, fp32 math.
//
// The arithmetic follows dist_optim.functional's torch path operation by operation, in the same order
// and with the same roundings (checked bit for bit against torch 2.13's CPU kernels): add-with-alpha,
// lerp and addcmul (self + (value * t1) * t2) are fused multiply-adds there (std::fma here);
// addcdiv (self + (value * t1) / t2), mul, true division by a scalar and sqrt are separate roundings
// (this file is built with -ffp-contract=off so the compiler fuses nothing else). Scalars arrive as fp32, as torch casts a
// Python scalar to the fp32 op type. bf16/fp16 params and grads are widened to fp32 in a small
// L1-resident block buffer and the result rounded to nearest even, as Tensor.copy_ does.
//
// int8 state (dist_optim.state's format: uint8 codes, one fp32 absmax per 256-element block from the
// tensor's element 0): a staged block of up to 1024 elements is dequantized into an fp32 buffer
// (code[c] * absmax), the family's fp32 math runs on it unchanged, and each 256-element block is
// quantized back from the buffer (absmax, then per element the count of thresholds t with
// t * absmax < x, the product rounded on its own as the torch reference computes it). Chunk and block
// starts are multiples of 256, so no quantization block straddles two threads or two staged blocks.
// Moments computed bit for bit as the torch path computes them therefore get its codes bit for bit.
//
// bf16 params can be written three ways (dist_optim.state.rounding): to nearest; stochastically, 16
// bits of a murmur3-finalizer hash of (stream, element index) added below the last kept bit; or
// through a bf16 Kahan buffer. Slow weights (Lookahead) may be stored in fp32, bf16 or fp16: widened
// into the block buffer, pulled in fp32, rounded back to nearest.
//
// No torch headers: plain C ABI, loaded with ctypes. OpenMP calls resolve to the libgomp torch has
// already loaded (same soname), so there is one thread pool in the process.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <type_traits>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <omp.h>

namespace {

enum Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };
constexpr int64_t BLOCK = 1024;    // elements staged in fp32 at a time (4 KiB per stream)
constexpr int64_t CHUNK = 32768;   // elements per unit of parallel work
constexpr int64_t QBLOCK = 256;    // int8 state: elements per absmax (dist_optim.state.layout.QBLOCK)
static_assert(BLOCK % QBLOCK == 0 && CHUNK % QBLOCK == 0, "a quantization block must lie in one staged block");
constexpr int CODES = 256;         // entries of a code map; its threshold table is padded to as many

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // c10::BFloat16's round_to_nearest_even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7FC0) : uint16_t(rounded);
}
inline float f16_to_f32_scalar(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
  if (exp == 0) {
    if (man == 0) { u = sign; }
    else {  // subnormal
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) { u = sign | 0x7F800000u | man << 13; }
  else { u = sign | (exp + 112) << 23 | man << 13; }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16_scalar(float f) {  // round to nearest even (as F16C's vcvtps2ph)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFF;
  if (a >= 0x7F800000) return uint16_t(sign | 0x7C00 | (a > 0x7F800000 ? 0x200 | ((a >> 13) & 0x3FF) : 0));
  if (a >= 0x477FF000) return uint16_t(sign | 0x7C00);  // rounds to inf
  if (a < 0x38800000) {  // subnormal or zero in fp16
    if (a < 0x33000000) return uint16_t(sign);
    uint32_t e = a >> 23, man = (a & 0x7FFFFF) | 0x800000, shift = 126 - e;
    uint32_t r = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = a - 0x38000000;  // rebias exponent
  r = (r + 0xFFF + ((r >> 13) & 1)) >> 13;
  return uint16_t(sign | r);
}

// Widen n elements to fp32: fp32 data is used in place, others are converted into buf.
template <int D>
inline float* load(void* base, int64_t off, int64_t n, float* buf) {
  if constexpr (D == F32) {
    return static_cast<float*>(base) + off;
  } else if constexpr (D == BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(s[i]);
    return buf;
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) buf[i] = f16_to_f32_scalar(s[i]);
    return buf;
  }
}

// Round n fp32 results back into a low-precision tensor (nothing to do for fp32: updated in place).
template <int D>
inline void store(void* base, int64_t off, int64_t n, const float* buf) {
  if constexpr (D == BF16) {
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(buf[i]);
  } else if constexpr (D == F16) {
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i) d[i] = f32_to_f16_scalar(buf[i]);
  }
}

// torch's lerp with a scalar weight (ATen lerp_vec): small weight fma(w, e - s, s), else fma(w - 1, e - s, e).
inline float lerp(float s, float e, float w, float wm1, bool small) {
  return small ? std::fma(w, e - s, s) : std::fma(wm1, e - s, e);
}
inline float nan_max(float a, float b) {  // torch.maximum propagates NaN
  float r = a > b ? a : b;
  r = (b != b) ? b : r;
  return (a != a) ? a : r;
}


// ---- int8 state --------------------------------------------------------------------------------
// How a state role is stored: fp32, or int8 codes against the signed or the unsigned code map.
// Slow weights may be stored in bf16 or fp16 (widened into the block buffer like int8 roles).
enum StateKind : int { FP32_STATE = 0, SIGNED_INT8 = 1, UNSIGNED_INT8 = 2, BF16_STATE = 3, F16_STATE = 4 };
inline bool is_int8(int kind) { return kind == SIGNED_INT8 || kind == UNSIGNED_INT8; }

// The code maps and their threshold tables, as dist_optim.state.codes builds them: per kind, CODES
// fp32 values then CODES thresholds (255 midpoints and a +inf pad the search never reads).
struct CodeMap { const float* value; const float* threshold; };

inline CodeMap code_map(const float* tables, int kind) {
  const float* base = tables + (kind == SIGNED_INT8 ? 0 : 2 * CODES);
  return CodeMap{base, base + CODES};
}

// n values of a staged block starting at a block boundary: code[c] * absmax of the element's block.
inline void dequantize(const uint8_t* __restrict codes, const float* __restrict absmax, int64_t n,
                       const float* __restrict value, float* __restrict out) {
  for (int64_t b = 0; b < n; b += QBLOCK) {
    const float a = absmax[b / QBLOCK];
    const int64_t m = std::min(QBLOCK, n - b);
    for (int64_t i = 0; i < m; ++i) out[b + i] = value[codes[b + i]] * a;
  }
}

// The largest |x| of m values, NaN if one is NaN (as torch's amax): on the bits, where clearing the
// sign makes the integer order the float order and puts every NaN above inf — an integer max
// vectorizes where a float one that must keep NaN does not.
inline float absmax_of(const float* __restrict x, int64_t m) {
  uint32_t top = 0;
  for (int64_t i = 0; i < m; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    u &= 0x7FFFFFFFu;
    top = u > top ? u : top;
  }
  float a;
  std::memcpy(&a, &top, 4);
  return a;
}

// The search of one element against a block's scaled thresholds, in scalar code: branch-free, pos
// ends as the number of scaled thresholds strictly below v (they ascend, so a step of 2^j tests
// the last of the next 2^j of them).
inline uint8_t search(const float* scaled, float v) {
  int pos = 0;
  for (int step = 128; step >= 1; step >>= 1) pos += scaled[pos + step - 1] < v ? step : 0;
  return uint8_t(pos);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DIST_OPTIM_SEARCH16 1
// The same search for 16 elements in registers, without gathers (slow on x86: 4 of them took 3 ns
// an element on Zen 4, this ~0.6). The thresholds are held as 16 columns, cols[k][j] = the
// threshold 16j + k scaled by the block's absmax (each the same product as the scalar search's).
// The first four steps test the last threshold of a group of 16 (column 15) and pick the group g,
// a lane-wise permute; the last four search inside the group: step 8 reads column 7 at g, step 4
// column 3 or 11, step 2 one of 1, 5, 9, 13, step 1 one of the even columns, each a two-register
// permute (index bit 4 picks the second column of a pair) and blends on the bits found so far.
template <int U>
inline void search16(const __m512* cols, const float* x, uint8_t* codes) {
  __m512 v[U];
  __m512i g[U], f[U];
  for (int u = 0; u < U; ++u) {
    v[u] = _mm512_loadu_ps(x + 16 * u);
    g[u] = _mm512_setzero_si512();
    f[u] = _mm512_setzero_si512();
  }
  auto add_if_below = [](__m512i pos, __m512 t, __m512 val, int step) {
    return _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(t, val, _CMP_LT_OQ), pos, _mm512_set1_epi32(step));
  };
  auto pick = [](__m512i gg, __m512i ff, int shift) {  // gg, with bit 4 set where bit `shift` of ff is
    return _mm512_or_si512(gg, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(ff, shift), _mm512_set1_epi32(1)), 4));
  };
  auto bit = [](__m512i ff, int b) { return _mm512_test_epi32_mask(ff, _mm512_set1_epi32(1 << b)); };
  for (int step = 8; step >= 1; step >>= 1)
    for (int u = 0; u < U; ++u)
      g[u] = add_if_below(g[u], _mm512_permutexvar_ps(_mm512_add_epi32(g[u], _mm512_set1_epi32(step - 1)), cols[15]),
                          v[u], step);
  for (int u = 0; u < U; ++u) f[u] = add_if_below(f[u], _mm512_permutexvar_ps(g[u], cols[7]), v[u], 8);
  for (int u = 0; u < U; ++u)
    f[u] = add_if_below(f[u], _mm512_permutex2var_ps(cols[3], pick(g[u], f[u], 3), cols[11]), v[u], 4);
  for (int u = 0; u < U; ++u) {
    const __m512i idx = pick(g[u], f[u], 2);
    const __m512 lo = _mm512_permutex2var_ps(cols[1], idx, cols[5]);
    const __m512 hi = _mm512_permutex2var_ps(cols[9], idx, cols[13]);
    f[u] = add_if_below(f[u], _mm512_mask_blend_ps(bit(f[u], 3), lo, hi), v[u], 2);
  }
  for (int u = 0; u < U; ++u) {
    const __m512i idx = pick(g[u], f[u], 1);
    const __m512 t0 = _mm512_permutex2var_ps(cols[0], idx, cols[2]);
    const __m512 t1 = _mm512_permutex2var_ps(cols[4], idx, cols[6]);
    const __m512 t2 = _mm512_permutex2var_ps(cols[8], idx, cols[10]);
    const __m512 t3 = _mm512_permutex2var_ps(cols[12], idx, cols[14]);
    const __mmask16 b2 = bit(f[u], 2);
    const __m512 t = _mm512_mask_blend_ps(bit(f[u], 3), _mm512_mask_blend_ps(b2, t0, t1), _mm512_mask_blend_ps(b2, t2, t3));
    f[u] = add_if_below(f[u], t, v[u], 1);
  }
  for (int u = 0; u < U; ++u)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16 * u),
                     _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_slli_epi32(g[u], 4), f[u])));
}
#endif

// A code map's thresholds for quantize: as given (256, ascending) and transposed into 16 columns of
// 16 (columns[k * 16 + j] = threshold[16 j + k]) for the vector search.
struct Thresholds { const float* sorted; const float* columns; };

inline void transpose16(const float* threshold, float* columns) {
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j) columns[k * 16 + j] = threshold[16 * j + k];
}

// Codes and absmax of n fp32 values from a block boundary (the tail block may be partial: the
// elements past the end would enter as 0.0, which cannot raise an absmax, so they are left out).
inline void quantize(const float* __restrict x, int64_t n, const Thresholds& thr, uint8_t* __restrict codes,
                     float* __restrict absmax) {
  alignas(64) float scaled[CODES];
  for (int64_t b = 0; b < n; b += QBLOCK) {
    const int64_t m = std::min(QBLOCK, n - b);
    const float a = absmax_of(x + b, m);
    absmax[b / QBLOCK] = a;
    if (!(a < INFINITY)) {  // inf or NaN: all code 0, the absmax keeps the step's non-finite value visible
      std::memset(codes + b, 0, size_t(m));
      continue;
    }
    const float scale = a == 0.0f ? 1.0f : a;
    int64_t i = 0;
#ifdef DIST_OPTIM_SEARCH16
    __m512 cols[16];
    for (int k = 0; k < 16; ++k) cols[k] = _mm512_mul_ps(_mm512_loadu_ps(thr.columns + 16 * k), _mm512_set1_ps(scale));
    // Four vectors at a time: each search is a chain of dependent permutes, and independent chains
    // keep the permute unit busy where one waits on its own latency (four: ~20% faster than two).
    for (; i + 64 <= m; i += 64) search16<4>(cols, x + b + i, codes + b + i);
    for (; i + 32 <= m; i += 32) search16<2>(cols, x + b + i, codes + b + i);
    for (; i + 16 <= m; i += 16) search16<1>(cols, x + b + i, codes + b + i);
    if (i == m) continue;
#endif
    // The scaled thresholds once per block: each is the reference's product threshold * scale.
    for (int k = 0; k < CODES; ++k) scaled[k] = thr.sorted[k] * scale;
    for (; i < m; ++i) codes[b + i] = search(scaled, x[b + i]);
  }
}

// ---- bf16 param writes (dist_optim.state.rounding) ----------------------------------------------
enum RoundMode : int { NEAREST = 0, STOCHASTIC = 1, KAHAN = 2 };

inline uint32_t fmix32(uint32_t h) {  // murmur3's finalizer; uint32 multiplications wrap as the reference's
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// n results from element `first` of the tensor, rounded stochastically with the tensor's stream:
// 16 bits of hash32(stream, index) added below bf16's last mantissa bit, then truncated.
inline void store_stochastic(uint16_t* __restrict d, const float* __restrict x, int64_t n, int64_t first,
                             uint32_t stream) {
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t index = uint64_t(first + i);
    const uint32_t key = fmix32(stream ^ fmix32(uint32_t(index >> 32)));
    const uint32_t rand = fmix32(key ^ fmix32(uint32_t(index))) & 0xFFFFu;
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    const uint16_t out = uint16_t((bits + rand) >> 16);
    d[i] = x[i] != x[i] ? uint16_t(0x7FC0) : out;
  }
}

// n results added to the bf16 params through their bf16 compensation (kahan_add_bf16): the update is
// the result minus the old param, both fp32; d holds the old params until overwritten here.
inline void store_kahan(uint16_t* __restrict d, uint16_t* __restrict comp, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float old = bf16_to_f32(d[i]);
    const float y = (x[i] - old) + bf16_to_f32(comp[i]);
    const uint16_t now = f32_to_bf16(old + y);
    comp[i] = f32_to_bf16(y - (bf16_to_f32(now) - old));
    d[i] = now;
  }
}

// How a call writes its bf16 params: the mode, and per tensor of the bucket its stream
// (stochastic) or its compensation buffer (Kahan).
struct Rounding {
  int mode;
  const uint32_t* streams;
  void* const* comps;
};

// Every element-wise family: one block of n elements, fp32 p (in/out), fp32 grads (read), states.
struct Args {
  const float* sc;  // scalars, meaning per family
  const int* fl;    // flags, meaning per family
  int slow;         // Dtype the slow weights are stored in (Lookahead, Ranger's sync)
};

// A value as it reads back after being stored in dtype D (round to nearest even).
template <int D>
inline float round_trip(float x) {
  if constexpr (D == BF16) return bf16_to_f32(f32_to_bf16(x));
  else if constexpr (D == F16) return f16_to_f32_scalar(f32_to_f16_scalar(x));
  else return x;
}

// The Lookahead pull: slow = slow + alpha * (fast - slow) in fp32 (one fused multiply-add, as
// torch's add with alpha), stored in the slow weights' dtype, and the fast weights take the stored
// value (the torch path copies the stored slow weights into the fp32 params).
inline void pull(float* __restrict p, float* __restrict slow, int64_t n, float la, int slow_dtype) {
  auto loop = [&](auto d_c) {
    constexpr int D = decltype(d_c)::value;
    for (int64_t i = 0; i < n; ++i) {
      float s = round_trip<D>(std::fma(p[i] - slow[i], la, slow[i]));
      slow[i] = s;
      p[i] = s;
    }
  };
  if (slow_dtype == BF16) loop(std::integral_constant<int, BF16>{});
  else if (slow_dtype == F16) loop(std::integral_constant<int, F16>{});
  else loop(std::integral_constant<int, F32>{});
}

enum Family : int { SGD = 0, ADAGRAD = 1, RMSPROP = 2, ADAM = 3, RADAM = 4, LOOKAHEAD = 5 };

template <int F>
void block(float* __restrict p, const float* __restrict gin, float* const* S, int64_t n, const Args& a) {
  const float* c = a.sc;
  const int* f = a.fl;
  using T = std::true_type;
  using N = std::false_type;
  // Every loop below is one pass with every switch a compile-time constant (a branch inside a loop
  // keeps GCC from vectorizing it); the grad scale and coupled weight decay are folded in.
  if constexpr (F == SGD) {
    // sc: grad_scale, weight_decay, momentum, 1 - dampening, -lr ; fl: has_wd, has_momentum, first_step, nesterov
    float* __restrict buf = S[0];
    const float gs = c[0], wd = c[1], mom = c[2], keep = c[3], nlr = c[4];
    auto loop = [&](auto wd_c, auto mom_c, auto nest_c) {
      constexpr bool WD = decltype(wd_c)::value, NEST = decltype(nest_c)::value;
      constexpr int MOM = decltype(mom_c)::value;  // 0 none, 1 first step (buf = g), 2 later steps
      for (int64_t i = 0; i < n; ++i) {
        float pi = p[i];
        float gi = gin[i] * gs;
        if constexpr (WD) gi = std::fma(pi, wd, gi);
        float d = gi;
        if constexpr (MOM > 0) {
          float b = MOM == 1 ? gi : std::fma(gi, keep, buf[i] * mom);
          buf[i] = b;
          d = NEST ? std::fma(b, mom, gi) : b;
        }
        p[i] = std::fma(d, nlr, pi);
      }
    };
    using M0 = std::integral_constant<int, 0>;
    using M1 = std::integral_constant<int, 1>;
    using M2 = std::integral_constant<int, 2>;
    auto with_wd = [&](auto mom_c, auto nest_c) { if (f[0]) loop(T{}, mom_c, nest_c); else loop(N{}, mom_c, nest_c); };
    if (!f[1]) with_wd(M0{}, N{});
    else if (f[2]) { if (f[3]) with_wd(M1{}, T{}); else with_wd(M1{}, N{}); }
    else { if (f[3]) with_wd(M2{}, T{}); else with_wd(M2{}, N{}); }
  } else if constexpr (F == ADAGRAD) {
    // sc: grad_scale, weight_decay, eps, -clr ; fl: has_wd
    float* __restrict sum = S[0];
    const float gs = c[0], wd = c[1], eps = c[2], nclr = c[3];
    auto loop = [&](auto wd_c) {
      constexpr bool WD = decltype(wd_c)::value;
      for (int64_t i = 0; i < n; ++i) {
        float pi = p[i];
        float gi = gin[i] * gs;
        if constexpr (WD) gi = std::fma(pi, wd, gi);
        float s = std::fma(1.0f * gi, gi, sum[i]);
        sum[i] = s;
        float num = gi * nclr;
        p[i] = pi + num / (std::sqrt(s) + eps);
      }
    };
    if (f[0]) loop(T{}); else loop(N{});
  } else if constexpr (F == RMSPROP) {
    // sc: grad_scale, weight_decay, alpha, 1 - alpha, eps, momentum, -lr, (1-alpha) - 1
    // fl: has_wd, centered, has_momentum, lerp weight small, clamp (v - m^2 at 0, as the torch path
    // does for int8 moments: their rounding can leave a low-variance element slightly negative)
    float* __restrict sq = S[0];
    float* __restrict buf = S[1];
    float* __restrict ga = S[2];
    const float alpha = c[2], oma = c[3], eps = c[4], mom = c[5], nlr = c[6], wm1 = c[7];
    const bool centered = f[1], has_mom = f[2], small = f[3], clamp = f[4];
    const float gs = c[0], wd = c[1];
    const bool has_wd = f[0];
    auto loop = [&](auto centered_c, auto has_mom_c, auto small_c, auto wd_c, auto clamp_c) {
      constexpr bool C = decltype(centered_c)::value, M = decltype(has_mom_c)::value;
      constexpr bool SMALL = decltype(small_c)::value, WD = decltype(wd_c)::value;
      constexpr bool CLAMP = decltype(clamp_c)::value;
      for (int64_t i = 0; i < n; ++i) {
        float pi = p[i];
        float gi = gin[i] * gs;
        if constexpr (WD) gi = std::fma(pi, wd, gi);
        float s = sq[i] * alpha;
        s = std::fma(oma * gi, gi, s);
        sq[i] = s;
        float avg;
        if constexpr (C) {
          float gav = lerp(ga[i], gi, oma, wm1, SMALL);
          ga[i] = gav;
          float var = std::fma(-1.0f * gav, gav, s);
          if constexpr (CLAMP) var = var < 0.0f ? 0.0f : var;  // clamp_min keeps a NaN
          avg = std::sqrt(var);
        } else {
          avg = std::sqrt(s);
        }
        avg = avg + eps;
        if constexpr (M) {
          float b = buf[i] * mom;
          b = b + (1.0f * gi) / avg;
          buf[i] = b;
          p[i] = std::fma(b, nlr, pi);
        } else {
          p[i] = pi + (nlr * gi) / avg;
        }
      }
    };
    auto with_wd = [&](auto c_, auto m_, auto s_) {
      if constexpr (!decltype(c_)::value) { if (has_wd) loop(c_, m_, s_, T{}, N{}); else loop(c_, m_, s_, N{}, N{}); }
      else if (clamp) { if (has_wd) loop(c_, m_, s_, T{}, T{}); else loop(c_, m_, s_, N{}, T{}); }
      else { if (has_wd) loop(c_, m_, s_, T{}, N{}); else loop(c_, m_, s_, N{}, N{}); }
    };
    if (centered) {
      if (has_mom) { if (small) with_wd(T{}, T{}, T{}); else with_wd(T{}, T{}, N{}); }
      else { if (small) with_wd(T{}, N{}, T{}); else with_wd(T{}, N{}, N{}); }
    } else {
      if (has_mom) with_wd(N{}, T{}, N{}); else with_wd(N{}, N{}, N{});  // no lerp without centering
    }
  } else if constexpr (F == ADAM || F == RADAM) {
    // sc: grad_scale, weight_decay, 1 - lr*wd, 1 - beta1, (1 - beta1) - 1, beta2, 1 - beta2, eps, -step_size,
    //     bias_correction2_sqrt (Adam), lookahead alpha (Ranger)
    // fl: has_wd, decoupled, lerp weight small, amsgrad (Adam) / rectified (RAdam), lookahead (RAdam)
    const bool has_wd = f[0], decoupled = f[1], small = f[2], opt = f[3];
    float* __restrict m = S[0];
    float* __restrict v = S[1];
    float* __restrict x = S[2];  // Adam: max_exp_avg_sq; RAdam: slow_buffer
    const float gs = c[0], wd = c[1], keep = c[2];
    const float w = c[3], wm1 = c[4], b2 = c[5], omb2 = c[6], eps = c[7], nss = c[8], bc2 = c[9];
    // One pass: weight decay (WD 0 none, 1 coupled into g, 2 decoupled on p) and the grad scale are
    // folded into the loop, so fp32 data is read once straight from memory.
    auto loop = [&](auto opt_c, auto small_c, auto wd_c) {
      constexpr bool OPT = decltype(opt_c)::value, SMALL = decltype(small_c)::value;
      constexpr int WD = decltype(wd_c)::value;
      for (int64_t i = 0; i < n; ++i) {
        float pi = p[i];
        float gi = gin[i] * gs;
        if constexpr (WD == 2) pi = pi * keep;
        if constexpr (WD == 1) gi = std::fma(pi, wd, gi);
        float mi = lerp(m[i], gi, w, wm1, SMALL);
        m[i] = mi;
        float vi = v[i] * b2;
        vi = std::fma(omb2 * gi, gi, vi);
        v[i] = vi;
        if constexpr (F == ADAM) {
          if constexpr (OPT) { vi = nan_max(x[i], vi); x[i] = vi; }
          float d = std::sqrt(vi) / bc2 + eps;
          p[i] = pi + (nss * mi) / d;
        } else {
          if constexpr (OPT) p[i] = pi + (nss * mi) / (std::sqrt(vi) + eps);
          else p[i] = std::fma(mi, nss, pi);
        }
      }
    };
    auto with_wd = [&](auto opt_c, auto small_c) {
      if (!has_wd) loop(opt_c, small_c, std::integral_constant<int, 0>{});
      else if (decoupled) loop(opt_c, small_c, std::integral_constant<int, 2>{});
      else loop(opt_c, small_c, std::integral_constant<int, 1>{});
    };
    if (opt) { if (small) with_wd(T{}, T{}); else with_wd(T{}, N{}); }
    else { if (small) with_wd(N{}, T{}); else with_wd(N{}, N{}); }
    if constexpr (F == RADAM) {
      if (f[4]) pull(p, x, n, c[10], a.slow);
    }
  } else if constexpr (F == LOOKAHEAD) {
    // sc: alpha. No grad.
    pull(p, S[0], n, c[0], a.slow);
  }
}

// Chunk table: chunk k of the whole call covers tensor t's elements [start, start + len).
struct Chunk { int64_t t, start, len; };

int64_t build_chunks(int64_t nt, const int64_t* numel, Chunk* out) {
  int64_t k = 0;
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t s = 0; s < numel[t]; s += CHUNK)
      out[k++] = Chunk{t, s, std::min(CHUNK, numel[t] - s)};
  return k;
}

int64_t count_chunks(int64_t nt, const int64_t* numel) {
  int64_t k = 0;
  for (int64_t t = 0; t < nt; ++t) k += (numel[t] + CHUNK - 1) / CHUNK;
  return k;
}

// A call's state roles: nstate x nt pointers, row-major (null where a role is absent), each role fp32
// or int8 codes with nstate x nt absmax pointers beside them.
struct States {
  void* const* data;
  float* const* absmax;
  const int* kind;     // StateKind per role
  const float* maps;   // code tables (CodeMap), read when a role is int8
  const float* columns;  // per kind, its thresholds transposed (transpose16), 2 x 256
  int n;
  Thresholds thresholds(int kind) const {
    return Thresholds{code_map(maps, kind).threshold, columns + (kind == SIGNED_INT8 ? 0 : CODES)};
  }
};

template <int F, int PD, int GD>
void run(int64_t nt, const int64_t* numel, void* const* P, void* const* G, const States& st, const Rounding& rd,
         const float* sc, const int* fl, int nthreads) {
  int64_t nc = count_chunks(nt, numel);
  if (nc == 0) return;
  Chunk* chunks = new Chunk[nc];
  build_chunks(nt, numel, chunks);
  int slow = F32;  // the slow weights' role: Lookahead's first, Ranger's third
  const int slow_role = F == LOOKAHEAD ? 0 : 2;
  if (slow_role < st.n) slow = st.kind[slow_role] == BF16_STATE ? BF16 : st.kind[slow_role] == F16_STATE ? F16 : F32;
  Args a{sc, fl, slow};
  #pragma omp parallel num_threads(int(std::min<int64_t>(nthreads, nc)))
  {
    alignas(64) float pbuf[BLOCK];
    alignas(64) float gbuf[BLOCK];
    alignas(64) float sbuf[3][BLOCK];  // int8 roles' fp32 values for the block being updated
    #pragma omp for schedule(static)
    for (int64_t k = 0; k < nc; ++k) {
      const Chunk ch = chunks[k];
      for (int64_t off = ch.start; off < ch.start + ch.len; off += BLOCK) {
        int64_t n = std::min(BLOCK, ch.start + ch.len - off);
        float* p = load<PD>(P[ch.t], off, n, pbuf);
        const float* g = F == LOOKAHEAD ? nullptr : load<GD>(G[ch.t], off, n, gbuf);
        float* s[3] = {nullptr, nullptr, nullptr};
        for (int j = 0; j < st.n; ++j) {
          void* base = st.data[j * nt + ch.t];
          if (base == nullptr) continue;
          if (st.kind[j] == FP32_STATE) {
            s[j] = static_cast<float*>(base) + off;
          } else if (st.kind[j] == BF16_STATE) {
            s[j] = load<BF16>(base, off, n, sbuf[j]);
          } else if (st.kind[j] == F16_STATE) {
            s[j] = load<F16>(base, off, n, sbuf[j]);
          } else {
            dequantize(static_cast<const uint8_t*>(base) + off, st.absmax[j * nt + ch.t] + off / QBLOCK, n,
                       code_map(st.maps, st.kind[j]).value, sbuf[j]);
            s[j] = sbuf[j];
          }
        }
        block<F>(p, g, s, n, a);
        if (PD == BF16 && rd.mode == STOCHASTIC)
          store_stochastic(static_cast<uint16_t*>(P[ch.t]) + off, p, n, off, rd.streams[ch.t]);
        else if (PD == BF16 && rd.mode == KAHAN)
          store_kahan(static_cast<uint16_t*>(P[ch.t]) + off, static_cast<uint16_t*>(rd.comps[ch.t]) + off, p, n);
        else
          store<PD>(P[ch.t], off, n, p);
        for (int j = 0; j < st.n; ++j) {
          void* base = st.data[j * nt + ch.t];
          if (base == nullptr || st.kind[j] == FP32_STATE) continue;
          // the block stored values already representable in the slow weights' dtype: exact
          if (st.kind[j] == BF16_STATE) { store<BF16>(base, off, n, sbuf[j]); continue; }
          if (st.kind[j] == F16_STATE) { store<F16>(base, off, n, sbuf[j]); continue; }
          quantize(sbuf[j], n, st.thresholds(st.kind[j]), static_cast<uint8_t*>(base) + off,
                   st.absmax[j * nt + ch.t] + off / QBLOCK);
        }
      }
    }
  }
  delete[] chunks;
}

template <int F, int PD>
void dispatch_g(int gd, int64_t nt, const int64_t* numel, void* const* P, void* const* G, const States& S,
                const Rounding& R, const float* sc, const int* fl, int nth) {
  switch (gd) {
    case F32: run<F, PD, F32>(nt, numel, P, G, S, R, sc, fl, nth); break;
    case BF16: run<F, PD, BF16>(nt, numel, P, G, S, R, sc, fl, nth); break;
    case F16: run<F, PD, F16>(nt, numel, P, G, S, R, sc, fl, nth); break;
  }
}

template <int F>
void dispatch_p(int pd, int gd, int64_t nt, const int64_t* numel, void* const* P, void* const* G, const States& S,
                const Rounding& R, const float* sc, const int* fl, int nth) {
  switch (pd) {
    case F32: dispatch_g<F, F32>(gd, nt, numel, P, G, S, R, sc, fl, nth); break;
    case BF16: dispatch_g<F, BF16>(gd, nt, numel, P, G, S, R, sc, fl, nth); break;
    case F16: dispatch_g<F, F16>(gd, nt, numel, P, G, S, R, sc, fl, nth); break;
  }
}

template <int GD>
void sumsq_run(int64_t nt, const int64_t* numel, void* const* G, double* out_sumsq, int* out_bad, int nthreads) {
  int64_t nc = count_chunks(nt, numel);
  if (nc == 0) return;
  Chunk* chunks = new Chunk[nc];
  build_chunks(nt, numel, chunks);
  // One fp64 slot per chunk, added in chunk order below: the same bits at any thread count. The
  // slots are written once per 32K elements, so two threads sharing a cache line costs nothing.
  double* partial = new double[nc];
  #pragma omp parallel num_threads(int(std::min<int64_t>(nthreads, nc)))
  {
    alignas(64) float gbuf[BLOCK];
    typedef float v16 __attribute__((vector_size(64)));
    typedef float v8f __attribute__((vector_size(32)));
    typedef double v8d __attribute__((vector_size(64)));
    #pragma omp for schedule(static)
    for (int64_t k = 0; k < nc; ++k) {
      const Chunk ch = chunks[k];
      // Four independent 16-lane fp32 accumulators (so no add waits on the previous one) over one
      // block of at most 1024 elements (64 squares per lane), then widened lane-wise into fp64
      // vector accumulators: no serial horizontal sum per block, one per chunk. An inf/NaN needs no
      // separate probe: its square is inf/NaN and stays so through every add (squares are >= 0,
      // so no inf - inf), and the caller flags a non-finite total.
      v8d lo = {}, hi = {};
      double tail = 0.0;
      for (int64_t off = ch.start; off < ch.start + ch.len; off += BLOCK) {
        int64_t n = std::min(BLOCK, ch.start + ch.len - off);
        const float* g = load<GD>(G[ch.t], off, n, gbuf);
        v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
        const int64_t n64 = n & ~int64_t(63);
        int64_t i = 0;
        // Not unrolled in full: GCC would, knowing n <= 1024, and the 16 copies with a test between
        // each read ~30% slower than this loop.
        _Pragma("GCC unroll 2") for (; i < n64; i += 64) {
          v16 x0, x1, x2, x3;
          std::memcpy(&x0, g + i, 64);
          std::memcpy(&x1, g + i + 16, 64);
          std::memcpy(&x2, g + i + 32, 64);
          std::memcpy(&x3, g + i + 48, 64);
          a0 += x0 * x0;
          a1 += x1 * x1;
          a2 += x2 * x2;
          a3 += x3 * x3;
        }
        v16 q = (a0 + a1) + (a2 + a3);
        v8f ql, qh;
        std::memcpy(&ql, &q, 32);
        std::memcpy(&qh, reinterpret_cast<const char*>(&q) + 32, 32);
        lo += __builtin_convertvector(ql, v8d);
        hi += __builtin_convertvector(qh, v8d);
        for (; i < n; ++i) { double x = g[i]; tail += x * x; }
      }
      v8d s = lo + hi;
      double acc = tail;
      for (int l = 0; l < 8; ++l) acc += s[l];
      partial[k] = acc;
    }
  }
  double total = 0.0;
  for (int64_t k = 0; k < nc; ++k) total += partial[k];
  *out_sumsq += total;
  *out_bad |= !std::isfinite(total);
  delete[] chunks;
  delete[] partial;
}

}  // namespace

extern "C" {

// family: Family; pd/gd: Dtype of params/grads; S: nstate x nt state pointers (row-major, null
// allowed), each role stored per kind[role] (StateKind): fp32, uint8 codes with A (nstate x nt)
// holding the int8 roles' absmax pointers, or bf16/fp16 (slow weights); maps: the code tables
// (4 x 256 fp32: signed values, signed thresholds, unsigned values, unsigned thresholds), read only
// when a role is int8. round_mode (RoundMode) says how bf16 params are written: streams (nt uint32
// stream seeds) for stochastic rounding, comps (nt bf16 compensation buffers) for Kahan.
int dist_optim_step(int family, int pd, int gd, int64_t nt, const int64_t* numel, void* const* P, void* const* G,
                    void* const* S, float* const* A, const int* kind, const float* maps, int nstate,
                    int round_mode, const uint32_t* streams, void* const* comps,
                    const float* sc, const int* fl, int nthreads) {
  if (pd < 0 || pd > 2 || gd < 0 || gd > 2 || nstate > 3 || nthreads < 1) return 1;
  for (int j = 0; j < nstate; ++j) {
    if (kind[j] < FP32_STATE || kind[j] > F16_STATE) return 3;
    if (is_int8(kind[j]) && (A == nullptr || maps == nullptr)) return 3;
  }
  if (round_mode < NEAREST || round_mode > KAHAN) return 4;
  if (pd == BF16 && ((round_mode == STOCHASTIC && streams == nullptr) || (round_mode == KAHAN && comps == nullptr)))
    return 4;
  alignas(64) float columns[2 * CODES];
  if (maps != nullptr) {
    transpose16(code_map(maps, SIGNED_INT8).threshold, columns);
    transpose16(code_map(maps, UNSIGNED_INT8).threshold, columns + CODES);
  }
  const States st{S, A, kind, maps, columns, nstate};
  const Rounding rd{round_mode, streams, comps};
  switch (family) {
    case SGD: dispatch_p<SGD>(pd, gd, nt, numel, P, G, st, rd, sc, fl, nthreads); break;
    case ADAGRAD: dispatch_p<ADAGRAD>(pd, gd, nt, numel, P, G, st, rd, sc, fl, nthreads); break;
    case RMSPROP: dispatch_p<RMSPROP>(pd, gd, nt, numel, P, G, st, rd, sc, fl, nthreads); break;
    case ADAM: dispatch_p<ADAM>(pd, gd, nt, numel, P, G, st, rd, sc, fl, nthreads); break;
    case RADAM: dispatch_p<RADAM>(pd, gd, nt, numel, P, G, st, rd, sc, fl, nthreads); break;
    case LOOKAHEAD: dispatch_p<LOOKAHEAD>(pd, F32, nt, numel, P, G, st, rd, sc, fl, nthreads); break;
    default: return 2;
  }
  return 0;
}

// Adds this call's sum of squares (fp64) and non-finite flag into *sumsq / *bad.
int dist_optim_sumsq(int gd, int64_t nt, const int64_t* numel, void* const* G, double* sumsq, int* bad, int nthreads) {
  if (nthreads < 1) return 1;
  switch (gd) {
    case F32: sumsq_run<F32>(nt, numel, G, sumsq, bad, nthreads); break;
    case BF16: sumsq_run<BF16>(nt, numel, G, sumsq, bad, nthreads); break;
    case F16: sumsq_run<F16>(nt, numel, G, sumsq, bad, nthreads); break;
    default: return 1;
  }
  return 0;
}

}  // extern "C"
