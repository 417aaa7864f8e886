// The queries and keys of one attention layer, normed (NORM: Qwen3's q_norm / k_norm) and rotated (RoPE), in one
// launch. Mirrors vmetal.engine.fused_qk.reference: mlx-lm's own RMSNorm and RoPE modules, applied to the
// query and key columns of the packed [q | k | v] projection.
//
// One SIMD group per (row, head): grid (32, NQ + NK, rows), threadgroup (32, 1, 1). A row is one token of the
// batch (rows = B * L); heads below NQ are query heads, the others key heads. Lane `lane` handles the pairs
// p = lane, lane + 32, ... < D / 2 that RoPE rotates together.
constexpr int HALF = D / 2;
const uint lane = thread_position_in_grid.x;
const uint head = thread_position_in_grid.y;
const uint row = thread_position_in_grid.z;
const bool is_q = int(head) < NQ;
const uint src = row * uint((NQ + 2 * NK) * D) + head * uint(D);

// RMSNorm: the mean of squares over the head in float32, as mlx's rms_norm accumulates it.
float inv = 1.0f;
if (NORM) {
  float ss = 0.0f;
  for (int i = int(lane); i < D; i += 32) {
    const float x = static_cast<float>(qkv[src + i]);
    ss += x * x;
  }
  ss = metal::simd_sum(ss);
  inv = metal::precise::rsqrt(ss / D + params[0]);
}

// RoPE: position offset + l of this row's token (one offset per batch row, or one for all); theta as mlx's
// rope computes it (scale * position * inv_freq).
const uint b = row / uint(L);
const uint l = row % uint(L);
const float position = params[1] * static_cast<float>(offset[PER_ROW ? b : 0] + int(l));
const uint heads = is_q ? uint(NQ) : uint(NK);
const uint dst = ((b * heads + (is_q ? head : head - uint(NQ))) * uint(L) + l) * uint(D);
for (int p = int(lane); p < HALF; p += 32) {
  const int i1 = TRADITIONAL ? 2 * p : p;
  const int i2 = TRADITIONAL ? 2 * p + 1 : p + HALF;
  float x1 = static_cast<float>(qkv[src + i1]);
  float x2 = static_cast<float>(qkv[src + i2]);
  if (NORM) {
    // weight * T(x * inv), the product rounded to T: mlx's rms_norm output, which its rope reads.
    const float w1 = static_cast<float>(is_q ? q_weight[i1] : k_weight[i1]);
    const float w2 = static_cast<float>(is_q ? q_weight[i2] : k_weight[i2]);
    x1 = static_cast<float>(static_cast<T>(w1 * static_cast<float>(static_cast<T>(x1 * inv))));
    x2 = static_cast<float>(static_cast<T>(w2 * static_cast<float>(static_cast<T>(x2 * inv))));
  }
  const float theta = position * inv_freq[p];
  const float c = metal::fast::cos(theta);
  const float s = metal::fast::sin(theta);
  const T o1 = static_cast<T>(x1 * c - x2 * s);
  const T o2 = static_cast<T>(x1 * s + x2 * c);
  if (is_q) {
    q_out[dst + i1] = o1;
    q_out[dst + i2] = o2;
  } else {
    k_out[dst + i1] = o1;
    k_out[dst + i2] = o2;
  }
}
