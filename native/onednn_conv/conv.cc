// oneDNN 2-D float32 convolutions as XLA FFI handlers (prototype for issue 30).
//
// Three handlers, all NHWC activations and HWIO kernels (what XLA:CPU and nio_jax use):
//
//   onednn_conv_fwd          y  = conv(x, w)                     x [N,H,W,C], w [KH,KW,C/G,O]
//   onednn_conv_bwd_data     dx = conv_transpose_x(dy, w)        dy [N,OH,OW,O] -> dx [N,H,W,C]
//   onednn_conv_bwd_weights  dw = conv_transpose_w(x, dy)        -> dw [KH,KW,C/G,O]
//
// Attributes (all ops): window_strides, padding_lo, padding_hi, rhs_dilation (int64 arrays of
// length 2, lax conventions: dilation 1 = dense) and feature_group_count (int64). The shape
// that is not implied by the operands (dx of bwd_data, dw of bwd_weights) is the result
// buffer's shape.
//
// Primitives are cached per thread, keyed on the op, the shapes and the attributes, so a
// repeated call only binds the data pointers and executes. oneDNN's own primitive cache
// shares the JIT-compiled kernels between threads.
//
// Threads: see README.md. With an OpenMP build of oneDNN (Debian's libdnnl, this prototype)
// every call runs an OpenMP parallel region of `onednn_conv_set_num_threads(n)` threads
// (default: OpenMP's, i.e. OMP_NUM_THREADS or the number of cores).

#include <oneapi/dnnl/dnnl.hpp>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dims = dnnl::memory::dims;
using I64Span = ffi::Span<const int64_t>;

std::atomic<int> g_num_threads{0};  // 0 = leave the threading runtime's default

enum class Op : int { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Conv {
  // Logical problem (oneDNN's N,C,H,W / [G,]O,I,KH,KW order) and attributes.
  int64_t n, c, h, w, o, oh, ow, kh, kw, groups;
  dims strides, dil, pad_l, pad_r;  // oneDNN dilation = lax dilation - 1
};

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

// NHWC activations as strided descriptors over the logical N,C,H,W dims.
dnnl::memory::desc ActDesc(int64_t n, int64_t c, int64_t h, int64_t w) {
  return dnnl::memory::desc({n, c, h, w}, dnnl::memory::data_type::f32,
                            dims{h * w * c, 1, w * c, c});
}

// Logical kernel dims: O,I,KH,KW, or G,O/G,I/G,KH,KW with feature groups.
dims WeiDims(const Conv& p) {
  if (p.groups == 1) return {p.o, p.c, p.kh, p.kw};
  return {p.groups, p.o / p.groups, p.c / p.groups, p.kh, p.kw};
}

// HWIO kernel [KH,KW,C/G,O] as a (grouped) OIHW-logical strided descriptor.
dnnl::memory::desc WeiDesc(const Conv& p) {
  const int64_t ig = p.c / p.groups, og = p.o / p.groups;
  if (p.groups == 1) {
    return dnnl::memory::desc(WeiDims(p), dnnl::memory::data_type::f32,
                              dims{1, p.o, p.kw * p.c * p.o, p.c * p.o});
  }
  return dnnl::memory::desc(WeiDims(p), dnnl::memory::data_type::f32,
                            dims{og, 1, p.o, p.kw * ig * p.o, ig * p.o});
}

struct Entry {
  dnnl::primitive prim;
  dnnl::memory a, b, out;  // argument memories whose handles are rebound per call
  int arg_a, arg_b, arg_out;
  // The kernel in the primitive's own (blocked) layout when it is not HWIO: the caller's
  // HWIO kernel is reordered into `w_prim` before (fwd, bwd_data), or the result out of it
  // after (bwd_weights), the call. `w_user` is the caller's HWIO buffer.
  bool w_reorder = false;
  dnnl::memory w_user, w_prim;
  dnnl::primitive w_copy;
};

std::string Key(Op op, const Conv& p) {
  std::ostringstream k;
  k << static_cast<int>(op) << ':' << p.n << ',' << p.c << ',' << p.h << ',' << p.w << ','
    << p.o << ',' << p.oh << ',' << p.ow << ',' << p.kh << ',' << p.kw << ',' << p.groups;
  for (const dims* d : {&p.strides, &p.dil, &p.pad_l, &p.pad_r})
    for (auto v : *d) k << ',' << v;
  return k.str();
}

#if DNNL_VERSION_MAJOR >= 3
dnnl::convolution_forward::primitive_desc FwdPd(const Conv& p, const dnnl::memory::desc& x,
                                                const dnnl::memory::desc& wt,
                                                const dnnl::memory::desc& y) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x, wt,
      y, p.strides, p.dil, p.pad_l, p.pad_r);
}
#else
dnnl::convolution_forward::primitive_desc FwdPd(const Conv& p, const dnnl::memory::desc& x,
                                                const dnnl::memory::desc& wt,
                                                const dnnl::memory::desc& y) {
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, x, wt, y, p.strides,
                                    p.dil, p.pad_l, p.pad_r);
  return dnnl::convolution_forward::primitive_desc(d, Engine());
}
#endif

// With ONEDNN_CONV_WEIGHTS_HWIO=1 in the environment the primitives take the HWIO kernel as
// it is (oneDNN then picks its im2col + GEMM kernels); by default they choose their kernel
// layout (`any`: blocked, for the direct JIT kernels) and the kernel is reordered per call.
bool FixedWeights() {
  static const bool fixed = [] {
    const char* v = std::getenv("ONEDNN_CONV_WEIGHTS_HWIO");
    return v != nullptr && v[0] == '1';
  }();
  return fixed;
}

Entry Make(Op op, const Conv& p) {
  auto& eng = Engine();
  auto x = ActDesc(p.n, p.c, p.h, p.w);
  auto y = ActDesc(p.n, p.o, p.oh, p.ow);
  auto wt_user = WeiDesc(p);
  auto wt = FixedWeights() ? wt_user
                           : dnnl::memory::desc(WeiDims(p), dnnl::memory::data_type::f32,
                                                dnnl::memory::format_tag::any);
  auto hint = FwdPd(p, x, wt, y);
  Entry e;
  dnnl::memory::desc wt_prim;
  if (op == Op::kFwd) {
    e.prim = dnnl::convolution_forward(hint);
    wt_prim = hint.weights_desc();
    e.a = dnnl::memory(x, eng, DNNL_MEMORY_NONE);
    e.out = dnnl::memory(y, eng, DNNL_MEMORY_NONE);
    e.arg_a = DNNL_ARG_SRC;
    e.arg_b = DNNL_ARG_WEIGHTS;
    e.arg_out = DNNL_ARG_DST;
  } else if (op == Op::kBwdData) {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(
        eng, dnnl::algorithm::convolution_direct, x, wt, y, p.strides, p.dil, p.pad_l, p.pad_r,
        hint);
#else
    dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, x, wt, y,
                                            p.strides, p.dil, p.pad_l, p.pad_r);
    dnnl::convolution_backward_data::primitive_desc pd(d, eng, hint);
#endif
    e.prim = dnnl::convolution_backward_data(pd);
    wt_prim = pd.weights_desc();
    e.a = dnnl::memory(y, eng, DNNL_MEMORY_NONE);
    e.out = dnnl::memory(x, eng, DNNL_MEMORY_NONE);
    e.arg_a = DNNL_ARG_DIFF_DST;
    e.arg_b = DNNL_ARG_WEIGHTS;
    e.arg_out = DNNL_ARG_DIFF_SRC;
  } else {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_weights::primitive_desc pd(
        eng, dnnl::algorithm::convolution_direct, x, wt, y, p.strides, p.dil, p.pad_l, p.pad_r,
        hint);
#else
    dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, x, wt, y,
                                               p.strides, p.dil, p.pad_l, p.pad_r);
    dnnl::convolution_backward_weights::primitive_desc pd(d, eng, hint);
#endif
    e.prim = dnnl::convolution_backward_weights(pd);
    wt_prim = pd.diff_weights_desc();
    e.a = dnnl::memory(x, eng, DNNL_MEMORY_NONE);
    e.b = dnnl::memory(y, eng, DNNL_MEMORY_NONE);
    e.arg_a = DNNL_ARG_SRC;
    e.arg_b = DNNL_ARG_DIFF_DST;
    e.arg_out = DNNL_ARG_DIFF_WEIGHTS;
  }
  e.w_reorder = wt_prim != wt_user;
  e.w_user = dnnl::memory(wt_user, eng, DNNL_MEMORY_NONE);
  if (e.w_reorder) {
    e.w_prim = dnnl::memory(wt_prim, eng);  // owned scratch in the primitive's layout
    e.w_copy = op == Op::kBwdWeights ? dnnl::reorder(e.w_prim, e.w_user)
                                     : dnnl::reorder(e.w_user, e.w_prim);
  }
  dnnl::memory& w_arg = e.w_reorder ? e.w_prim : e.w_user;
  (op == Op::kBwdWeights ? e.out : e.b) = w_arg;
  return e;
}

// Builds the problem from the three buffers' dims (x, w, y in forward terms).
ffi::Error MakeConv(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                    ffi::Span<const int64_t> yd, I64Span strides, I64Span pad_lo,
                    I64Span pad_hi, I64Span dilation, int64_t groups, Conv* p) {
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: operands must be rank 4 (NHWC / HWIO)");
  if (strides.size() != 2 || pad_lo.size() != 2 || pad_hi.size() != 2 || dilation.size() != 2)
    return ffi::Error::InvalidArgument(
        "onednn_conv: window_strides, padding_lo, padding_hi, rhs_dilation need 2 entries");
  if (groups < 1 || xd[3] % groups != 0 || yd[3] % groups != 0 || wd[2] * groups != xd[3] ||
      wd[3] != yd[3] || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes / feature groups");
  p->n = xd[0];
  p->h = xd[1];
  p->w = xd[2];
  p->c = xd[3];
  p->kh = wd[0];
  p->kw = wd[1];
  p->o = wd[3];
  p->oh = yd[1];
  p->ow = yd[2];
  p->groups = groups;
  p->strides = {strides[0], strides[1]};
  p->dil = {dilation[0] - 1, dilation[1] - 1};
  p->pad_l = {pad_lo[0], pad_lo[1]};
  p->pad_r = {pad_hi[0], pad_hi[1]};
  return ffi::Error::Success();
}

ffi::Error Run(Op op, const Conv& p, void* a, void* b, void* out) {
  thread_local std::unordered_map<std::string, Entry> cache;
  try {
    const std::string key = Key(op, p);
    auto it = cache.find(key);
    if (it == cache.end()) it = cache.emplace(key, Make(op, p)).first;
    Entry& e = it->second;
    const bool w_is_out = op == Op::kBwdWeights;
    e.a.set_data_handle(a);
    e.w_user.set_data_handle(w_is_out ? out : b);
    // The kernel argument is e.w_user itself (no reorder) or the owned e.w_prim.
    if (w_is_out) {
      e.b.set_data_handle(b);
    } else {
      e.out.set_data_handle(out);
    }
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
    if (int nt = g_num_threads.load(std::memory_order_relaxed); nt > 0) omp_set_num_threads(nt);
#endif
    auto& s = Stream();
    if (e.w_reorder && !w_is_out)
      e.w_copy.execute(s, {{DNNL_ARG_FROM, e.w_user}, {DNNL_ARG_TO, e.w_prim}});
    e.prim.execute(s, {{e.arg_a, e.a}, {e.arg_b, e.b}, {e.arg_out, e.out}});
    if (e.w_reorder && w_is_out)
      e.w_copy.execute(s, {{DNNL_ARG_FROM, e.w_prim}, {DNNL_ARG_TO, e.w_user}});
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN error: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, I64Span strides, I64Span pad_lo,
                   I64Span pad_hi, I64Span dilation, int64_t groups) {
  Conv p;
  if (auto err = MakeConv(x.dimensions(), w.dimensions(), y->dimensions(), strides, pad_lo,
                          pad_hi, dilation, groups, &p);
      err.failure())
    return err;
  return Run(Op::kFwd, p, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BwdDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx, I64Span strides, I64Span pad_lo,
                       I64Span pad_hi, I64Span dilation, int64_t groups) {
  Conv p;
  if (auto err = MakeConv(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, pad_lo,
                          pad_hi, dilation, groups, &p);
      err.failure())
    return err;
  return Run(Op::kBwdData, p, dy.untyped_data(), w.untyped_data(), dx->untyped_data());
}

ffi::Error BwdWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, I64Span strides, I64Span pad_lo,
                          I64Span pad_hi, I64Span dilation, int64_t groups) {
  Conv p;
  if (auto err = MakeConv(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, pad_lo,
                          pad_hi, dilation, groups, &p);
      err.failure())
    return err;
  return Run(Op::kBwdWeights, p, x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

}  // namespace

// Two F32 operands, one F32 result, the five convolution attributes.
#define ONEDNN_CONV_BINDING                         \
  ffi::Ffi::Bind()                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Ret<ffi::Buffer<ffi::F32>>()                 \
      .Attr<I64Span>("window_strides")              \
      .Attr<I64Span>("padding_lo")                  \
      .Attr<I64Span>("padding_hi")                  \
      .Attr<I64Span>("rhs_dilation")                \
      .Attr<int64_t>("feature_group_count")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvFwd, FwdImpl,
                              ONEDNN_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdData, BwdDataImpl,
                              ONEDNN_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdWeights, BwdWeightsImpl,
                              ONEDNN_CONV_BINDING);

extern "C" {

// Threads of every later call (OpenMP builds); n <= 0 restores the runtime's default.
void onednn_conv_set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }

// "oneDNN <major>.<minor>.<patch>, cpu runtime <omp|tbb|seq|threadpool|sycl|...>".
const char* onednn_conv_info() {
  static std::string info = [] {
    const dnnl_version_t* v = dnnl_version();
    const char* rt = "other";
    switch (v->cpu_runtime) {
      case DNNL_RUNTIME_SEQ: rt = "seq"; break;
      case DNNL_RUNTIME_OMP: rt = "omp"; break;
      case DNNL_RUNTIME_TBB: rt = "tbb"; break;
      case DNNL_RUNTIME_THREADPOOL: rt = "threadpool"; break;
      case DNNL_RUNTIME_SYCL: rt = "sycl"; break;
      default: break;
    }
    std::ostringstream s;
    s << "oneDNN " << v->major << '.' << v->minor << '.' << v->patch << ", cpu runtime " << rt;
    return s.str();
  }();
  return info.c_str();
}

// 0 when a CPU engine can be created, else -1 (the SYCL build of the onednn wheel cannot
// create one without a SYCL CPU device); the message goes to `err` (up to `len` bytes).
int onednn_conv_check_engine(char* err, int len) {
  try {
    (void)Engine();
    return 0;
  } catch (const dnnl::error& e) {
    if (err && len > 0) std::snprintf(err, len, "%s", e.what());
    return -1;
  }
}

}  // extern "C"
