// qk_rope.metal for MLX's CUDA backend (mx.fast.cuda_kernel), line for line: what the lent NVIDIA GPUs measure
// in place of a Mac. One warp per (row, head): grid (32, NQ + NK, rows) threads, blocks of (32, 1, 1).
constexpr int HALF = D / 2;
const unsigned lane = threadIdx.x;
const unsigned head = blockIdx.y;
const unsigned row = blockIdx.z;
const bool is_q = int(head) < NQ;
const size_t src = size_t(row) * size_t((NQ + 2 * NK) * D) + size_t(head) * D;

float inv = 1.0f;
if (NORM) {
  float ss = 0.0f;
  for (int i = int(lane); i < D; i += 32) {
    const float x = static_cast<float>(qkv[src + i]);
    ss += x * x;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  inv = rsqrtf(ss / D + params[0]);
}

const unsigned b = row / unsigned(L);
const unsigned l = row % unsigned(L);
const float position = params[1] * static_cast<float>(offset[PER_ROW ? b : 0] + int(l));
const size_t heads = is_q ? NQ : NK;
const size_t dst = ((size_t(b) * heads + (is_q ? head : head - NQ)) * L + l) * size_t(D);
for (int p = int(lane); p < HALF; p += 32) {
  const int i1 = TRADITIONAL ? 2 * p : p;
  const int i2 = TRADITIONAL ? 2 * p + 1 : p + HALF;
  float x1 = static_cast<float>(qkv[src + i1]);
  float x2 = static_cast<float>(qkv[src + i2]);
  if (NORM) {
    const float w1 = static_cast<float>(is_q ? q_weight[i1] : k_weight[i1]);
    const float w2 = static_cast<float>(is_q ? q_weight[i2] : k_weight[i2]);
    x1 = static_cast<float>(static_cast<T>(w1 * static_cast<float>(static_cast<T>(x1 * inv))));
    x2 = static_cast<float>(static_cast<T>(w2 * static_cast<float>(static_cast<T>(x2 * inv))));
  }
  float s, c;
  sincosf(position * inv_freq[p], &s, &c);
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
