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

#include <cmath>
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
}

TORCH_LIBRARY_IMPL(bn_core, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_train_stacked", &batch_norm_train_stacked);
  m.impl("lockstep_output", &lockstep_output);
}
