// The fused group-KD row kernel (docs/design.md §3 and 4), written once with
// at::vec::Vectorized<float> and compiled once per instruction set.
//
// Include this from exactly one translation unit per ISA, after defining
//   CPU_CAPABILITY (DEFAULT, AVX2 or AVX512, plus CPU_CAPABILITY_AVX2/AVX512 for the
//   wide ones) and ORC_FAST_ROW_KERNEL (the name of the function to define).
//
// Why a header per ISA instead of compiler flags: the extension is built with the
// baseline x86-64 flags so it runs anywhere; the AVX2/AVX512 builds are selected at
// run time from at::get_cpu_capability(). The ISA translation units switch the
// instruction set with `#pragma GCC target` only after the c10 headers they share
// with the rest of the library are included, so no generic inline function gets an
// AVX body that the linker could hand to the baseline build.
//
// Per row b, every logit row is read from memory once (later passes over the same
// row hit L2: one row is C*4 bytes, the per-thread scratch 6*C*4 bytes):
//   teachers: max + argmax, exp((z-m)/tau) summed, accumulated into p = sum_g w_g softmax
//   log p (skipped for one teacher: log p = (z-m)/tau - log Z)
//   students: max + argmax, exp((z-m)/tau) and exp(z-m) stored and summed (for an
//   integer tau the second is a power of the first), then one pass that forms the
//   gradient, the KL terms and the ensemble probability and writes the gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "group_kd_cpu.h"

namespace orc_fast::cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// exp for arguments in [-inf, 0] (logit minus its row maximum, never NaN here: rows
// whose maximum is not finite are handled before any exponential).
// exp_u20 is ATen's fast polynomial (max 20 ulp, about 1e-6 relative: well inside the
// 1e-5 tolerance), a few times faster than the Sleef u10 call behind exp().
inline Vec exp_nonpositive(const Vec& x) {
#ifdef ORC_FAST_ACCURATE_EXP
  return x.exp();
#else
  return x.exp_u20();
#endif
}

// Loads `count` floats at p (all lanes when Full); lanes past count read as 0.
template <bool Full>
inline Vec load(const float* p, int64_t count) {
  if constexpr (Full) {
    return Vec::loadu(p);
  } else {
    return Vec::loadu(p, count);
  }
}

template <bool Full>
inline void store(float* p, const Vec& v, int64_t count) {
  if constexpr (Full) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// Keeps the first `count` lanes of v, the rest from fill (tails of reductions).
template <bool Full>
inline Vec keep(const Vec& fill, const Vec& v, int64_t count) {
  if constexpr (Full) {
    return v;
  } else {
    return Vec::set(fill, v, count);
  }
}

// Calls body(std::true_type-like flag, index, count) for every vector of [0, n).
template <typename Body>
inline void for_each_vector(int64_t n, const Body& body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    body(std::true_type{}, i, kLanes);
  }
  if (i < n) {
    body(std::false_type{}, i, n - i);
  }
}

inline float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Compensated (Kahan) sum per lane, for the softmax denominators. A plain running sum
// rounds every add at the lane total's ulp: when one logit dominates its row (p = 0.6 at
// 131072 classes), the lane holding exp(0) = 1 takes ~8192 adds of ~5e-6 and the
// denominator ends up ~2e-5 low, beyond the 1e-5 tolerance (docs/design.md §7). The
// carry keeps each lane within a few ulp for 3 more adds per vector. Only for sums of
// terms in [0, 1] (exponentials of non-positive numbers): no overflow, so no inf - inf.
struct KahanSum {
  Vec sum{0.f}, carry{0.f};
  void add(const Vec& x) {
    const Vec y = x - carry;
    const Vec t = sum + y;
    carry = (t - sum) - y;
    sum = t;
  }
  float total() const { return sum_lanes(sum) - sum_lanes(carry); }
};

// Row maximum; NaN if any element is NaN.
inline float row_max(const float* x, int64_t n) {
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  Vec m0 = neg_inf, m1 = neg_inf;
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + kLanes));
  }
  for (; i < n; i += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, n - i);
    m0 = at::vec::maximum(m0, Vec::set(neg_inf, Vec::loadu(x + i, count), count));
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                        at::vec::maximum(m0, m1));
}

// torch.argmax given the row maximum: the first index holding it (the first NaN when
// the maximum is NaN). Stops at the hit, so it reads half a row on average.
inline int64_t first_index_of_max(const float* x, int64_t n, float max_value) {
  const bool find_nan = std::isnan(max_value);
  const Vec target(max_value);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec v = Vec::loadu(x + i);
    // zero_mask: bit set where the lane is 0.0, i.e. where the comparison is false.
    const Vec hit = find_nan ? (v != v) : (v == target);
    const int not_hit = hit.zero_mask();
    if (not_hit != (1 << kLanes) - 1) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        if (!(not_hit & (1 << lane))) return i + lane;
      }
    }
  }
  for (; i < n; ++i) {
    if (find_nan ? std::isnan(x[i]) : x[i] == max_value) return i;
  }
  return 0;
}

inline int64_t argmax(const float* x, int64_t n) { return first_index_of_max(x, n, row_max(x, n)); }

// The row as fp32: the row itself for float logits, else converted into `buffer`.
template <typename T>
inline const float* row_as_float(const T* row, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      Vec v;
      at::vec::load_to_float<T>(row + i, v);
      v.store(buffer + i);
    }
    for (; i < n; ++i) buffer[i] = static_cast<float>(row[i]);
    return buffer;
  }
}

// Software prefetch of the next batch row, one cache line per vector iteration of the
// exponential passes (the passes with the most arithmetic to hide the memory latency
// under). Rows longer than a page defeat the hardware prefetchers at every 4 KiB.
inline void prefetch(const char* address) {
#if defined(__GNUC__)
  __builtin_prefetch(address, 0, 3);
#endif
}

// A teacher's pass: exps[c] = exp((x[c] - max) / tau), returning their sum. The
// previous teacher's exps (still in `exps`, read before being overwritten) are folded
// into mean_prob with weight fold_scale: Fold 0 none, 1 mean_prob = ..., 2 mean_prob += ....
template <int Fold>
inline float teacher_exps(const float* x, int64_t n, float max_value, float inv_tau, float* exps,
                          float* mean_prob, float fold_scale, const char* next_row, int64_t elem_size) {
  const Vec shift(max_value), scale(inv_tau), zero(0.f), v_fold(fold_scale);
  KahanSum sum;
  for_each_vector(n, [&](auto full, int64_t i, int64_t count) {
    constexpr bool Full = decltype(full)::value;
    prefetch(next_row + i * elem_size);
    if constexpr (Fold == 1) {
      store<Full>(mean_prob + i, load<Full>(exps + i, count) * v_fold, count);
    } else if constexpr (Fold == 2) {
      store<Full>(mean_prob + i, at::vec::fmadd(load<Full>(exps + i, count), v_fold, load<Full>(mean_prob + i, count)),
                  count);
    }
    const Vec e = exp_nonpositive((load<Full>(x + i, count) - shift) * scale);
    store<Full>(exps + i, e, count);
    sum.add(keep<Full>(zero, e, count));
  });
  return sum.total();
}

// v^K for a small positive integer K; K = 0 means "not an integer temperature".
template <int K>
inline Vec int_power(const Vec& v) {
  static_assert(K >= 1 && K <= 8);
  if constexpr (K == 1) {
    return v;
  } else if constexpr (K % 2 == 0) {
    const Vec half = int_power<K / 2>(v);
    return half * half;
  } else {
    return int_power<K - 1>(v) * v;
  }
}

// A student's two exponentials: tempered[c] = exp((x-m)/tau), plain[c] = exp(x-m).
// For an integer tau = K (<= 8) the plain one is tempered^K: one exp per logit, not two.
template <int K>
inline void student_exps(const float* x, int64_t n, float max_value, float inv_tau, float* tempered, float* plain,
                         float& tempered_sum, float& plain_sum, const char* next_row, int64_t elem_size) {
  const Vec shift(max_value), scale(inv_tau), zero(0.f);
  KahanSum sum_t, sum_p;
  for_each_vector(n, [&](auto full, int64_t i, int64_t count) {
    constexpr bool Full = decltype(full)::value;
    prefetch(next_row + i * elem_size);
    const Vec d = load<Full>(x + i, count) - shift;
    const Vec et = exp_nonpositive(d * scale);
    Vec ep;
    if constexpr (K == 0) {
      ep = exp_nonpositive(d);
    } else {
      ep = int_power<K>(et);
    }
    store<Full>(tempered + i, et, count);
    store<Full>(plain + i, ep, count);
    sum_t.add(keep<Full>(zero, et, count));
    sum_p.add(keep<Full>(zero, ep, count));
  });
  tempered_sum = sum_t.total();
  plain_sum = sum_p.total();
}

using StudentExps = void (*)(const float*, int64_t, float, float, float*, float*, float&, float&, const char*,
                             int64_t);

inline StudentExps student_exps_for(float tau) {
  const bool integer = tau == std::floor(tau) && tau >= 1.0f && tau <= 8.0f;
  switch (integer ? static_cast<int>(tau) : 0) {
    case 1: return &student_exps<1>;
    case 2: return &student_exps<2>;
    case 3: return &student_exps<3>;
    case 4: return &student_exps<4>;
    case 5: return &student_exps<5>;
    case 6: return &student_exps<6>;
    case 7: return &student_exps<7>;
    case 8: return &student_exps<8>;
    default: return &student_exps<0>;
  }
}

template <typename T>
inline void fill_row(T* row, int64_t n, float value) {
  std::fill(row, row + n, static_cast<T>(value));
}

template <typename T>
void process_rows(const GroupKDParams& p, int64_t row_begin, int64_t row_end, float* scratch) {
  const int64_t S = p.num_students, G = p.num_teachers, B = p.batch, C = p.num_classes;
  const int64_t stride = padded_classes(C);
  float* mean_prob = scratch;               // p_b = sum_g w_g softmax(z_gb / tau)
  float* log_mean_prob = scratch + stride;  // log p_b
  float* plain_exp = scratch + 2 * stride;  // exp(z_sb - m); holds the fp32 gradient for 16-bit logits
  float* tempered_exp = scratch + 3 * stride;  // exp((z - m) / tau); teachers' exps first
  float* row_buffer = scratch + 4 * stride;    // a 16-bit logit row converted to fp32
  float* ensemble_prob = scratch + 5 * stride; // sum over error members of softmax(z_sb)

  const auto* student = static_cast<const T*>(p.student);
  const auto* teachers = static_cast<const T*>(p.teachers);
  auto* grad = static_cast<T*>(p.grad);
  const float tau = static_cast<float>(p.temperature);
  const float inv_tau = 1.0f / tau;
  const float tau_squared = static_cast<float>(p.temperature * p.temperature);
  const StudentExps exps_of_student = student_exps_for(tau);
  const bool ensemble_rule = p.error_rule == 3;
  const Vec zero(0.f);

  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t label = p.target[b];
    if (label == p.ignore_index) {
      // Ignored rows: no loss, no gradient, never correct, never an error image.
      for (int64_t s = 0; s < S; ++s) {
        p.loss[s * B + b] = 0.f;
        p.kl[s * B + b] = 0.f;
        p.ce[s * B + b] = 0.f;
        p.student_correct[s * B + b] = false;
        fill_row(grad + (s * B + b) * C, C, 0.f);
      }
      for (int64_t g = 0; g < G; ++g) p.teacher_correct[g * B + b] = false;
      p.error_mask[b] = false;
      continue;
    }
    // A label outside [0, C) is never read: that row's loss and gradient are NaN.
    const bool label_ok = label >= 0 && label < C;

    // ---- teachers: p = sum_g w_g softmax(z_g / tau) ----
    // Teacher g's exps go to tempered_exp; they are folded into mean_prob during
    // teacher g+1's pass, and the last teacher's in the pass that takes log p.
    const int64_t next_b = b + 1 < row_end ? b + 1 : b;  // prefetch target
    bool teachers_finite = true;
    float pending_scale = 0.f;  // w_g / Z_g of the teacher whose exps sit in tempered_exp
    float last_shift = 0.f;     // that teacher's max
    const float* last_row = nullptr;
    for (int64_t g = 0; g < G; ++g) {
      const T* row = teachers + g * p.teacher_stride_g + b * p.teacher_stride_b;
      const char* next_row = reinterpret_cast<const char*>(teachers + g * p.teacher_stride_g + next_b * p.teacher_stride_b);
      const float* x = row_as_float(row, row_buffer, C);
      const float m = row_max(x, C);
      p.teacher_correct[g * B + b] = label_ok && first_index_of_max(x, C, m) == label;
      if (!std::isfinite(m)) teachers_finite = false;  // NaN or +inf logit, or all -inf
      if (!teachers_finite) continue;
      float z;
      if (g == 0) {
        z = teacher_exps<0>(x, C, m, inv_tau, tempered_exp, mean_prob, 0.f, next_row, sizeof(T));
      } else if (g == 1) {
        z = teacher_exps<1>(x, C, m, inv_tau, tempered_exp, mean_prob, pending_scale, next_row, sizeof(T));
      } else {
        z = teacher_exps<2>(x, C, m, inv_tau, tempered_exp, mean_prob, pending_scale, next_row, sizeof(T));
      }
      pending_scale = p.teacher_weights[g] / z;
      last_shift = m;
      last_row = x;
    }
    if (!teachers_finite) {
      std::fill(mean_prob, mean_prob + C, kNaN);
      std::fill(log_mean_prob, log_mean_prob + C, kNaN);
    } else if (G == 1) {
      // One teacher: log p = (z - m)/tau + log(w / Z), no per-class log.
      const Vec v_scale(pending_scale), shift(last_shift), v_inv_tau(inv_tau), offset(std::log(pending_scale));
      for_each_vector(C, [&](auto full, int64_t i, int64_t count) {
        constexpr bool Full = decltype(full)::value;
        store<Full>(mean_prob + i, load<Full>(tempered_exp + i, count) * v_scale, count);
        store<Full>(log_mean_prob + i, at::vec::fmadd(load<Full>(last_row + i, count) - shift, v_inv_tau, offset), count);
      });
    } else {
      const Vec v_scale(pending_scale);
      for_each_vector(C, [&](auto full, int64_t i, int64_t count) {
        constexpr bool Full = decltype(full)::value;
        const Vec prob = at::vec::fmadd(load<Full>(tempered_exp + i, count), v_scale, load<Full>(mean_prob + i, count));
        store<Full>(mean_prob + i, prob, count);
        store<Full>(log_mean_prob + i, prob.log(), count);
      });
    }

    // ---- students ----
    int64_t members = 0, wrong_members = 0;
    bool ensemble_ok = true;  // false once a student row is non-finite (its softmax is NaN)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t out = s * B + b;
      T* grad_row = grad + out * C;
      const float* x = row_as_float(student + s * p.student_stride_s + b * p.student_stride_b, row_buffer, C);
      const char* next_row = reinterpret_cast<const char*>(student + s * p.student_stride_s + next_b * p.student_stride_b);
      const float m = row_max(x, C);
      const bool correct = label_ok && first_index_of_max(x, C, m) == label;
      p.student_correct[out] = correct;
      const bool member = p.error_members[s] > 0.f;
      members += member;
      wrong_members += member && !correct;

      if (!std::isfinite(m) || !label_ok) {
        // NaN/+inf logit (or an all -inf row), or a label we must not read: NaN row.
        p.loss[out] = kNaN;
        p.kl[out] = kNaN;
        p.ce[out] = kNaN;
        fill_row(grad_row, C, kNaN);
        if (!std::isfinite(m)) ensemble_ok = false;
        continue;
      }

      float tempered_sum, plain_sum;
      exps_of_student(x, C, m, inv_tau, tempered_exp, plain_exp, tempered_sum, plain_sum, next_row, sizeof(T));
      const float log_tempered_sum = std::log(tempered_sum);
      const float inv_plain_sum = 1.0f / plain_sum, inv_tempered_sum = 1.0f / tempered_sum;
      const float a = p.alpha[s];
      const float ce_weight = 1.0f - a, kd_weight = a * tau;
      const float ce = std::log(plain_sum) - (x[label] - m);
      // The label's gradient element, formed before the pass below overwrites plain_exp.
      const float label_grad = ce_weight * (plain_exp[label] * inv_plain_sum - 1.0f) +
                               kd_weight * (tempered_exp[label] * inv_tempered_sum - mean_prob[label]);

      // d loss / dz = (1-a) softmax(z) + a tau (softmax(z/tau) - p)   (- (1-a) at the label)
      // KL = sum_c p_c (log p_c - log q_c), log q_c = (z_c - m)/tau - log Z_tau; 0 log 0 = 0.
      const Vec v_inv_plain(inv_plain_sum), v_inv_tempered(inv_tempered_sum);
      const Vec v_ce_weight(ce_weight), v_kd_weight(kd_weight), v_shift(m), v_inv_tau(inv_tau);
      const Vec v_log_z(log_tempered_sum), v_member(member ? 1.f : 0.f);
      float* grad_out = std::is_same_v<T, float> ? reinterpret_cast<float*>(grad_row) : plain_exp;
      Vec kl_sum(0.f);
      const bool first_student = s == 0;
      for_each_vector(C, [&](auto full, int64_t i, int64_t count) {
        constexpr bool Full = decltype(full)::value;
        const Vec prob = load<Full>(plain_exp + i, count) * v_inv_plain;
        const Vec tempered_prob = load<Full>(tempered_exp + i, count) * v_inv_tempered;
        const Vec teacher_prob = load<Full>(mean_prob + i, count);
        const Vec log_q = at::vec::fmsub(load<Full>(x + i, count) - v_shift, v_inv_tau, v_log_z);
        const Vec term = teacher_prob * (load<Full>(log_mean_prob + i, count) - log_q);
        kl_sum = kl_sum + Vec::blendv(zero, term, teacher_prob > zero);
        if (ensemble_rule) {
          const Vec previous = first_student ? zero : load<Full>(ensemble_prob + i, count);
          store<Full>(ensemble_prob + i, at::vec::fmadd(prob, v_member, previous), count);
        }
        const Vec g = at::vec::fmadd(v_ce_weight, prob, v_kd_weight * (tempered_prob - teacher_prob));
        store<Full>(grad_out + i, g, count);
      });
      grad_out[label] = label_grad;
      if constexpr (!std::is_same_v<T, float>) {
        at::vec::convert(grad_out, grad_row, C);
      }
      float kl = sum_lanes(kl_sum);
      if (!teachers_finite) kl = kNaN;  // p is NaN: the KL terms above were masked to 0
      p.kl[out] = kl;
      p.ce[out] = ce;
      p.loss[out] = ce_weight * ce + a * tau_squared * kl;
    }

    bool error = false;
    switch (p.error_rule) {
      case 0: error = wrong_members > 0; break;
      case 1: error = members > 0 && wrong_members == members; break;
      case 2: error = 2 * wrong_members > members; break;
      default: {
        // Ensemble: argmax of the members' mean softmax (all NaN, so index 0, when a
        // student row is non-finite; undefined when the label is out of range).
        int64_t prediction = 0;
        if (ensemble_ok && label_ok) prediction = argmax(ensemble_prob, C);
        error = members > 0 && prediction != label;
      }
    }
    p.error_mask[b] = error;
  }
}

void ORC_FAST_ROW_KERNEL(const GroupKDParams& p, int64_t row_begin, int64_t row_end, float* scratch) {
  switch (p.logit_type) {
    case LogitType::Float: process_rows<float>(p, row_begin, row_end, scratch); break;
    case LogitType::Half: process_rows<c10::Half>(p, row_begin, row_end, scratch); break;
    case LogitType::BFloat16: process_rows<c10::BFloat16>(p, row_begin, row_end, scratch); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace orc_fast::cpu
