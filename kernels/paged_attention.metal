// paged_attention: causal attention of one packed query token over its sequence's paged K/V.
// Reference: vmetal/engine/runner/attention/reference.py::paged_attention (block-table gather + masked SDPA, GQA,
// sliding window, attention sinks) and ::softcapped_attention (Gemma 2's tanh softcap).
// Tests: tests/unit/test_kernels_syntax.py (C++ emulation, every variant, anywhere) and
// tests/unit/test_paged_attention.py::test_metal_paged_attention_matches_reference (Metal only).
//
// This file is a kernel BODY: MLX (mx.fast.metal_kernel) writes the signature from the names below.
// Launch (vmetal/engine/runner/attention/metal.py::plan_paged_attention): grid (32, HQ, num_tokens), threadgroup (32, 1, 1):
// one SIMD group of 32 lanes per (query token, query head); decode and prefill chunks alike.
// Template: T output dtype; HQ, HKV query and KV heads; D query/key head dim; DV value head dim (D but for MLA's
//           narrower values); BS block size; WINDOW sliding window (0: full attention); SINKS, SOFTCAP 0 or 1.
// Inputs:  queries [num_tokens, HQ, D]; k_pool [num_blocks, BS, HKV, D]; v_pool [num_blocks, BS, HKV, DV];
//          block_tables [B, max_blocks] int32 (entries >= 0 wherever a context position reads them);
//          token_seq [num_tokens] int32, the sequence of each query token;
//          token_pos [num_tokens] int32, its context position (context_len - query_len + index in chunk);
//          scale, a float scalar; sinks [HQ] float (read only with SINKS); softcap, a float scalar (SOFTCAP).
// Output:  out [num_tokens, HQ, DV].

// Step 1: what this SIMD group computes. Lane l owns head-dim elements l, l + 32, l + 64, ...
const uint lane = thread_position_in_threadgroup.x;
const uint h = threadgroup_position_in_grid.y;
const uint t = threadgroup_position_in_grid.z;
const int seq = token_seq[t];
const int qpos = token_pos[t];
const uint kvh = h / (HQ / HKV);  // GQA: query head h reads KV head h // (HQ / HKV)
const int max_blocks = block_tables_shape[1];

// Step 2: this lane's slice of the query, times `scale` (SDPA's scale in the reference).
constexpr int PER_LANE = (D + 31) / 32;
constexpr int PER_LANE_V = (DV + 31) / 32;
float q[PER_LANE];
float acc[PER_LANE_V];
for (int i = 0; i < PER_LANE; ++i) {
  const int d = int(lane) + 32 * i;
  q[i] = d < D ? float(queries[(size_t(t) * HQ + h) * D + d]) * scale : 0.0f;
}
for (int i = 0; i < PER_LANE_V; ++i) {
  acc[i] = 0.0f;
}

// Step 3: online softmax over the visible key positions: the reference's causal mask (key p is visible to the
// query at position qpos iff p <= qpos, hence also p < context_len), with a window its last WINDOW positions
// only (p > qpos - WINDOW, the reference's `seen &= kpos > qpos - window`; blocks before them may be freed).
// Position p is in slot block_tables[seq, p / BS] * BS + p % BS, the slot reshape_and_cache wrote it to.
// A sink is one more logit per head in the softmax with no value (MLX SDPA's `sinks`): it starts the sums.
float running_max = SINKS ? float(sinks[h]) : -INFINITY;
float denom = SINKS ? 1.0f : 0.0f;
const int first = WINDOW > 0 ? metal::max(0, qpos - WINDOW + 1) : 0;
for (int p = first; p <= qpos; ++p) {
  const int block_id = block_tables[seq * max_blocks + p / BS];
  const size_t slot = size_t(block_id) * BS + p % BS;
  const size_t k_row = (slot * HKV + kvh) * D;
  const size_t v_row = (slot * HKV + kvh) * DV;

  // 3a: score = q . k: each lane sums its elements, simd_sum adds the 32 lanes' partial sums; Gemma 2 caps
  // the scaled score with softcap * tanh(score / softcap) before the softmax.
  float partial = 0.0f;
  for (int i = 0; i < PER_LANE; ++i) {
    const int d = int(lane) + 32 * i;
    if (d < D) {
      partial += q[i] * float(k_pool[k_row + d]);
    }
  }
  float score = metal::simd_sum(partial);
  if (SOFTCAP) {
    score = softcap * metal::precise::tanh(score / softcap);
  }

  // 3b: move the running sums to the new maximum, then add this key's weight exp(score - max).
  const float new_max = metal::max(running_max, score);
  const float correction = metal::exp(running_max - new_max);  // exp(-inf) = 0 on the first key
  const float weight = metal::exp(score - new_max);
  denom = denom * correction + weight;

  // 3c: the same rescaling for the weighted sum of values.
  for (int i = 0; i < PER_LANE_V; ++i) {
    const int d = int(lane) + 32 * i;
    if (d < DV) {
      acc[i] = acc[i] * correction + weight * float(v_pool[v_row + d]);
    }
  }
  running_max = new_max;
}

// Step 4: divide by the softmax denominator and store in the output dtype.
for (int i = 0; i < PER_LANE_V; ++i) {
  const int d = int(lane) + 32 * i;
  if (d < DV) {
    out[(size_t(t) * HQ + h) * DV + d] = static_cast<T>(acc[i] / denom);
  }
}
