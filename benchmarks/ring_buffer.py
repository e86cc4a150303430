"""Main-job section for the KV ring buffer: put / spill / replay throughput against a
plain ``Tensor.copy_`` of the same bytes."""
from __future__ import annotations

import statistics
import time

import torch

from kvlock_kernels import KVRingBuffer

# One batch entry of Wan2.1-1.3B 480p self-attention K (or V): 32,760 tokens x 12 x 128,
# bf16 = 100 MB; K + V per (step, layer) = 201 MB.
WAN_SLOT = (32760, 12, 128)
CPU_SLOT = (4096, 12, 128)


def _wall(fn, device, repeats, setup=None):
    """Median wall time (s) of fn after an untimed setup, synchronising the device
    (copy streams included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 1):  # the first run warms up (page faults, allocator)
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ring_buffer_rows(device, slot_shape, capacity=4, n_entries=8, repeats=3):
    """[(name, GB/s, baseline GB/s)] for put, spill-on-put and reverse replay with prefetch."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    entries = [(torch.randn(slot_shape, generator=g).to(device, dtype),
                torch.randn(slot_shape, generator=g).to(device, dtype)) for _ in range(n_entries)]
    pair_bytes = 2 * entries[0][0].numel() * entries[0][0].element_size()
    # Baselines copy the same bytes into as many distinct destinations as the ring has
    # slots, so neither side gets cache-hot destinations the other does not.
    pinned = device.type == "cuda"
    dev_dst = [(torch.empty_like(k), torch.empty_like(v)) for k, v in entries[:capacity]]
    host_dst = [(torch.empty(slot_shape, dtype=dtype, pin_memory=pinned),
                 torch.empty(slot_shape, dtype=dtype, pin_memory=pinned)) for _ in range(capacity)]

    def copy_d2d():
        for (k, v), (dk, dv) in zip(entries, dev_dst):
            dk.copy_(k)
            dv.copy_(v)

    def copy_d2h():
        for (k, v), (hk, hv) in zip(entries, host_dst):
            hk.copy_(k, non_blocking=pinned)
            hv.copy_(v, non_blocking=pinned)

    buf = KVRingBuffer(capacity, slot_shape, dtype, device)

    def puts():
        for i, (k, v) in enumerate(entries[:capacity]):
            buf.put((0, i), k, v)

    spill_buf = KVRingBuffer(capacity, slot_shape, dtype, device, host_spill=True)

    def spilling_puts():  # every put past `capacity` first spills the oldest entry to the host
        spill_buf.clear()
        for i, (k, v) in enumerate(entries):
            spill_buf.put((i, 0), k, v)

    order = [(i, 0) for i in reversed(range(n_entries))]

    def replay():  # the denoising pass: reverse order, prefetching ahead
        for j, key in enumerate(order):
            if j % capacity == 0:
                spill_buf.prefetch(order[j:j + capacity])
            spill_buf.get(key)
            spill_buf.discard(key)  # used once: free the slot instead of spilling it

    t_d2d = _wall(copy_d2d, device, repeats)
    t_d2h = _wall(copy_d2h, device, repeats)
    gbps = lambda nbytes, t: nbytes / t / 1e9  # noqa: E731
    rows = [("put (resident)", gbps(capacity * pair_bytes, _wall(puts, device, repeats)),
             "copy_ on device", gbps(capacity * pair_bytes, t_d2d))]
    t_spill = _wall(spilling_puts, device, repeats)
    # Bytes moved: n puts into slots + (n - capacity) spills to the host.
    moved = n_entries * pair_bytes + (n_entries - capacity) * pair_bytes
    rows.append(("put with host spill", gbps(moved, t_spill), "copy_ device -> host",
                 gbps(capacity * pair_bytes, t_d2h)))
    t_replay = _wall(replay, device, repeats, setup=spilling_puts)
    # The replay reads the resident entries in place and brings back the (n - capacity)
    # spilled ones; bytes counted: those brought back.
    rows.append(("reverse replay (prefetch + get)", gbps((n_entries - capacity) * pair_bytes, t_replay),
                 "copy_ device -> host", gbps(capacity * pair_bytes, t_d2h)))
    return rows, pair_bytes
