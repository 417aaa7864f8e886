// reshape_and_cache: the pools after writing this step's keys and values to their slots.
// Reference: vmetal/engine/runner/attention/reference.py::reshape_and_cache.
// Test: tests/unit/test_paged_attention.py::test_metal_cache_kernels_match_reference (Metal only).
//
// This file is a kernel BODY: MLX (mx.fast.metal_kernel) writes the signature from the names below.
// MLX kernels write fresh output buffers, never their inputs, so this kernel writes the whole new pool:
// one thread per pool element. Launch (vmetal/engine/runner/attention/metal.py::plan_reshape_and_cache):
// grid (HKV * D, num_blocks * BS, 1), threadgroup (min(HKV * D, 256), 1, 1).
// Template: T pool dtype; ROW = HKV * D, the elements of one slot.
// Inputs:  keys, values [num_tokens, HKV, D]; k_pool, v_pool [num_blocks, BS, HKV, D];
//          slot_token [num_blocks * BS] int32: the token written to each slot, -1 for none (the inverse of
//          slot_mapping; tokens with slot -1 appear nowhere in it, so they write nothing).
// Outputs: k_out, v_out, shaped like the pools.

// Step 1: which element of which slot this thread produces.
const uint e = thread_position_in_grid.x;  // (kv head, dim) element inside the slot
const uint slot = thread_position_in_grid.y;
const size_t dst = size_t(slot) * ROW + e;

// Step 2: the token written to this slot in this step, if any.
const int tok = slot_token[slot];
if (tok >= 0) {
  // Step 3: a new key/value, cast to the pool dtype (the reference's astype(pool.dtype)).
  const size_t src = size_t(tok) * ROW + e;
  k_out[dst] = static_cast<T>(float(keys[src]));
  v_out[dst] = static_cast<T>(float(values[src]));
} else {
  // Step 4: any other slot keeps what the pool held.
  k_out[dst] = k_pool[dst];
  v_out[dst] = v_pool[dst];
}
