// The training-mode BatchNorm of bn_core/batchnorm.py, the same formulas in C++.
//
// bn_core/batchnorm.py holds the readable version: forward and hand-derived backward in
// a Python torch.autograd.Function. At this lab's layer sizes (60 x 100) each tensor op
// takes a few microseconds and the interpreter between them as much again, so this file
// computes the same thing in a C++ torch::autograd::Function. On the CPU, for float and
// double, forward and backward are plain loops: three passes over the data forward (mean,
// centered variance, output), two backward, with the running statistics updated in the
// first. Elsewhere (CUDA, MPS, strided inputs) it runs the Python version's tensor ops.
// Either way it saves only x_hat and inv_std for backward. The tests hold both kernels
// to torch.nn.BatchNorm1d/2d and to gradcheck.
//
// It also holds the lockstep MLP's output layer (at the end), which is slow as a plain
// batched product for 10 classes.

#include <cstring>
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Every dimension but the channel dimension 1: what the statistics average over.
std::vector<int64_t> reduce_dims(int64_t ndim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < ndim; ++d) dims.push_back(d);
  return dims;
}

// (C,) viewed so that it broadcasts against an (N, C, *) input.
at::Tensor per_channel(const at::Tensor& v, int64_t ndim) {
  if (ndim == 2) return v;
  std::vector<int64_t> shape(ndim, 1);
  shape[1] = -1;
  return v.view(shape);
}


// --- CPU loops -------------------------------------------------------------------------
// A contiguous (N, C, S) input (S = 1 for (N, C), L or H*W otherwise): channel c's m = N*S
// values are x[(n*C + c)*S + s]. One channel is one independent job, so threads split
// channels and the result does not depend on the thread count. Sums accumulate in double
// for float inputs (at::acc_type): a float32 sum of values near 1e4 would lose the
// digits that a small variance lives in.

// Channels per thread job: small layers (60 x 100) stay on one thread, where waking a
// pool would cost more than the arithmetic.
int64_t channel_grain(int64_t m) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(m, 1)); }

struct Layout {
  int64_t N, C, S, m;
  explicit Layout(const at::Tensor& x)
      : N(x.size(0)), C(x.size(1)), S(x.numel() / (x.size(0) * x.size(1))), m(x.numel() / x.size(1)) {}
  Layout(int64_t n, int64_t c, int64_t s) : N(n), C(c), S(s), m(n * s) {}
};

// Fills x_hat, y, inv_std, mean and sum_sq (sum of squared deviations) for channels
// [c0, c1). Each pass runs row by row, n outermost; within a row, channel by channel, with
// channel c's S contiguous values innermost. kFlat (S = 1, an (N, C) input) makes S a
// compile-time 1, so the innermost loop vanishes and the compiler vectorizes across the
// contiguous channels of a row.
template <typename scalar_t, bool kFlat>
void forward_block(const Layout& L, int64_t c0, int64_t c1, const scalar_t* x,
                   const scalar_t* gamma, const scalar_t* beta, double eps, scalar_t* x_hat,
                   scalar_t* y, scalar_t* inv_std, scalar_t* mean_out, scalar_t* sum_sq_out,
                   scalar_t* running_mean, scalar_t* running_var, double factor) {
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t S = kFlat ? 1 : L.S;
  const int64_t width = c1 - c0;
  std::vector<acc_t> mu(width, 0), sq(width, 0), scale(width), shift(width), g(width),
      b(width);
  // Pass 1: the means.
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t k = 0; k < width; ++k) {
      const scalar_t* row = x + (n * L.C + c0 + k) * S;
      acc_t sum = 0;
      for (int64_t s = 0; s < S; ++s) sum += row[s];
      mu[k] += sum;
    }
  }
  for (int64_t k = 0; k < width; ++k) mu[k] /= L.m;
  // Pass 2: squared deviations from the mean. E[x^2] - E[x]^2 would cancel
  // catastrophically when |mean| >> std.
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t k = 0; k < width; ++k) {
      const scalar_t* row = x + (n * L.C + c0 + k) * S;
      const acc_t m_k = mu[k];
      acc_t sum = 0;
      for (int64_t s = 0; s < S; ++s) {
        const acc_t d = acc_t(row[s]) - m_k;
        sum += d * d;
      }
      sq[k] += sum;
    }
  }
  for (int64_t k = 0; k < width; ++k) {
    const int64_t c = c0 + k;
    const acc_t istd = acc_t(1) / std::sqrt(sq[k] / L.m + acc_t(eps));
    inv_std[c] = scalar_t(istd);
    mean_out[c] = scalar_t(mu[k]);
    sum_sq_out[c] = scalar_t(sq[k]);
    scale[k] = istd;
    shift[k] = -mu[k] * istd;  // x_hat = x * inv_std - mu * inv_std
    g[k] = gamma ? acc_t(gamma[c]) : acc_t(1);
    b[k] = beta ? acc_t(beta[c]) : acc_t(0);
    if (running_mean != nullptr) {
      // running = (1 - f) * running + f * batch; running_var takes the unbiased variance.
      const acc_t f = acc_t(factor);
      running_mean[c] = scalar_t((1 - f) * acc_t(running_mean[c]) + f * mu[k]);
      running_var[c] = scalar_t((1 - f) * acc_t(running_var[c]) + f * sq[k] / (L.m - 1));
    }
  }
  // Pass 3: x_hat and y = gamma * x_hat + beta.
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t k = 0; k < width; ++k) {
      const int64_t base = (n * L.C + c0 + k) * S;
      for (int64_t s = 0; s < S; ++s) {
        const acc_t h = acc_t(x[base + s]) * scale[k] + shift[k];
        x_hat[base + s] = scalar_t(h);
        y[base + s] = scalar_t(h * g[k] + b[k]);
      }
    }
  }
}

// The per-channel sums that are dbeta and dgamma, then dx (when wanted), for [c0, c1);
// loops as in forward_block.
template <typename scalar_t, bool kFlat>
void backward_block(const Layout& L, int64_t c0, int64_t c1, const scalar_t* dy,
                    const scalar_t* x_hat, const scalar_t* inv_std, const scalar_t* gamma,
                    bool through_stats, scalar_t* dx, scalar_t* sum_dy_out,
                    scalar_t* sum_dy_xhat_out) {
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t S = kFlat ? 1 : L.S;
  const int64_t width = c1 - c0;
  std::vector<acc_t> sum_dy(width, 0), sum_dy_xhat(width, 0), scale(width), a(width),
      b(width);
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t k = 0; k < width; ++k) {
      const int64_t base = (n * L.C + c0 + k) * S;
      acc_t s1 = 0, s2 = 0;
      for (int64_t s = 0; s < S; ++s) {
        s1 += dy[base + s];
        s2 += acc_t(dy[base + s]) * acc_t(x_hat[base + s]);
      }
      sum_dy[k] += s1;
      sum_dy_xhat[k] += s2;
    }
  }
  for (int64_t k = 0; k < width; ++k) {
    sum_dy_out[c0 + k] = scalar_t(sum_dy[k]);
    sum_dy_xhat_out[c0 + k] = scalar_t(sum_dy_xhat[k]);
  }
  if (dx == nullptr) return;
  for (int64_t k = 0; k < width; ++k) {
    const int64_t c = c0 + k;
    scale[k] = acc_t(inv_std[c]) * (gamma ? acc_t(gamma[c]) : acc_t(1));
    // Through the statistics:
    //   dL/dx_i = gamma * inv_std * (dy_i - mean(dy) - x_hat_i * mean(dy * x_hat))
    // Statistics held constant (the naive gradient): dL/dx_i = gamma * inv_std * dy_i
    a[k] = through_stats ? sum_dy[k] / L.m : acc_t(0);
    b[k] = through_stats ? sum_dy_xhat[k] / L.m : acc_t(0);
  }
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t k = 0; k < width; ++k) {
      const int64_t base = (n * L.C + c0 + k) * S;
      for (int64_t s = 0; s < S; ++s) {
        dx[base + s] = scalar_t(
            scale[k] * (acc_t(dy[base + s]) - a[k] - acc_t(x_hat[base + s]) * b[k]));
      }
    }
  }
}

template <typename scalar_t>
void forward_loops(const Layout& L, const scalar_t* x, const scalar_t* gamma,
                   const scalar_t* beta, double eps, scalar_t* x_hat, scalar_t* y,
                   scalar_t* inv_std, scalar_t* mean_out, scalar_t* sum_sq_out,
                   scalar_t* running_mean, scalar_t* running_var, double factor) {
  at::parallel_for(0, L.C, channel_grain(L.m), [&](int64_t c0, int64_t c1) {
    auto block = L.S == 1 ? forward_block<scalar_t, true> : forward_block<scalar_t, false>;
    block(L, c0, c1, x, gamma, beta, eps, x_hat, y, inv_std, mean_out, sum_sq_out,
          running_mean, running_var, factor);
  });
}

template <typename scalar_t>
void backward_loops(const Layout& L, const scalar_t* dy, const scalar_t* x_hat,
                    const scalar_t* inv_std, const scalar_t* gamma, bool through_stats,
                    scalar_t* dx, scalar_t* sum_dy_out, scalar_t* sum_dy_xhat_out) {
  at::parallel_for(0, L.C, channel_grain(L.m), [&](int64_t c0, int64_t c1) {
    auto block = L.S == 1 ? backward_block<scalar_t, true> : backward_block<scalar_t, false>;
    block(L, c0, c1, dy, x_hat, inv_std, gamma, through_stats, dx, sum_dy_out,
          sum_dy_xhat_out);
  });
}

// What both autograd Functions keep for backward: x_hat, inv_std and gamma (the only
// tensors), and which gradients were asked for.
void save_for_backward(AutogradContext* ctx, const at::Tensor& x_hat, const at::Tensor& inv_std,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, bool need_x,
                       bool grad_through_stats) {
  const bool affine = weight.has_value() && weight->defined();
  ctx->save_for_backward({x_hat, inv_std, affine ? *weight : at::Tensor()});
  ctx->saved_data["through_stats"] = grad_through_stats;
  ctx->saved_data["need_x"] = need_x;
  ctx->saved_data["need_gamma"] = affine && weight->requires_grad();
  ctx->saved_data["need_beta"] = affine && bias->requires_grad();
}

// dst = src for the variants outside [start, stop) of a (V, ...) tensor: the ones a
// lockstep BatchNorm run passes through, forward and backward. Only the stacked loops call
// it, on contiguous CPU tensors of one dtype (their raw data, like the loops' own), so it
// copies plain blocks: through narrow + copy_, each copy took about as long as normalizing
// a 60 x 100 slab, and a plain + BN pair with 3 BN layers makes 6 such copies per step.
void copy_outside(at::Tensor& dst, const at::Tensor& src, int64_t start, int64_t stop) {
  TORCH_INTERNAL_ASSERT(dst.sizes() == src.sizes() && dst.is_contiguous() &&
                        src.is_contiguous() && dst.device().is_cpu() && src.device().is_cpu() &&
                        dst.scalar_type() == src.scalar_type());
  const int64_t V = src.size(0);
  const int64_t slab_bytes = src.numel() / V * src.element_size();
  if (slab_bytes == 0) return;
  const char* from = static_cast<const char*>(src.const_data_ptr());
  char* to = static_cast<char*>(dst.mutable_data_ptr());
  if (start > 0) std::memcpy(to, from, start * slab_bytes);
  if (stop < V) {
    std::memcpy(to + stop * slab_bytes, from + stop * slab_bytes, (V - stop) * slab_bytes);
  }
}

bool use_loops(const at::Tensor& x) {
  return x.device().is_cpu() && x.is_contiguous() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, double eps,
                            double factor, bool grad_through_stats) {
    const int64_t ndim = x.dim();
    const int64_t m = x.numel() / x.size(1);
    const bool affine = weight.has_value() && weight->defined();
    TORCH_CHECK(affine == (bias.has_value() && bias->defined()),
                "batch_norm_train: weight (gamma) and bias (beta) must be given together");
    const bool loops = use_loops(x) &&
                       (!affine || (weight->is_contiguous() && bias->is_contiguous() &&
                                    weight->scalar_type() == x.scalar_type() &&
                                    bias->scalar_type() == x.scalar_type()));
    const bool track = running_mean.has_value() && running_mean->defined();
    // Running statistics of the input's dtype are updated inside the loops.
    const bool track_in_loops = loops && track && running_mean->is_contiguous() &&
                                running_var->is_contiguous() &&
                                running_mean->scalar_type() == x.scalar_type() &&
                                running_var->scalar_type() == x.scalar_type();
    at::Tensor mu, x_hat, sum_sq, inv_std, y;
    if (loops) {
      const Layout L(x);
      x_hat = at::empty_like(x);
      y = at::empty_like(x);
      inv_std = at::empty({L.C}, x.options());
      mu = at::empty({L.C}, x.options());
      sum_sq = at::empty({L.C}, x.options());
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_core_batch_norm_forward", [&] {
        forward_loops<scalar_t>(L, x.const_data_ptr<scalar_t>(),
                                affine ? weight->const_data_ptr<scalar_t>() : nullptr,
                                affine ? bias->const_data_ptr<scalar_t>() : nullptr, eps,
                                x_hat.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                inv_std.mutable_data_ptr<scalar_t>(), mu.mutable_data_ptr<scalar_t>(),
                                sum_sq.mutable_data_ptr<scalar_t>(),
                                track_in_loops ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
                                track_in_loops ? running_var->mutable_data_ptr<scalar_t>() : nullptr,
                                factor);
      });
    } else {
      // Other devices and layouts: the same steps as tensor ops.
      const bool flat = ndim == 2;
      if (flat) {
        mu = x.mean(0);
        x_hat = x - mu;
        // Centered two-pass variance, as in the Python version (never E[x^2] - E[x]^2).
        sum_sq = at::linalg_vecdot(x_hat, x_hat, 0);
      } else {
        const auto dims = reduce_dims(ndim);
        mu = x.mean(dims, /*keepdim=*/true);
        x_hat = x - mu;
        sum_sq = x_hat.square().sum(dims, /*keepdim=*/true);
      }
      // inv_std = 1 / sqrt(sum_sq / m + eps)
      inv_std = at::add(sum_sq, eps * m).mul_(1.0 / m).rsqrt_();
      x_hat.mul_(inv_std);
      inv_std = inv_std.reshape(-1);
      y = affine ? at::addcmul(per_channel(*bias, ndim), x_hat, per_channel(*weight, ndim))
                 : x_hat.clone();  // never hand out the saved x_hat itself
    }
    if (track && !track_in_loops) {
      // running = (1 - f) * running + f * batch; running_var takes the unbiased variance.
      at::Tensor var = sum_sq.reshape(-1) * (1.0 / static_cast<double>(m - 1));
      running_mean->lerp_(mu.reshape(-1).to(running_mean->scalar_type()), factor);
      running_var->lerp_(var.to(running_var->scalar_type()), factor);
    }
    save_for_backward(ctx, x_hat, inv_std, weight, bias, x.requires_grad(), grad_through_stats);
    ctx->saved_data["m"] = m;
    ctx->saved_data["loops"] = loops;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x_hat = saved[0];
    const at::Tensor& inv_std = saved[1];
    const at::Tensor& gamma = saved[2];
    at::Tensor dy = grad_outputs[0];
    const int64_t m = ctx->saved_data["m"].toInt();
    const bool need_x = ctx->saved_data["need_x"].toBool();
    const bool need_gamma = ctx->saved_data["need_gamma"].toBool();
    const bool need_beta = ctx->saved_data["need_beta"].toBool();
    const bool through_stats = need_x && ctx->saved_data["through_stats"].toBool();
    const int64_t ndim = dy.dim();
    at::Tensor sum_dy, sum_dy_xhat, dx;
    if (ctx->saved_data["loops"].toBool()) {
      dy = dy.contiguous();  // x_hat is contiguous; a gradient may arrive strided
      const Layout L(x_hat);
      sum_dy = at::empty({L.C}, x_hat.options());
      sum_dy_xhat = at::empty({L.C}, x_hat.options());
      if (need_x) dx = at::empty_like(x_hat);
      AT_DISPATCH_FLOATING_TYPES(x_hat.scalar_type(), "bn_core_batch_norm_backward", [&] {
        backward_loops<scalar_t>(L, dy.const_data_ptr<scalar_t>(), x_hat.const_data_ptr<scalar_t>(),
                                 inv_std.const_data_ptr<scalar_t>(),
                                 gamma.defined() ? gamma.const_data_ptr<scalar_t>() : nullptr,
                                 through_stats, need_x ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                 sum_dy.mutable_data_ptr<scalar_t>(),
                                 sum_dy_xhat.mutable_data_ptr<scalar_t>());
      });
    } else {
      const bool flat = ndim == 2;
      // dL/dbeta = sum_i dy_i ; dL/dgamma = sum_i dy_i * x_hat_i (per channel)
      if (flat) {
        if (need_beta || through_stats) sum_dy = dy.sum(0);
        if (need_gamma || through_stats) sum_dy_xhat = at::linalg_vecdot(dy, x_hat, 0);
      } else {
        const auto dims = reduce_dims(ndim);
        if (need_beta || through_stats) sum_dy = dy.sum(dims, /*keepdim=*/true);
        if (need_gamma || through_stats) sum_dy_xhat = (dy * x_hat).sum(dims, /*keepdim=*/true);
      }
      if (need_x) {
        at::Tensor scale = per_channel(inv_std, ndim);
        if (gamma.defined()) scale = per_channel(gamma, ndim) * scale;
        if (!through_stats) {
          // Naive gradient (statistics held constant): dL/dx_i = gamma * inv_std * dy_i
          dx = dy * scale;
        } else {
          // dL/dx_i = gamma * inv_std * (dy_i - mean(dy) - x_hat_i * mean(dy * x_hat))
          dx = at::addcmul(dy, x_hat, sum_dy_xhat, -1.0 / m);
          dx.sub_(sum_dy, 1.0 / m);
          dx.mul_(scale);
        }
      }
    }
    at::Tensor dgamma, dbeta;
    if (need_gamma) dgamma = sum_dy_xhat.reshape(-1);
    if (need_beta) dbeta = sum_dy.reshape(-1);
    return {dx, dgamma, dbeta, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor batch_norm_train(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, double eps,
                            double factor, bool grad_through_stats) {
  return BatchNormTrain::apply(x, weight, bias, running_mean, running_var, eps, factor,
                               grad_through_stats);
}

// --- lockstep layers -------------------------------------------------------------------
// A lockstep MLP holds every variant's activations in one (V, N, C) tensor, and the
// variants [start, stop) that share one BatchNorm module have (stop - start) * C features:
// variant v's channel c is feature (v - start) * C + c, its statistics over the N rows of
// v's own (N, C) slab. The other variants pass through unchanged. Done as tensor ops this
// is a split, a permute to (N, (stop - start) * C), the BatchNorm and a concatenation,
// and their reverses in backward: at 8 variants of 60 x 100 those copies cost more than
// the normalization. Here each slab goes through the same loops as an (N, C) input, in
// place in the stacked layout.

bool stacked_loops_ok(const at::Tensor& h, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var) {
  auto same = [&](const std::optional<at::Tensor>& t) {
    return !t.has_value() || !t->defined() ||
           (t->is_contiguous() && t->scalar_type() == h.scalar_type() && t->device() == h.device());
  };
  return use_loops(h) && same(weight) && same(bias) && same(running_mean) && same(running_var);
}

struct BatchNormStacked : public torch::autograd::Function<BatchNormStacked> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, int64_t start,
                            int64_t stop, double eps, double factor, bool grad_through_stats) {
    const int64_t N = h.size(1), C = h.size(2), G = stop - start;
    const bool affine = weight.has_value() && weight->defined();
    const bool track = running_mean.has_value() && running_mean->defined();
    at::Tensor y = at::empty_like(h);
    copy_outside(y, h, start, stop);
    at::Tensor x_hat = at::empty({G, N, C}, h.options());
    at::Tensor inv_std = at::empty({G * C}, h.options());
    at::Tensor mu = at::empty({G * C}, h.options());
    at::Tensor sum_sq = at::empty({G * C}, h.options());
    const Layout L(N, C, 1);
    const int64_t slab = N * C;
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bn_core_batch_norm_stacked_forward", [&] {
      const scalar_t* x = h.const_data_ptr<scalar_t>() + start * slab;
      scalar_t* out = y.mutable_data_ptr<scalar_t>() + start * slab;
      const scalar_t* g = affine ? weight->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* b = affine ? bias->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* rm = track ? running_mean->mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* rv = track ? running_var->mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* xh = x_hat.mutable_data_ptr<scalar_t>();
      scalar_t* is = inv_std.mutable_data_ptr<scalar_t>();
      scalar_t* mp = mu.mutable_data_ptr<scalar_t>();
      scalar_t* sq = sum_sq.mutable_data_ptr<scalar_t>();
      // One variant's slab is one job, so the result does not depend on the thread count.
      at::parallel_for(0, G, channel_grain(slab), [&](int64_t g0, int64_t g1) {
        for (int64_t v = g0; v < g1; ++v) {
          const int64_t f = v * C;  // the slab's first feature
          forward_block<scalar_t, true>(L, 0, C, x + v * slab, g ? g + f : nullptr,
                                        b ? b + f : nullptr, eps, xh + v * slab,
                                        out + v * slab, is + f, mp + f, sq + f,
                                        rm ? rm + f : nullptr, rv ? rv + f : nullptr, factor);
        }
      });
    });
    save_for_backward(ctx, x_hat, inv_std, weight, bias, h.requires_grad(), grad_through_stats);
    ctx->saved_data["start"] = start;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x_hat = saved[0];
    const at::Tensor& inv_std = saved[1];
    const at::Tensor& gamma = saved[2];
    const at::Tensor dy = grad_outputs[0].contiguous();
    const int64_t start = ctx->saved_data["start"].toInt();
    const int64_t G = x_hat.size(0), N = x_hat.size(1), C = x_hat.size(2), stop = start + G;
    const bool need_x = ctx->saved_data["need_x"].toBool();
    const bool through_stats = need_x && ctx->saved_data["through_stats"].toBool();
    at::Tensor dx;
    if (need_x) {
      // The variants that passed through get their gradient unchanged.
      dx = at::empty_like(dy);
      copy_outside(dx, dy, start, stop);
    }
    at::Tensor sum_dy = at::empty({G * C}, x_hat.options());
    at::Tensor sum_dy_xhat = at::empty({G * C}, x_hat.options());
    const Layout L(N, C, 1);
    const int64_t slab = N * C;
    AT_DISPATCH_FLOATING_TYPES(x_hat.scalar_type(), "bn_core_batch_norm_stacked_backward", [&] {
      const scalar_t* d = dy.const_data_ptr<scalar_t>() + start * slab;
      scalar_t* out = need_x ? dx.mutable_data_ptr<scalar_t>() + start * slab : nullptr;
      const scalar_t* xh = x_hat.const_data_ptr<scalar_t>();
      const scalar_t* is = inv_std.const_data_ptr<scalar_t>();
      const scalar_t* g = gamma.defined() ? gamma.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* s1 = sum_dy.mutable_data_ptr<scalar_t>();
      scalar_t* s2 = sum_dy_xhat.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, G, channel_grain(slab), [&](int64_t g0, int64_t g1) {
        for (int64_t v = g0; v < g1; ++v) {
          const int64_t f = v * C;
          backward_block<scalar_t, true>(L, 0, C, d + v * slab, xh + v * slab, is + f,
                                         g ? g + f : nullptr, through_stats,
                                         out ? out + v * slab : nullptr, s1 + f, s2 + f);
        }
      });
    });
    at::Tensor dgamma, dbeta;
    if (ctx->saved_data["need_gamma"].toBool()) dgamma = sum_dy_xhat;
    if (ctx->saved_data["need_beta"].toBool()) dbeta = sum_dy;
    return {dx,          dgamma,      dbeta,       at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor batch_norm_train_stacked(const at::Tensor& h, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var,
                                    int64_t start, int64_t stop, double eps, double factor,
                                    bool grad_through_stats) {
  TORCH_CHECK(h.dim() == 3, "batch_norm_train_stacked: expected a (V, N, C) input, got ",
              h.sizes());
  const int64_t V = h.size(0), N = h.size(1), C = h.size(2);
  TORCH_CHECK(0 <= start && start < stop && stop <= V, "batch_norm_train_stacked: variants [",
              start, ", ", stop, ") are not within the ", V, " variants of the input");
  const bool affine = weight.has_value() && weight->defined();
  TORCH_CHECK(affine == (bias.has_value() && bias->defined()),
              "batch_norm_train_stacked: weight (gamma) and bias (beta) must be given together");
  const int64_t features = (stop - start) * C;
  TORCH_CHECK(!affine || (weight->numel() == features && bias->numel() == features),
              "batch_norm_train_stacked: ", stop - start, " variants of ", C,
              " channels need weight and bias of ", features, " values");
  if (stacked_loops_ok(h, weight, bias, running_mean, running_var)) {
    return BatchNormStacked::apply(h, weight, bias, running_mean, running_var, start, stop, eps,
                                   factor, grad_through_stats);
  }
  // Other devices and layouts: the run as one (N, (stop - start) * C) batch.
  const int64_t G = stop - start;
  at::Tensor flat = h.narrow(0, start, G).permute({1, 0, 2}).reshape({N, G * C});
  at::Tensor run = batch_norm_train(flat, weight, bias, running_mean, running_var, eps, factor,
                                    grad_through_stats)
                       .view({N, G, C})
                       .permute({1, 0, 2});
  std::vector<at::Tensor> parts;
  if (start > 0) parts.push_back(h.narrow(0, 0, start));
  parts.push_back(run);
  if (stop < V) parts.push_back(h.narrow(0, stop, V - stop));
  return parts.size() == 1 ? run.contiguous() : at::cat(parts, 0);
}

// --- the lockstep output layer ---------------------------------------------------------
// logits = h @ W + b for every variant of a lockstep MLP at once: h (V, N, C), W (V, C, K),
// b (V, 1, K). With K = 10 classes on the CPU, at::baddbmm(b, h, W) and the weight
// gradient h^T @ dlogits take several times longer than the same sums taken transposed,
// W^T @ h^T and dlogits^T @ h (the two products alone, 8 variants of 60 x 100, one thread:
// 190 us against 60 us; the 190 as long as a 100-wide hidden layer's). As a C++ Function
// it costs one autograd node, like baddbmm. bn_core/models.py says where it is used.

struct LockstepOutput : public torch::autograd::Function<LockstepOutput> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& weight,
                            const at::Tensor& bias) {
    ctx->save_for_backward({h, weight});
    // (V, K, N) = b^T + W^T h^T, handed out as the (V, N, K) logits.
    return at::baddbmm(bias.transpose(1, 2), weight.transpose(1, 2).contiguous(),
                       h.transpose(1, 2))
        .transpose(1, 2)
        .contiguous();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& h = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor grad = grad_outputs[0].contiguous();
    at::Tensor dh, dweight, dbias;
    if (ctx->needs_input_grad(0)) dh = at::bmm(grad, weight.transpose(1, 2));
    if (ctx->needs_input_grad(1)) {
      dweight = at::bmm(grad.transpose(1, 2), h).transpose(1, 2).contiguous();
    }
    if (ctx->needs_input_grad(2)) dbias = grad.sum(1, /*keepdim=*/true);
    return {dh, dweight, dbias};
  }
};

at::Tensor lockstep_output(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(h.dim() == 3 && weight.dim() == 3 && bias.dim() == 3,
              "lockstep_output: expected h (V, N, C), weight (V, C, K) and bias (V, 1, K), got ",
              h.sizes(), ", ", weight.sizes(), " and ", bias.sizes());
  const int64_t V = h.size(0), C = h.size(2), K = weight.size(2);
  TORCH_CHECK(weight.size(0) == V && weight.size(1) == C && bias.size(0) == V &&
                  bias.size(1) == 1 && bias.size(2) == K,
              "lockstep_output: h ", h.sizes(), " needs weight (", V, ", ", C, ", K) and bias (",
              V, ", 1, K), got weight ", weight.sizes(), " and bias ", bias.sizes());
  TORCH_CHECK(weight.scalar_type() == h.scalar_type() && bias.scalar_type() == h.scalar_type() &&
                  weight.device() == h.device() && bias.device() == h.device(),
              "lockstep_output: h, weight and bias must share dtype and device, got ",
              h.scalar_type(), "/", h.device(), ", ", weight.scalar_type(), "/", weight.device(),
              " and ", bias.scalar_type(), "/", bias.device());
  return LockstepOutput::apply(h, weight, bias);
}


// --- the telemetry of a lockstep MLP ---------------------------------------------------
// What bn_core/train.py measures at a logged step (its _probe and gradient measures), in
// one call on snapshots of the weights. The trainer runs it on a worker thread: torch.ops
// releases the interpreter lock for the whole call, so on a second core it costs the
// training loop only the snapshot and the bookkeeping. As a chain of Python tensor ops on
// that thread, every op took the lock back and forth with the training loop, and most of
// the gain was lost. bn_core/background.py holds the Python side; tests hold this to the
// Python measures.

// Order-preserving unsigned keys for floats (negatives reversed), every NaN last, as
// numpy sorts them.
inline uint32_t float_key(float f) {
  if (std::isnan(f)) return 0xFFFFFFFFu;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float key_float(uint32_t key) {
  uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// values[0, n) sorted ascending into out: a least-significant-digit radix sort of the keys
// in three 11-bit passes. A layer's 30,000 probe values sort about 5x faster than with
// std::sort, and the numbers are the same.
void radix_sort(const float* values, float* out, int64_t n, std::vector<uint32_t>& a,
                std::vector<uint32_t>& b) {
  a.resize(n);
  b.resize(n);
  std::vector<int64_t> count(3 * 2048, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = float_key(values[i]);
    a[i] = k;
    ++count[k & 2047];
    ++count[2048 + ((k >> 11) & 2047)];
    ++count[4096 + (k >> 22)];
  }
  uint32_t* src = a.data();
  uint32_t* dst = b.data();
  for (int pass = 0; pass < 3; ++pass) {
    int64_t* c = count.data() + 2048 * pass;
    int64_t total = 0;
    for (int d = 0; d < 2048; ++d) {
      const int64_t here = c[d];
      c[d] = total;
      total += here;
    }
    const int shift = 11 * pass;
    for (int64_t i = 0; i < n; ++i) dst[c[(src[i] >> shift) & 2047]++] = src[i];
    std::swap(src, dst);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = key_float(src[i]);
}

// numpy.percentile's default rule (linear between closest ranks), with torch.lerp's
// rounding, as bn_core.probes.quantiles_of_sorted computes it.
float quantile_of_sorted(const float* sorted, int64_t n, double percentile) {
  const double pos = percentile / 100.0 * static_cast<double>(n - 1);
  const int64_t lo =
      std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(std::floor(pos)), 0), n - 1);
  const int64_t hi = std::min<int64_t>(lo + 1, n - 1);
  const float w = static_cast<float>(pos - static_cast<double>(lo));
  const float a = sorted[lo], d = sorted[hi] - sorted[lo];
  return w < 0.5f ? a + w * d : sorted[hi] - d * (1.0f - w);
}

// A lockstep MLP's BatchNorm runs (variants [start, stop) sharing one module), listed
// with the layer each normalizes.
struct BnRuns {
  at::IntArrayRef layer, start, stop;
  at::TensorList gamma, beta;
  at::ArrayRef<double> eps;
  // Running statistics for an eval-mode pass; empty lists: batch statistics.
  at::TensorList running_mean, running_var;

  void check(const char* op) const {
    const size_t n = layer.size();
    TORCH_CHECK(start.size() == n && stop.size() == n && gamma.size() == n && beta.size() == n &&
                    eps.size() == n && running_mean.size() == running_var.size() &&
                    (running_mean.empty() || running_mean.size() == n),
                op, ": every BN-run list needs one entry per run");
  }
};

// The hidden layers of a lockstep MLP on x: the forward of bn_core.models.LockstepMLP, with
// the same products and the same compiled BatchNorm (batch statistics, no running update),
// so the numbers match the training code's. In eval mode (running statistics given) a BN
// run is the affine map of BatchNorm.forward's inference branch. Returns each layer's
// pre-activation and BN input, and the last hidden output as the final element.
std::vector<at::Tensor> mlp_hidden(const at::Tensor& x, at::TensorList weights,
                                   at::TensorList biases, const at::Tensor& bias_mask,
                                   const BnRuns& bn, int64_t activation, bool before,
                                   std::vector<at::Tensor>* bn_inputs) {
  const int64_t L = static_cast<int64_t>(weights.size());
  const int64_t V = weights[0].size(0);
  const bool eval = !bn.running_mean.empty();
  at::Tensor h = x.unsqueeze(0).expand({V, x.size(0), x.size(1)});
  std::vector<at::Tensor> preacts;
  auto normalize = [&](at::Tensor t, int64_t layer) {
    for (size_t r = 0; r < bn.layer.size(); ++r) {
      if (bn.layer[r] != layer) continue;
      if (!eval) {
        t = batch_norm_train_stacked(t.contiguous(), bn.gamma[r], bn.beta[r], std::nullopt,
                                     std::nullopt, bn.start[r], bn.stop[r], bn.eps[r], 0.0, true);
        continue;
      }
      const int64_t G = bn.stop[r] - bn.start[r], C = t.size(2);
      const at::Tensor scale = (bn.running_var[r] + bn.eps[r]).rsqrt() * bn.gamma[r];
      const at::Tensor shift = bn.beta[r] - bn.running_mean[r] * scale;
      t = t.clone();
      at::Tensor slab = t.narrow(0, bn.start[r], G);
      slab.copy_(at::addcmul(shift.view({G, 1, C}), slab, scale.view({G, 1, C})));
    }
    return t;
  };
  auto act = [&](const at::Tensor& t) {
    return activation == 0 ? at::sigmoid(t) : activation == 1 ? at::tanh(t) : at::relu(t);
  };
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor z = at::baddbmm(biases[l] * bias_mask, h, weights[l]);
    if (before) {
      if (bn_inputs) bn_inputs->push_back(z);
      at::Tensor pre = normalize(z, l);
      h = act(pre);
      preacts.push_back(pre.contiguous());
    } else {
      at::Tensor post = act(z);
      if (bn_inputs) bn_inputs->push_back(post);
      h = normalize(post, l);
      preacts.push_back(z.contiguous());
    }
  }
  preacts.push_back(h);
  return preacts;
}

// Test loss and accuracy in eval mode, and the running-statistic errors, as
// bn_core/train.py's _evaluate and _running_stat_errors compute them: loss_sum (V,) and
// correct (V,) over the test set in chunks of `chunk`; errors (variants of all BN runs, 2),
// run by run, of |running mean - the mean over x_stats| and the same for the unbiased
// variance, each averaged over the channels.
std::vector<at::Tensor> lockstep_mlp_evaluation(
    const at::Tensor& x_test, const at::Tensor& y_test, int64_t chunk, const at::Tensor& x_stats,
    at::TensorList weights, at::TensorList biases, const at::Tensor& bias_mask,
    const at::Tensor& out_weight, const at::Tensor& out_bias, at::IntArrayRef bn_layer,
    at::IntArrayRef bn_start, at::IntArrayRef bn_stop, at::TensorList bn_gamma,
    at::TensorList bn_beta, at::ArrayRef<double> bn_eps, at::TensorList running_mean,
    at::TensorList running_var, int64_t activation, bool before) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(!weights.empty() && biases.size() == weights.size(),
              "lockstep_mlp_evaluation: needs one weight and one bias per hidden layer");
  const BnRuns eval_runs{bn_layer, bn_start, bn_stop, bn_gamma, bn_beta, bn_eps,
                         running_mean, running_var};
  eval_runs.check("lockstep_mlp_evaluation");
  TORCH_CHECK(chunk > 0, "lockstep_mlp_evaluation: chunk must be positive, got ", chunk);
  const int64_t V = weights[0].size(0), n = x_test.size(0), K = out_weight.size(2);
  at::Tensor loss_sum = at::zeros({V}, x_test.options());
  at::Tensor correct = at::zeros({V}, x_test.options());
  for (int64_t i = 0; i < n; i += chunk) {
    const int64_t m = std::min(chunk, n - i);
    const at::Tensor xb = x_test.narrow(0, i, m), yb = y_test.narrow(0, i, m);
    const at::Tensor h =
        mlp_hidden(xb, weights, biases, bias_mask, eval_runs, activation, before, nullptr).back();
    const at::Tensor logits = at::baddbmm(out_bias, h, out_weight);
    loss_sum += at::cross_entropy_loss(logits.reshape({-1, K}), yb.repeat({V}), std::nullopt,
                                       at::Reduction::None)
                    .view({V, -1})
                    .sum(1);
    correct += at::eq(logits.argmax(-1), yb).sum(1);
  }
  std::vector<at::Tensor> errors;
  if (!bn_layer.empty()) {
    const BnRuns train_runs{bn_layer, bn_start, bn_stop, bn_gamma, bn_beta, bn_eps, {}, {}};
    std::vector<at::Tensor> bn_inputs;
    mlp_hidden(x_stats, weights, biases, bias_mask, train_runs, activation, before, &bn_inputs);
    for (size_t r = 0; r < bn_layer.size(); ++r) {
      const int64_t G = bn_stop[r] - bn_start[r];
      // Statistics in double, as the compiled BatchNorm takes them, stored as the buffers are.
      const at::Tensor slab = bn_inputs[bn_layer[r]].narrow(0, bn_start[r], G).to(at::kDouble);
      const at::Tensor mean = slab.mean(1).to(running_mean[r].scalar_type());
      const at::Tensor var = slab.var(1, /*unbiased=*/true).to(running_var[r].scalar_type());
      const int64_t C = mean.size(1);
      errors.push_back(at::stack({(mean - running_mean[r].view({G, C})).abs().mean(-1),
                                  (var - running_var[r].view({G, C})).abs().mean(-1)},
                                 1));
    }
  }
  at::Tensor error_table = errors.empty() ? at::empty({0, 2}, x_test.options()) : at::cat(errors);
  return {loss_sum, correct, error_table};
}

// Per layer and variant, on the probe batch x: [the layer percentiles, the unit
// percentiles, mean, std (n - 1)] as table (L, V, P + U + 2), the values below each cut
// as counts (L, V, K), and the share of dead units (ReLU) as dead (L, V). Then the
// gradient measures of the training step, grads (L, V, 5): ||dL/dW||, log10 of the
// update:data ratio, ||bias||, ||dL/dbias||, and ||dL/d output||, which the caller takes
// (out_grad_norms, one (V,) tensor per layer, empty for NaN): the output gradient is as
// large as the batch's activations, too large to copy for every logged step.
std::vector<at::Tensor> lockstep_mlp_telemetry(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    const at::Tensor& bias_mask, at::IntArrayRef bn_layer, at::IntArrayRef bn_start,
    at::IntArrayRef bn_stop, at::TensorList bn_gamma, at::TensorList bn_beta,
    at::ArrayRef<double> bn_eps, int64_t activation, bool before, int64_t unit,
    const at::Tensor& cuts, at::ArrayRef<double> layer_percentiles,
    at::ArrayRef<double> unit_percentiles, at::TensorList weight_grads,
    at::TensorList bias_grads, at::TensorList out_grad_norms, const at::Tensor& lrs) {
  at::NoGradGuard no_grad;
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(weight_grads.size()) == L &&
                  static_cast<int64_t>(bias_grads.size()) == L &&
                  static_cast<int64_t>(out_grad_norms.size()) == L,
              "lockstep_mlp_telemetry: every per-layer list needs one tensor per layer");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "lockstep_mlp_telemetry: expected a float32 (N, d) probe batch on the CPU, got ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const BnRuns runs{bn_layer, bn_start, bn_stop, bn_gamma, bn_beta, bn_eps, {}, {}};
  runs.check("lockstep_mlp_telemetry");
  const int64_t V = weights[0].size(0), N = x.size(0);
  const auto cut = cuts.contiguous().to(at::kFloat);
  const float* cut_values = cut.data_ptr<float>();
  const int64_t K = cut.numel();
  const int64_t P = static_cast<int64_t>(layer_percentiles.size());
  const int64_t U = static_cast<int64_t>(unit_percentiles.size());
  std::vector<at::Tensor> preacts =
      mlp_hidden(x, weights, biases, bias_mask, runs, activation, before, nullptr);
  preacts.pop_back();  // the last hidden output
  at::Tensor table = at::empty({L, V, P + U + 2}, at::kDouble);
  at::Tensor counts = at::empty({L, V, K}, at::kLong);
  at::Tensor dead = at::zeros({L, V}, at::kDouble);
  double* t = table.data_ptr<double>();
  int64_t* k = counts.data_ptr<int64_t>();
  double* d = dead.data_ptr<double>();
  std::vector<uint32_t> keys_a, keys_b;
  std::vector<float> sorted, unit_values(N), unit_sorted(N);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& pre = preacts[l];
    const int64_t C = pre.size(2), n = N * C;
    TORCH_CHECK(0 <= unit && unit < C, "lockstep_mlp_telemetry: unit ", unit,
                " is not one of the ", C, " units of layer ", l + 1);
    sorted.resize(n);
    const float* p = pre.data_ptr<float>();
    for (int64_t v = 0; v < V; ++v) {
      const float* row = p + v * n;
      radix_sort(row, sorted.data(), n, keys_a, keys_b);
      double* out = t + (l * V + v) * (P + U + 2);
      for (int64_t i = 0; i < P; ++i) {
        out[i] = quantile_of_sorted(sorted.data(), n, layer_percentiles[i]);
      }
      for (int64_t i = 0; i < N; ++i) unit_values[i] = row[i * C + unit];
      radix_sort(unit_values.data(), unit_sorted.data(), N, keys_a, keys_b);
      for (int64_t i = 0; i < U; ++i) {
        out[P + i] = quantile_of_sorted(unit_sorted.data(), N, unit_percentiles[i]);
      }
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += row[i];
      const double mean = sum / static_cast<double>(n);
      double ss = 0.0;
      for (int64_t i = 0; i < n; ++i) ss += (row[i] - mean) * (row[i] - mean);
      out[P + U] = mean;
      out[P + U + 1] = std::sqrt(ss / static_cast<double>(n - 1));
      int64_t* below = k + (l * V + v) * K;
      for (int64_t j = 0; j < K; ++j) {
        below[j] = std::lower_bound(sorted.begin(), sorted.end(), cut_values[j]) - sorted.begin();
      }
      if (activation == 2) {  // ReLU: a unit is dead when no probe example activates it
        int64_t dead_units = 0;
        for (int64_t c = 0; c < C; ++c) {
          bool active = false;
          // NaN counts as active, as in the inline measure (amax propagates it).
          for (int64_t i = 0; i < N && !active; ++i) active = !(row[i * C + c] <= 0.0f);
          dead_units += !active;
        }
        d[l * V + v] = static_cast<double>(dead_units) / static_cast<double>(C);
      }
    }
  }
  std::vector<at::Tensor> per_layer;
  const at::Tensor nan = at::full({V}, std::nan(""), at::kDouble);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor W = weights[l].flatten(1).to(at::kDouble);
    const at::Tensor G = weight_grads[l].flatten(1).to(at::kDouble);
    const at::Tensor b = (biases[l] * bias_mask).flatten(1).to(at::kDouble);
    const at::Tensor& out_norm = out_grad_norms[l];
    per_layer.push_back(at::stack(
        {G.norm(2, {1}), at::log10(lrs.to(at::kDouble) * G.std(1) / W.std(1)), b.norm(2, {1}),
         bias_grads[l].flatten(1).to(at::kDouble).norm(2, {1}),
         out_norm.numel() == 0 ? nan : out_norm.to(at::kDouble)},
        1));
  }
  return {table, counts, dead, at::stack(per_layer)};
}

}  // namespace

TORCH_LIBRARY(bn_core, m) {
  m.def(
      "batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, float eps, float factor, bool grad_through_stats) -> Tensor");
  m.def(
      "batch_norm_train_stacked(Tensor h, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, int start, int stop, float eps, float factor, "
      "bool grad_through_stats) -> Tensor");
  m.def("lockstep_output(Tensor h, Tensor weight, Tensor bias) -> Tensor");
  m.def(
      "lockstep_mlp_telemetry(Tensor x, Tensor[] weights, Tensor[] biases, Tensor bias_mask, "
      "int[] bn_layer, int[] bn_start, int[] bn_stop, Tensor[] bn_gamma, Tensor[] bn_beta, "
      "float[] bn_eps, int activation, bool before, int unit, Tensor cuts, "
      "float[] layer_percentiles, float[] unit_percentiles, Tensor[] weight_grads, "
      "Tensor[] bias_grads, Tensor[] out_grad_norms, Tensor lrs) -> Tensor[]");
  m.def(
      "lockstep_mlp_evaluation(Tensor x_test, Tensor y_test, int chunk, Tensor x_stats, "
      "Tensor[] weights, Tensor[] biases, Tensor bias_mask, Tensor out_weight, Tensor out_bias, "
      "int[] bn_layer, int[] bn_start, int[] bn_stop, Tensor[] bn_gamma, Tensor[] bn_beta, "
      "float[] bn_eps, Tensor[] running_mean, Tensor[] running_var, int activation, "
      "bool before) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(bn_core, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_train_stacked", &batch_norm_train_stacked);
  m.impl("lockstep_output", &lockstep_output);
  m.impl("lockstep_mlp_telemetry", &lockstep_mlp_telemetry);
  m.impl("lockstep_mlp_evaluation", &lockstep_mlp_evaluation);
}
