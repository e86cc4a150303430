// KV cache ring buffer for KV-Lock's inversion mode.
//
// A fixed window of `capacity` device slots, each holding one (K, V) pair of a fixed slot
// shape and dtype, keyed by (step, layer).  C++ owns the slot table, the key -> slot map,
// the eviction order (FIFO over resident entries) and the host backing store.
//
// With host_spill, an evicted entry's bytes go to host memory (pinned, on a dedicated
// copy stream ordered with events, when the slots are on CUDA; a plain copy on CPU) and a
// later get()/prefetch() brings them back.  A host copy stays valid until the key is
// overwritten, so evicting an entry that was brought back costs no copy.
//
// With compact, put() takes the token rows to keep (the background) and stores only
// those, packed at the front of the slot; get() returns them with the row index.
//
// Threads: calls into a custom class release the GIL, so every public method takes the
// buffer's mutex for its whole duration; private helpers never lock (they run with the
// mutex held) and no public method calls another public method.
//
// Slots are plain storage: every public method runs under NoGradGuard, so a put of a
// tensor that requires grad never attaches the slot tensors to an autograd graph.
//
// Every argument is validated before anything changes: after any error, each stored key
// still returns its exact bytes.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#ifdef KVLOCK_WITH_CUDA
#include "copy_kernels.h"
#endif

namespace kvlock {
namespace {

struct Key {
  int64_t step;
  int64_t layer;
  bool operator==(const Key& o) const { return step == o.step && layer == o.layer; }
  bool operator<(const Key& o) const { return step < o.step || (step == o.step && layer < o.layer); }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    return std::hash<int64_t>()(k.step) * 1000003u ^ std::hash<int64_t>()(k.layer);
  }
};

using KeySet = std::unordered_set<Key, KeyHash>;

std::string key_str(const Key& k) {
  std::ostringstream s;
  s << "(" << k.step << ", " << k.layer << ")";
  return s.str();
}

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

struct Entry {
  int64_t slot = -1;  // device slot, -1 while the entry lives only on the host
  int64_t rows = 0;   // rows stored (the full slot unless compact)
  at::Tensor index;   // compact: the stored token rows, int64 (on the slots' device while resident)
  at::Tensor host_k, host_v;
  bool host_valid = false;             // host_k/host_v hold the current bytes
  std::unique_ptr<c10::Event> ready;   // CUDA: the copy into the slot has finished
};

}  // namespace

class KVRingBuffer : public torch::CustomClassHolder {
 public:
  KVRingBuffer(int64_t capacity, std::vector<int64_t> slot_shape, c10::ScalarType dtype, c10::Device device,
               bool host_spill, bool compact)
      : capacity_(capacity),
        slot_shape_(std::move(slot_shape)),
        dtype_(dtype),
        device_(device),
        host_spill_(host_spill),
        compact_(compact) {
    at::NoGradGuard no_grad;
    TORCH_CHECK_VALUE(capacity_ >= 1, "capacity must be >= 1, got ", capacity_);
    TORCH_CHECK_VALUE(!slot_shape_.empty(), "slot_shape must have at least one dimension");
    for (int64_t d : slot_shape_) {
      TORCH_CHECK_VALUE(d >= 1, "slot_shape dimensions must be >= 1, got ", shape_str(slot_shape_));
    }
    TORCH_CHECK_VALUE(device_.is_cpu() || device_.is_cuda(), "device must be cpu or cuda, got ", device_.str());
    if (device_.is_cuda() && !device_.has_index()) {
      device_ = c10::Device(c10::DeviceType::CUDA, 0);
    }
    std::vector<int64_t> ring_shape{capacity_};
    ring_shape.insert(ring_shape.end(), slot_shape_.begin(), slot_shape_.end());
    auto opts = at::TensorOptions().dtype(dtype_).device(device_);
    k_slots_ = at::empty(ring_shape, opts);
    v_slots_ = at::empty(ring_shape, opts);
    for (int64_t s = capacity_ - 1; s >= 0; --s) free_slots_.push_back(s);
    slot_free_.resize(capacity_);
    if (device_.is_cuda()) {
      c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
      copy_stream_ = std::make_unique<c10::Stream>(impl.getStreamFromGlobalPool(device_, /*isHighPriority=*/false));
      // The copy stream writes the slots too: when the buffer is freed, the caching
      // allocator must not hand the memory out before that stream's copies are done.
      record_on_copy_stream(k_slots_);
      record_on_copy_stream(v_slots_);
    }
  }

  // put: store (k, v) under key; replaces an existing entry of the same key.
  void put(int64_t step, int64_t layer, const at::Tensor& k_in, const at::Tensor& v_in,
           const c10::optional<at::Tensor>& rows) {
    std::lock_guard<std::mutex> lock(mu_);
    at::NoGradGuard no_grad;
    const Key key{step, layer};
    check_slot_tensor("k", k_in);
    check_slot_tensor("v", v_in);
    at::Tensor index;
    if (rows.has_value()) {
      TORCH_CHECK_VALUE(compact_, "rows is only accepted by a buffer built with compact=True");
      index = checked_rows(*rows);
    } else if (compact_) {
      index = at::arange(slot_shape_[0], at::TensorOptions().dtype(at::kLong).device(device_));
    }
    // k/v may be views of a slot (a put of what get() returned): the eviction below may
    // reuse that very slot, so read them out first.
    at::Tensor k = aliases_slots(k_in) ? k_in.clone() : k_in;
    at::Tensor v = aliases_slots(v_in) ? v_in.clone() : v_in;
    // Validation is complete: from here on the table changes.
    auto it = entries_.find(key);
    int64_t slot = -1;
    if (it != entries_.end() && it->second.slot >= 0) {
      slot = it->second.slot;  // overwrite in place, keep its FIFO position
      if (it->second.ready) it->second.ready->block(current_stream());  // a bring-back still writes it
      wait_slot_free(slot);
    } else {
      // A host-only entry keeps its host copy until the slot is acquired: acquire_slot may
      // throw (a spill needs host memory), and then the entry must still be readable.
      slot = acquire_slot(nullptr);
      resident_.push_back(key);
    }
    Entry& e = entries_[key];
    drop_host(e);
    e.slot = slot;
    e.ready.reset();
    if (compact_) {
      e.rows = index.size(0);
      if (e.index.defined()) record_on_copy_stream(e.index);
      e.index = index;
      gather_into(k_slots_[slot], k, index);
      gather_into(v_slots_[slot], v, index);
    } else {
      e.rows = slot_shape_[0];
      e.index = at::Tensor();
      k_slots_[slot].copy_(k);
      v_slots_[slot].copy_(v);
    }
  }

  // get: views into the slot (valid until the slot is reused), or copies taken under the
  // lock when `copy`, plus the row index if compact.
  std::vector<at::Tensor> get(int64_t step, int64_t layer, bool copy) {
    std::lock_guard<std::mutex> lock(mu_);
    at::NoGradGuard no_grad;
    return get_locked(Key{step, layer}, copy);
  }

  // prefetch: make the first min(#distinct keys, capacity) distinct keys resident, in
  // order.  Room is made by evicting the oldest resident entries that are not among
  // them, so prefetch never evicts a key it brings in or one of them already resident.
  // Keys past the first `capacity` distinct ones are ignored.  All keys must exist.
  void prefetch(const std::vector<int64_t>& steps, const std::vector<int64_t>& layers) {
    std::lock_guard<std::mutex> lock(mu_);
    at::NoGradGuard no_grad;
    TORCH_CHECK_VALUE(steps.size() == layers.size(), "prefetch needs as many steps as layers, got ", steps.size(),
                      " steps and ", layers.size(), " layers");
    std::vector<Key> missing;
    for (size_t i = 0; i < steps.size(); ++i) {
      const Key key{steps[i], layers[i]};
      if (entries_.count(key) == 0 && std::find(missing.begin(), missing.end(), key) == missing.end()) {
        missing.push_back(key);
      }
    }
    if (!missing.empty()) {
      std::ostringstream s;
      s << (missing.size() == 1 ? "key " : "keys [");
      for (size_t i = 0; i < missing.size(); ++i) s << (i ? ", " : "") << key_str(missing[i]);
      s << (missing.size() == 1 ? " is" : "] are") << " not in the ring buffer";
      // The Python wrapper turns IndexError into KeyError.
      TORCH_CHECK_INDEX(false, s.str());
    }
    std::vector<Key> wanted;
    KeySet protect;
    for (size_t i = 0; i < steps.size() && static_cast<int64_t>(wanted.size()) < capacity_; ++i) {
      const Key key{steps[i], layers[i]};
      if (protect.insert(key).second) wanted.push_back(key);
    }
    for (const Key& key : wanted) make_resident(key, entries_.at(key), &protect);
  }

  // pop: remove the entry and return copies of its tensors (the slot is free again).
  std::vector<at::Tensor> pop(int64_t step, int64_t layer) {
    std::lock_guard<std::mutex> lock(mu_);
    at::NoGradGuard no_grad;
    const Key key{step, layer};
    std::vector<at::Tensor> out = get_locked(key, /*copy=*/true);
    remove(key);
    return out;
  }

  // discard: forget the entry without reading it (a replay drops each key after use).
  void discard(int64_t step, int64_t layer) {
    std::lock_guard<std::mutex> lock(mu_);
    const Key key{step, layer};
    require(key);
    remove(key);
  }

  bool contains(int64_t step, int64_t layer) const {
    std::lock_guard<std::mutex> lock(mu_);
    return entries_.count(Key{step, layer}) > 0;
  }

  int64_t size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(entries_.size());
  }

  int64_t capacity() const { return capacity_; }  // immutable after construction

  int64_t device_nbytes() const { return k_slots_.nbytes() + v_slots_.nbytes(); }  // immutable too

  int64_t host_nbytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return host_bytes_;
  }

  int64_t resident_count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(resident_.size());
  }

  bool is_resident(int64_t step, int64_t layer) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(Key{step, layer});
    return it != entries_.end() && it->second.slot >= 0;
  }

  // Resident keys in eviction order (oldest first), then host-only keys sorted by
  // (step, layer): [[step, layer], ...].  One consistent snapshot.
  std::vector<std::vector<int64_t>> keys() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::vector<int64_t>> out;
    out.reserve(entries_.size());
    for (const Key& k : resident_) out.push_back({k.step, k.layer});
    std::vector<Key> host_only;
    for (const auto& kv : entries_) {
      if (kv.second.slot < 0) host_only.push_back(kv.first);
    }
    std::sort(host_only.begin(), host_only.end());
    for (const Key& k : host_only) out.push_back({k.step, k.layer});
    return out;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& kv : entries_) {
      if (kv.second.slot >= 0) release_entry_slot(kv.second);
      if (kv.second.index.defined()) record_on_copy_stream(kv.second.index);
    }
    entries_.clear();
    resident_.clear();
    host_bytes_ = 0;
  }

 private:
  // ---- everything below runs with mu_ held and never takes it ----

  std::vector<at::Tensor> get_locked(const Key& key, bool copy) {
    Entry& e = require(key);
    make_resident(key, e, nullptr);
    if (e.ready) {
      // The current stream waits for the copy stream; the host does not block.
      e.ready->block(current_stream());
      e.ready.reset();
    }
    std::vector<at::Tensor> out{k_slots_[e.slot].narrow(0, 0, e.rows), v_slots_[e.slot].narrow(0, 0, e.rows)};
    if (compact_) out.push_back(e.index);
    if (copy) {
      for (auto& t : out) t = t.clone();
    }
    return out;
  }

  void check_slot_tensor(const char* name, const at::Tensor& t) const {
    TORCH_CHECK_TYPE(t.defined(), name, " must be a tensor, got None");
    TORCH_CHECK_TYPE(!t.is_nested(), name, " must be a dense tensor, got a nested tensor");
    TORCH_CHECK_TYPE(t.layout() == c10::kStrided, name, " must be a dense (strided) tensor, got layout ", t.layout());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype_, name, " must have the slot dtype ", c10::toString(dtype_), ", got ",
                     c10::toString(t.scalar_type()));
    TORCH_CHECK_VALUE(t.device() == device_, name, " must be on the slot device ", device_.str(), ", got ",
                      t.device().str());
    TORCH_CHECK_VALUE(t.sizes().vec() == slot_shape_, name, " must have the slot shape ", shape_str(slot_shape_),
                      ", got ", shape_str(t.sizes()));
  }

  bool aliases_slots(const at::Tensor& t) const {
    return t.has_storage() && (t.storage().is_alias_of(k_slots_.storage()) ||
                               t.storage().is_alias_of(v_slots_.storage()));
  }

  at::Tensor checked_rows(const at::Tensor& rows) const {
    TORCH_CHECK_TYPE(rows.defined(), "rows must be a tensor, got None");
    TORCH_CHECK_TYPE(!rows.is_nested(), "rows must be a dense index tensor, got a nested tensor");
    TORCH_CHECK_TYPE(rows.layout() == c10::kStrided, "rows must be a dense (strided) index tensor, got layout ",
                     rows.layout());
    TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt,
                     "rows must be an int64 or int32 index tensor, got ", c10::toString(rows.scalar_type()));
    TORCH_CHECK_VALUE(rows.dim() == 1, "rows must be 1-D, got shape ", shape_str(rows.sizes()));
    TORCH_CHECK_VALUE(rows.device().is_cpu() || rows.device() == device_, "rows must be on cpu or the slot device ",
                      device_.str(), ", got ", rows.device().str());
    TORCH_CHECK_VALUE(rows.size(0) <= slot_shape_[0], "rows must select at most ", slot_shape_[0], " rows, got ",
                      rows.size(0));
    at::Tensor idx = rows.to(device_, at::kLong).contiguous();
    if (idx.numel() > 0) {
      // One host read of two scalars; put() belongs to the inversion pass, not the hot loop.
      const int64_t lo = idx.min().item<int64_t>();
      const int64_t hi = idx.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < slot_shape_[0], "rows must lie in [0, ", slot_shape_[0], "), got min ", lo,
                        ", max ", hi);
    }
    // A private copy: the caller may reuse its index tensor.
    return idx.data_ptr() == rows.data_ptr() ? idx.clone() : idx;
  }

  Entry& require(const Key& key) {
    auto it = entries_.find(key);
    // The Python wrapper turns IndexError into KeyError.
    TORCH_CHECK_INDEX(it != entries_.end(), "key ", key_str(key), " is not in the ring buffer");
    return it->second;
  }

  c10::Stream current_stream() const {
    c10::impl::VirtualGuardImpl impl(device_.type());
    return impl.getStream(device_);
  }

  // A device tensor that the copy stream reads or writes: when it is freed, the caching
  // allocator must wait for that stream's work before reusing the memory (record_stream).
  void record_on_copy_stream(const at::Tensor& t) const {
    if (!copy_stream_ || !t.defined() || !t.is_cuda() || !t.has_storage() || t.storage().data() == nullptr) return;
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    impl.recordDataPtrOnStream(t.storage().data_ptr(), *copy_stream_);
  }

  // The slot's previous contents are still being read by a spill copy: wait for it.
  void wait_slot_free(int64_t slot) {
    if (slot_free_[slot]) {
      slot_free_[slot]->block(current_stream());
      slot_free_[slot].reset();
    }
  }

  // A free slot, evicting the oldest resident entry not in `protect` if none is free.
  int64_t acquire_slot(const KeySet* protect) {
    if (free_slots_.empty()) evict_oldest(protect);
    const int64_t slot = free_slots_.back();
    free_slots_.pop_back();
    wait_slot_free(slot);
    return slot;
  }

  void evict_oldest(const KeySet* protect) {
    auto it = resident_.begin();
    if (protect != nullptr) {
      while (it != resident_.end() && protect->count(*it) > 0) ++it;
    }
    // prefetch protects at most `capacity` keys and only asks for a slot while one of
    // them is not resident, so an unprotected resident entry always exists.
    TORCH_INTERNAL_ASSERT(it != resident_.end(), "ring buffer has no evictable resident entry");
    const Key victim = *it;
    Entry& e = entries_.at(victim);
    if (host_spill_ && !e.host_valid) spill(e);  // may throw (host memory): nothing has changed yet
    resident_.erase(it);
    release_entry_slot(e);
    if (!host_spill_) {
      if (e.index.defined()) record_on_copy_stream(e.index);
      entries_.erase(victim);
    }
  }

  // Free an entry's slot.  A copy into the slot still in flight (a bring-back nobody has
  // waited for) becomes the slot's busy marker, so the next writer waits for it.
  void release_entry_slot(Entry& e) {
    if (e.ready && !slot_free_[e.slot]) slot_free_[e.slot] = std::move(e.ready);
    e.ready.reset();
    free_slots_.push_back(e.slot);
    e.slot = -1;
  }

  // Copy an entry's slot to host memory.  On CUDA: on the copy stream, after the work
  // already queued on the current stream, and the slot is marked busy until it is done.
  void spill(Entry& e) {
    auto host_opts = at::TensorOptions().dtype(dtype_).device(at::kCPU).pinned_memory(device_.is_cuda());
    std::vector<int64_t> shape = slot_shape_;
    shape[0] = e.rows;
    at::Tensor host_k = at::empty(shape, host_opts);
    at::Tensor host_v = at::empty(shape, host_opts);
    at::Tensor host_index;
    if (compact_) host_index = at::empty({e.rows}, host_opts.dtype(at::kLong));
    at::Tensor k_src = k_slots_[e.slot].narrow(0, 0, e.rows);
    at::Tensor v_src = v_slots_[e.slot].narrow(0, 0, e.rows);
    if (device_.is_cuda()) {
      c10::Event produced(c10::DeviceType::CUDA);
      produced.record(current_stream());
      produced.block(*copy_stream_);
      {
        c10::StreamGuard guard(*copy_stream_);
        host_k.copy_(k_src, /*non_blocking=*/true);
        host_v.copy_(v_src, /*non_blocking=*/true);
        if (compact_) host_index.copy_(e.index, /*non_blocking=*/true);
      }
      // The device index was allocated on the current stream and is dropped below while
      // the copy stream may still read it: without this its memory could be handed out
      // (and overwritten) before the transfer is done.
      if (compact_) record_on_copy_stream(e.index);
      slot_free_[e.slot] = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
      slot_free_[e.slot]->record(*copy_stream_);
    } else {
      host_k.copy_(k_src);
      host_v.copy_(v_src);
      if (compact_) host_index.copy_(e.index);
    }
    e.host_k = std::move(host_k);
    e.host_v = std::move(host_v);
    if (compact_) e.index = std::move(host_index);
    e.host_valid = true;
    host_bytes_ += e.host_k.nbytes() + e.host_v.nbytes();
  }

  // Bring a host-only entry back into a slot (no-op if resident).
  void make_resident(const Key& key, Entry& e, const KeySet* protect) {
    if (e.slot >= 0) return;
    TORCH_INTERNAL_ASSERT(e.host_valid, "entry ", key_str(key), " has neither a slot nor a host copy");
    // Allocated before acquire_slot so that an allocation failure leaves the table as it was.
    at::Tensor dev_index;
    if (compact_) dev_index = at::empty({e.rows}, at::TensorOptions().dtype(at::kLong).device(device_));
    const int64_t slot = acquire_slot(protect);
    at::Tensor k_dst = k_slots_[slot].narrow(0, 0, e.rows);
    at::Tensor v_dst = v_slots_[slot].narrow(0, 0, e.rows);
    if (device_.is_cuda()) {
      // The slot's previous readers are on the current stream: the copy waits for them.
      c10::Event readers_done(c10::DeviceType::CUDA);
      readers_done.record(current_stream());
      readers_done.block(*copy_stream_);
      {
        c10::StreamGuard guard(*copy_stream_);
        k_dst.copy_(e.host_k, /*non_blocking=*/true);
        v_dst.copy_(e.host_v, /*non_blocking=*/true);
        if (compact_) dev_index.copy_(e.index, /*non_blocking=*/true);
      }
      // dev_index belongs to the current stream (where get() hands it out) but the copy
      // stream writes it: if the entry is dropped before get(), the memory must not be
      // reused before that write is done.
      if (compact_) record_on_copy_stream(dev_index);
      e.ready = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
      e.ready->record(*copy_stream_);
    } else {
      k_dst.copy_(e.host_k);
      v_dst.copy_(e.host_v);
      if (compact_) dev_index.copy_(e.index);
    }
    // A compact entry keeps one index, on the device while resident; the host copy is
    // dropped here (the pinned host allocator keeps it until the copy reading it is done).
    if (compact_) e.index = std::move(dev_index);
    e.slot = slot;
    resident_.push_back(key);
  }

  void gather_into(const at::Tensor& slot, const at::Tensor& src, const at::Tensor& index) {
    const int64_t n = index.size(0);
    at::Tensor dst = slot.narrow(0, 0, n);
#ifdef KVLOCK_WITH_CUDA
    if (device_.is_cuda() && src.stride(-1) == 1 && src[0].is_contiguous()) {
      c10::DeviceGuard guard(device_);  // launch on the slots' device and its current stream
      const int64_t row_bytes = src[0].numel() * src.element_size();
      const int err = gather_rows_cuda(src.data_ptr(), src.stride(0) * src.element_size(), dst.data_ptr(),
                                       index.data_ptr<int64_t>(), n, row_bytes, current_stream().native_handle());
      if (err == 0) return;
      // No kernel image for this GPU (or a launch error): the table has already changed,
      // so fall through to ATen's gather rather than leave the entry half-written.
    }
#endif
    at::index_select_out(dst, src, 0, index);
  }

  void drop_host(Entry& e) {
    if (e.host_valid) host_bytes_ -= e.host_k.nbytes() + e.host_v.nbytes();
    e.host_k = at::Tensor();
    e.host_v = at::Tensor();
    e.host_valid = false;
  }

  void remove(const Key& key) {
    auto it = entries_.find(key);
    if (it == entries_.end()) return;
    if (it->second.slot >= 0) {
      release_entry_slot(it->second);
      resident_.erase(std::find(resident_.begin(), resident_.end(), key));
    }
    drop_host(it->second);
    if (it->second.index.defined()) record_on_copy_stream(it->second.index);
    entries_.erase(it);
  }

  mutable std::mutex mu_;  // guards everything below except the immutable configuration
  const int64_t capacity_;
  const std::vector<int64_t> slot_shape_;
  const c10::ScalarType dtype_;
  c10::Device device_;  // fixed in the constructor
  const bool host_spill_;
  const bool compact_;
  at::Tensor k_slots_, v_slots_;  // (capacity, *slot_shape)
  std::unordered_map<Key, Entry, KeyHash> entries_;
  std::deque<Key> resident_;  // keys holding a slot, oldest first (the eviction order)
  std::vector<int64_t> free_slots_;
  std::vector<std::unique_ptr<c10::Event>> slot_free_;  // CUDA: a spill copy still reads the slot
  std::unique_ptr<c10::Stream> copy_stream_;
  int64_t host_bytes_ = 0;
};

// A fragment: the Python side registers its custom ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(kvlock_kernels, m) {
  m.class_<KVRingBuffer>("KVRingBuffer")
      .def(torch::init<int64_t, std::vector<int64_t>, c10::ScalarType, c10::Device, bool, bool>())
      .def("put", &KVRingBuffer::put)
      .def("get", &KVRingBuffer::get)
      .def("prefetch", &KVRingBuffer::prefetch)
      .def("pop", &KVRingBuffer::pop)
      .def("discard", &KVRingBuffer::discard)
      .def("contains", &KVRingBuffer::contains)
      .def("size", &KVRingBuffer::size)
      .def("capacity", &KVRingBuffer::capacity)
      .def("device_nbytes", &KVRingBuffer::device_nbytes)
      .def("host_nbytes", &KVRingBuffer::host_nbytes)
      .def("resident_count", &KVRingBuffer::resident_count)
      .def("is_resident", &KVRingBuffer::is_resident)
      .def("keys", &KVRingBuffer::keys)
      .def("clear", &KVRingBuffer::clear);
}

}  // namespace kvlock

namespace kvlock {
namespace {

bool built_with_cuda() {
#ifdef KVLOCK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlock_kernels, m) {
  m.def("ring_buffer_built_with_cuda() -> bool", &built_with_cuda);
}

}  // namespace kvlock
