// The tensor-level op contract (engine/ops.h) on CPU streams: each op, dispatched through a
// stream, gives bit for bit what the CPU reference kernel gives when called directly, so the
// dispatch passes every argument to the right place. Also: ops run asynchronously in stream
// order, and captured tensors keep their storage alive until the queued work has run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <future>
#include <random>

#include "engine/allocator.h"
#include "engine/device.h"
#include "engine/ops.h"
#include "kernels/common/error.h"
#include "kernels/cpu/ops.h"

using namespace sp;
namespace kc = sp::kernels::cpu;

namespace {

Tensor random_tensor(const Shape& shape, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.at<float>(i) = u(rng);
  return t;
}

std::vector<float> values(const Tensor& t) { return std::vector<float>(t.data<float>(), t.data<float>() + t.numel()); }

class OpsDispatch : public ::testing::Test {
 protected:
  std::unique_ptr<Stream> s = make_stream(Device::cpu());
};

TEST_F(OpsDispatch, ConvolutionThreeWays) {
  kernels::Conv2dShape sh;
  sh.n = 3, sh.h = 9, sh.w = 7, sh.c = 5, sh.k = 6, sh.r = 3, sh.s = 3, sh.stride = 2, sh.pad = 1;
  Tensor x = random_tensor({3, 9, 7, 5}, 1), w = random_tensor({6, 3, 3, 5}, 2), b = random_tensor({6}, 3);
  const Shape yshape = ops::conv2d_output_shape(x.shape(), w.shape(), 2, 1);
  ASSERT_EQ(yshape, (Shape{3, sh.p(), sh.q(), 6}));
  Tensor y = Tensor::empty(yshape, DType::F32), dy = random_tensor(yshape, 4);
  Tensor dx = Tensor::empty(x.shape(), DType::F32), dw = Tensor::empty(w.shape(), DType::F32);
  Tensor db = Tensor::empty({6}, DType::F32);
  ops::conv2d_forward(*s, x, w, b, y, 2, 1);
  ops::conv2d_backward_data(*s, dy, w, dx, 2, 1);
  ops::conv2d_backward_weight(*s, x, dy, dw, db, 2, 1);
  s->synchronize();
  std::vector<float> ry(size_t(y.numel())), rdx(size_t(x.numel())), rdw(size_t(w.numel())), rdb(6);
  kc::conv2d_forward<float>(sh, x.data<float>(), w.data<float>(), b.data<float>(), ry.data());
  kc::conv2d_backward_data<float>(sh, dy.data<float>(), w.data<float>(), rdx.data());
  kc::conv2d_backward_weight<float>(sh, x.data<float>(), dy.data<float>(), rdw.data(), rdb.data());
  EXPECT_EQ(values(y), ry);
  EXPECT_EQ(values(dx), rdx);
  EXPECT_EQ(values(dw), rdw);
  EXPECT_EQ(values(db), rdb);
}

// ---- bf16 tensors: the reference semantics (widen, fp32 op, round) -------------------------

Tensor to_bf16(const Tensor& f) {
  Tensor b = Tensor::empty(f.shape(), DType::BF16);
  kc::f32_to_bf16(f.numel(), f.data<float>(), b.data<uint16_t>());
  return b;
}
std::vector<float> widened(const Tensor& b) {
  std::vector<float> v(size_t(b.numel()));
  kc::bf16_to_f32(b.numel(), b.data<uint16_t>(), v.data());
  return v;
}
std::vector<float> rounded(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  kc::f32_to_bf16(int64_t(v.size()), v.data(), b.data());
  std::vector<float> r(v.size());
  kc::bf16_to_f32(int64_t(v.size()), b.data(), r.data());
  return r;
}

TEST_F(OpsDispatch, Bf16TensorsAreWidenedComputedInFp32AndRounded) {
  kernels::Conv2dShape sh;
  sh.n = 2, sh.h = 6, sh.w = 5, sh.c = 4, sh.k = 3, sh.r = 3, sh.s = 3, sh.stride = 1, sh.pad = 1;
  const Tensor x = to_bf16(random_tensor({2, 6, 5, 4}, 31)), w = to_bf16(random_tensor({3, 3, 3, 4}, 32));
  const Tensor dy = to_bf16(random_tensor({2, 6, 5, 3}, 33));
  Tensor y = Tensor::empty({2, 6, 5, 3}, DType::BF16), dx = Tensor::empty(x.shape(), DType::BF16);
  Tensor dw = Tensor::empty(w.shape(), DType::F32);  // fp32 gradient for the fp32 master weight
  ops::conv2d_forward(*s, x, w, Tensor(), y, 1, 1);
  ops::conv2d_backward_data(*s, dy, w, dx, 1, 1);
  ops::conv2d_backward_weight(*s, x, dy, dw, Tensor(), 1, 1);
  s->synchronize();
  const std::vector<float> xf = widened(x), wf = widened(w), dyf = widened(dy);
  std::vector<float> ry(size_t(y.numel())), rdx(size_t(x.numel())), rdw(size_t(w.numel()));
  kc::conv2d_forward<float>(sh, xf.data(), wf.data(), nullptr, ry.data());
  kc::conv2d_backward_data<float>(sh, dyf.data(), wf.data(), rdx.data());
  kc::conv2d_backward_weight<float>(sh, xf.data(), dyf.data(), rdw.data(), nullptr);
  EXPECT_EQ(widened(y), rounded(ry));
  EXPECT_EQ(widened(dx), rounded(rdx));
  EXPECT_EQ(values(dw), rdw);
  EXPECT_NE(widened(y), ry) << "the output must really be rounded to bf16";

  // Fused BN+add+ReLU with bf16 activations and fp32 parameters and statistics; its backward
  // writes dresidual over dy in place (one temporary shared by input and output).
  const int64_t m = 2 * 6 * 5, c = 3;
  const Tensor res = to_bf16(random_tensor(y.shape(), 34));
  Tensor g = random_tensor({c}, 35, 0.5f, 1.5f), be = random_tensor({c}, 36);
  Tensor rm = random_tensor({c}, 37), rv = random_tensor({c}, 38, 0.5f, 2.f);
  const std::vector<float> rm0 = values(rm), rv0 = values(rv);
  Tensor out = Tensor::empty(y.shape(), DType::BF16), sm = Tensor::empty({c}, DType::F32),
         si = Tensor::empty({c}, DType::F32);
  ops::batchnorm_add_relu_forward_training(*s, y, res, g, be, rm, rv, out, sm, si, 1e-5f, 0.1f);
  Tensor gy = to_bf16(random_tensor(y.shape(), 39)), gx = Tensor::empty(y.shape(), DType::BF16);
  const std::vector<float> gyf = widened(gy);
  Tensor dg = Tensor::empty({c}, DType::F32), db = Tensor::empty({c}, DType::F32);
  ops::batchnorm_add_relu_backward(*s, y, out, gy, g, sm, si, gx, gy, dg, db);
  s->synchronize();
  const std::vector<float> yf = widened(y), resf = widened(res);
  std::vector<float> rrm = rm0, rrv = rv0, rout(size_t(m * c)), rsm(c), rsi(c);
  kc::batchnorm_add_relu_forward_training<float>(m, c, yf.data(), resf.data(), g.data<float>(), be.data<float>(),
                                                 1e-5f, 0.1f, rrm.data(), rrv.data(), rout.data(), rsm.data(),
                                                 rsi.data());
  EXPECT_EQ(widened(out), rounded(rout));
  EXPECT_EQ(values(rm), rrm);
  EXPECT_EQ(values(sm), rsm);
  const std::vector<float> outf = widened(out);
  std::vector<float> rgx(size_t(m * c)), rgres(size_t(m * c)), rdg(c), rdb(c);
  kc::batchnorm_add_relu_backward<float>(m, c, yf.data(), outf.data(), gyf.data(), g.data<float>(), rsm.data(),
                                         rsi.data(), rgx.data(), rgres.data(), rdg.data(), rdb.data());
  EXPECT_EQ(widened(gx), rounded(rgx));
  EXPECT_EQ(widened(gy), rounded(rgres)) << "dresidual in place over dy";
  EXPECT_EQ(values(dg), rdg);

  // In-place elementwise op on bf16, and the loss on bf16 logits (fp32 loss, bf16 dlogits).
  Tensor a = to_bf16(random_tensor({7, 10}, 40, -3.f, 3.f));
  const std::vector<float> af = widened(a);
  ops::relu_forward(*s, a, a);
  Tensor labels = Tensor::empty({7}, DType::I32);
  for (int i = 0; i < 7; ++i) labels.at<int32_t>(i) = (3 * i) % 10;
  Tensor loss = Tensor::empty({1}, DType::F32), dlogits = Tensor::empty({7, 10}, DType::BF16),
         hits = Tensor::empty({1}, DType::I32);
  ops::softmax_cross_entropy(*s, a, labels, 0.1f, loss, dlogits, hits);
  s->synchronize();
  std::vector<float> ra(af.size());
  kc::relu_forward<float>(int64_t(af.size()), af.data(), ra.data());
  EXPECT_EQ(widened(a), ra);  // relu of bf16 values is exact
  float rloss = 0;
  std::vector<float> rdl(ra.size());
  int64_t rhits = 0;
  kc::softmax_cross_entropy<float>(7, 10, ra.data(), labels.data<int32_t>(), 0.1f, &rloss, rdl.data(), &rhits);
  EXPECT_EQ(loss.at<float>(0), rloss);
  EXPECT_EQ(widened(dlogits), rounded(rdl));
  EXPECT_EQ(hits.at<int32_t>(0), rhits);
}

TEST_F(OpsDispatch, BatchNormTrainingInferenceBackward) {
  const int64_t m = 2 * 3 * 4, c = 5;
  Tensor x = random_tensor({2, 3, 4, 5}, 5), g = random_tensor({5}, 6, 0.5f, 1.5f), be = random_tensor({5}, 7);
  Tensor rm = random_tensor({5}, 8), rv = random_tensor({5}, 9, 0.5f, 2.f);
  std::vector<float> rm0 = values(rm), rv0 = values(rv);
  Tensor y = Tensor::empty(x.shape(), DType::F32), sm = Tensor::empty({5}, DType::F32);
  Tensor si = Tensor::empty({5}, DType::F32), yi = Tensor::empty(x.shape(), DType::F32);
  Tensor dy = random_tensor(x.shape(), 10), dx = Tensor::empty(x.shape(), DType::F32);
  Tensor dg = Tensor::empty({5}, DType::F32), dbe = Tensor::empty({5}, DType::F32);
  ops::batchnorm_forward_training(*s, x, g, be, rm, rv, y, sm, si, 1e-5f, 0.1f);
  ops::batchnorm_forward_inference(*s, x, g, be, rm, rv, yi, 1e-5f);
  ops::batchnorm_backward(*s, x, dy, g, sm, si, dx, dg, dbe);
  s->synchronize();
  std::vector<float> ry(size_t(m * c)), rsm(5), rsi(5), ryi(size_t(m * c)), rdx(size_t(m * c)), rdg(5), rdbe(5);
  kc::batchnorm_forward_training<float>(m, c, x.data<float>(), g.data<float>(), be.data<float>(), 1e-5f, 0.1f,
                                        rm0.data(), rv0.data(), ry.data(), rsm.data(), rsi.data());
  kc::batchnorm_forward_inference<float>(m, c, x.data<float>(), g.data<float>(), be.data<float>(), rm0.data(),
                                         rv0.data(), 1e-5f, ryi.data());
  kc::batchnorm_backward<float>(m, c, x.data<float>(), dy.data<float>(), g.data<float>(), rsm.data(), rsi.data(),
                                rdx.data(), rdg.data(), rdbe.data());
  EXPECT_EQ(values(y), ry);
  EXPECT_EQ(values(rm), rm0);
  EXPECT_EQ(values(rv), rv0);
  EXPECT_EQ(values(yi), ryi);
  EXPECT_EQ(values(dx), rdx);
  EXPECT_EQ(values(dg), rdg);
  EXPECT_EQ(values(dbe), rdbe);
}

TEST_F(OpsDispatch, ElementwiseShortcutPoolingLinearLossSgd) {
  Tensor a = random_tensor({2, 4, 4, 3}, 11), b = random_tensor({2, 4, 4, 3}, 12);
  Tensor sum = Tensor::empty(a.shape(), DType::F32), relu = Tensor::empty(a.shape(), DType::F32);
  Tensor drelu = Tensor::empty(a.shape(), DType::F32), scaled = Tensor::empty(a.shape(), DType::F32);
  ops::add(*s, a, b, sum);
  ops::relu_forward(*s, sum, relu);
  ops::relu_backward(*s, relu, b, drelu);
  ops::scale(*s, 0.25f, a, scaled);
  Tensor sc = Tensor::empty({2, 2, 2, 8}, DType::F32), dsc = Tensor::empty(a.shape(), DType::F32);
  ops::shortcut_a_forward(*s, a, sc, 2);
  ops::shortcut_a_backward(*s, sc, dsc, 2);
  Tensor mp = Tensor::empty({2, 2, 2, 3}, DType::F32), dmp = Tensor::empty(a.shape(), DType::F32);
  ops::maxpool2d_forward(*s, a, mp, 2, 2, 0);
  ops::maxpool2d_backward(*s, a, mp, dmp, 2, 2, 0);
  Tensor gap = Tensor::empty({2, 3}, DType::F32), dgap = Tensor::empty(a.shape(), DType::F32);
  ops::global_avgpool_forward(*s, a, gap);
  ops::global_avgpool_backward(*s, gap, dgap);
  Tensor w = random_tensor({4, 3}, 13), lb = random_tensor({4}, 14), ly = Tensor::empty({2, 4}, DType::F32);
  Tensor ldx = Tensor::empty({2, 3}, DType::F32), ldw = Tensor::empty({4, 3}, DType::F32);
  Tensor ldb = Tensor::empty({4}, DType::F32);
  ops::linear_forward(*s, gap, w, lb, ly);
  ops::linear_backward(*s, gap, w, ly, ldx, ldw, ldb);
  Tensor labels = Tensor::empty({2}, DType::I32), loss = Tensor::empty({1}, DType::F32);
  Tensor dlogits = Tensor::empty({2, 4}, DType::F32), correct = Tensor::empty({1}, DType::I32);
  labels.at<int32_t>(0) = 3;
  labels.at<int32_t>(1) = 0;
  ops::softmax_cross_entropy(*s, ly, labels, 0.1f, loss, dlogits, correct);
  s->synchronize();

  const int64_t n = a.numel();
  std::vector<float> r(static_cast<size_t>(n)), r2(static_cast<size_t>(n));
  kc::add<float>(n, a.data<float>(), b.data<float>(), r.data());
  EXPECT_EQ(values(sum), r);
  kc::relu_forward<float>(n, r.data(), r.data());
  EXPECT_EQ(values(relu), r);
  kc::relu_backward<float>(n, r.data(), b.data<float>(), r2.data());
  EXPECT_EQ(values(drelu), r2);
  kc::scale<float>(n, 0.25f, a.data<float>(), r.data());
  EXPECT_EQ(values(scaled), r);
  kernels::ShortcutAShape ssh{2, 4, 4, 3, 8, 2};
  std::vector<float> rsc(size_t(sc.numel()));
  kc::shortcut_a_forward<float>(ssh, a.data<float>(), rsc.data());
  EXPECT_EQ(values(sc), rsc);
  kc::shortcut_a_backward<float>(ssh, rsc.data(), r.data());
  EXPECT_EQ(values(dsc), r);
  kernels::Pool2dShape psh{2, 4, 4, 3, 2, 2, 0};
  std::vector<float> rmp(size_t(mp.numel()));
  kc::maxpool2d_forward<float>(psh, a.data<float>(), rmp.data());
  EXPECT_EQ(values(mp), rmp);
  kc::maxpool2d_backward<float>(psh, a.data<float>(), rmp.data(), r.data());
  EXPECT_EQ(values(dmp), r);
  std::vector<float> rgap(6);
  kc::global_avgpool_forward<float>(2, 16, 3, a.data<float>(), rgap.data());
  EXPECT_EQ(values(gap), rgap);
  kc::global_avgpool_backward<float>(2, 16, 3, rgap.data(), r.data());
  EXPECT_EQ(values(dgap), r);
  std::vector<float> rly(8), rldx(6), rldw(12), rldb(4);
  kc::linear_forward<float>(2, 3, 4, rgap.data(), w.data<float>(), lb.data<float>(), rly.data());
  EXPECT_EQ(values(ly), rly);
  kc::linear_backward<float>(2, 3, 4, rgap.data(), w.data<float>(), rly.data(), rldx.data(), rldw.data(), rldb.data());
  EXPECT_EQ(values(ldx), rldx);
  EXPECT_EQ(values(ldw), rldw);
  EXPECT_EQ(values(ldb), rldb);
  float rloss = 0;
  int64_t rcorrect = 0;
  std::vector<float> rdl(8);
  kc::softmax_cross_entropy<float>(2, 4, rly.data(), labels.data<int32_t>(), 0.1f, &rloss, rdl.data(), &rcorrect);
  EXPECT_EQ(loss.at<float>(0), rloss);
  EXPECT_EQ(values(dlogits), rdl);
  EXPECT_EQ(correct.at<int32_t>(0), rcorrect);
}

TEST_F(OpsDispatch, SgdStepUpdatesEveryTensorInOneCall) {
  kernels::SgdParams p;
  p.lr = 0.1f, p.momentum = 0.9f, p.weight_decay = 1e-3f, p.nesterov = true, p.grad_scale = 0.5f;
  std::vector<Tensor> params = {random_tensor({3, 4}, 20), random_tensor({7}, 21)};
  std::vector<Tensor> grads = {random_tensor({3, 4}, 22), random_tensor({7}, 23)};
  std::vector<Tensor> moms = {random_tensor({3, 4}, 24), random_tensor({7}, 25)};
  std::vector<std::vector<float>> rp, rm;
  for (int i = 0; i < 2; ++i) rp.push_back(values(params[size_t(i)])), rm.push_back(values(moms[size_t(i)]));
  ops::sgd_step(*s, params, grads, moms, p);
  s->synchronize();
  std::vector<kc::SgdTensor<float>> list;
  for (int i = 0; i < 2; ++i)
    list.push_back({rp[size_t(i)].data(), grads[size_t(i)].data<float>(), rm[size_t(i)].data(),
                    int64_t(rp[size_t(i)].size())});
  kc::sgd_step<float>(list, p);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(values(params[size_t(i)]), rp[size_t(i)]);
    EXPECT_EQ(values(moms[size_t(i)]), rm[size_t(i)]);
  }
}

TEST_F(OpsDispatch, FillCopyCastAndGemm) {
  Tensor a = random_tensor({5, 3}, 30), b = random_tensor({5, 4}, 31), c = Tensor::empty({3, 4}, DType::F32);
  ops::gemm(*s, true, false, 2.f, a, b, 0.f, c);
  Tensor f = Tensor::empty({9}, DType::F32), g = Tensor::empty({9}, DType::F32);
  ops::fill(*s, f, 2.5f);
  ops::copy(*s, f, g);
  Tensor h = Tensor::empty({9}, DType::BF16), back = Tensor::empty({9}, DType::F32);
  ops::cast(*s, g, h);
  ops::cast(*s, h, back);
  s->synchronize();
  std::vector<float> rc(12);
  kc::gemm<float>(true, false, 3, 4, 5, 2.f, a.data<float>(), 3, b.data<float>(), 4, 0.f, rc.data(), 4);
  EXPECT_EQ(values(c), rc);
  for (int i = 0; i < 9; ++i) {
    EXPECT_EQ(g.at<float>(i), 2.5f);
    EXPECT_EQ(h.at<uint16_t>(i), 0x4020);  // 2.5 in bf16
    EXPECT_EQ(back.at<float>(i), 2.5f);
  }
}

TEST_F(OpsDispatch, QueuedWorkKeepsItsTensorsAlive) {
  auto& alloc = device_allocator(Device::cpu());
  const size_t before = alloc.stats().allocated_bytes;
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  s->enqueue_host([opened] { opened.wait(); });
  Tensor out;
  {
    Tensor x = random_tensor({1000}, 40), y = Tensor::empty({1000}, DType::F32);
    ops::scale(*s, 3.f, x, y);
    out = y;
  }  // x is gone on the host, but the queued scale still holds it
  // Both blocks are still allocated (y alone would be one), ...
  EXPECT_GE(alloc.stats().allocated_bytes, before + 2 * CachingAllocator::round_size(4000));
  // ... and a tensor of x's size made now cannot take x's block and overwrite what scale reads.
  Tensor junk = Tensor::empty({1000}, DType::F32);
  for (int i = 0; i < 1000; ++i) junk.at<float>(i) = std::nanf("");
  gate.set_value();
  s->synchronize();
  Tensor x = random_tensor({1000}, 40);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(out.at<float>(i), 3.f * x.at<float>(i));
}

}  // namespace

// The tensor-core main loop switch (engine/ops.h): names round-trip, a wrong name is refused
// with the accepted ones, and a build without CUDA says it has none.
TEST(TensorCoreMainloop, SelectionRoundTripsAndRefusesBadNames) {
  const std::string before = ops::tensor_core_mainloop();
  if (!STALEPROP_WITH_CUDA) {
    EXPECT_EQ(before, "none");
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), "none");
    EXPECT_FALSE(ops::wgmma_available());
    try {
      ops::set_tensor_core_mainloop("wgmma");
      ADD_FAILURE() << "selecting a main loop without CUDA must throw";
    } catch (const sp::Error& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA backend"), std::string::npos) << e.what();
    }
    return;
  }
  EXPECT_TRUE(before == "auto" || before == "mma_sync" || before == "wgmma" || before == "wgmma_tma") << before;
  for (const char* name : {"wgmma", "wgmma_tma", "auto", "mma_sync"}) {  // selecting is allowed anywhere; running needs sm_90a
    ops::set_tensor_core_mainloop(name);
    EXPECT_EQ(ops::tensor_core_mainloop(), name);
  }
  // An explicit choice is what runs; auto resolves per device, and without a GPU nothing runs.
  if (cuda_device_count() == 0) {
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), "none");
  } else {
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), "mma_sync");
    ops::set_tensor_core_mainloop("auto");
    EXPECT_EQ(ops::tensor_core_mainloop_in_use(), ops::wgmma_available() ? "wgmma" : "mma_sync");
    ops::set_tensor_core_mainloop("mma_sync");
  }
  try {
    ops::set_tensor_core_mainloop("hgmma");
    ADD_FAILURE() << "an unknown main loop must throw";
  } catch (const sp::Error& e) {
    EXPECT_NE(std::string(e.what()).find("use auto, mma_sync, wgmma or wgmma_tma"), std::string::npos) << e.what();
  }
  EXPECT_EQ(ops::tensor_core_mainloop(), "mma_sync") << "a refused name leaves the selection as it was";
  ops::set_tensor_core_mainloop(before);
}
