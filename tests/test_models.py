"""Lockstep models against plain torch: same numbers forward, same parameters after training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bn_core.batchnorm import BatchNorm
from bn_core.config import ConfigError, RunConfig
from bn_core.data import load_dataset
from bn_core.models import LockstepLeNet, LockstepMLP, build_model
from bn_core.train import _LockstepOptimizer

ALL4 = ["plain", "batchnorm", "batchnorm-naive", "batchnorm-torch"]
BN_TYPES = (BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def float64():
    """Build everything in float64 (modules made inside to_sequential included)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, probe_size=64)


def batches(digits, n_batches: int, size: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        idx = torch.randperm(len(digits.x_train), generator=gen)[:size]
        out.append((digits.x_train[idx].to(dtype), digits.y_train[idx]))
    return out


def mlp_config(**kw) -> RunConfig:
    base = dict(
        depth=3,
        width=16,
        activation="tanh",
        init_std=0.4,
        variants=ALL4,
        batch_size=32,
        bn_momentum=0.1,
    )
    return RunConfig(**{**base, **kw})


def linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def bns(seq: nn.Sequential) -> list[nn.Module]:
    return [m for m in seq if isinstance(m, BN_TYPES)]


def lockstep_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    V, N, K = logits.shape
    return F.cross_entropy(logits.reshape(V * N, K), y.repeat(V), reduction="none").view(V, N)


# --- forward parity ------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["before", "after"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_forward_matches_to_sequential_float64(float64, digits, placement, activation):
    cfg = mlp_config(placement=placement, activation=activation, keep_bias=True)
    model = LockstepMLP(cfg, 64, 10)
    assert model.weights[0].dtype == torch.float64
    # Make biases and BN affine parameters non-trivial so parity covers them.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    x, _ = batches(digits, 1, 40)[0]
    model.train()
    logits, records = model(x, record=True)
    assert logits.shape == (4, 40, 10)
    assert len(records) == 3
    for v in range(4):
        seq = model.to_sequential(v)
        seq.train()
        assert_close(seq(x), logits[v], rtol=1e-12, atol=1e-12)
    # Eval mode: running statistics (updated once by the train-mode pass above).
    model.eval()
    logits_eval, _ = model(x)
    for v in range(4):
        seq = model.to_sequential(v).eval()
        assert_close(seq(x), logits_eval[v], rtol=1e-12, atol=1e-12)


def test_to_sequential_keeps_the_models_dtype(digits):
    """A model converted with .double() must give a float64 Sequential with the same numbers."""
    model = LockstepMLP(mlp_config(), 64, 10).double()
    x, _ = batches(digits, 1, 20)[0]
    logits, _ = model(x)
    for v in range(4):
        seq = model.to_sequential(v)
        assert {p.dtype for p in seq.parameters()} == {torch.float64}
        assert_close(seq(x), logits[v], rtol=1e-12, atol=1e-12)


def test_to_sequential_structure():
    model = LockstepMLP(mlp_config(depth=2), 64, 10)
    plain, bn, naive, ref = (model.to_sequential(v) for v in range(4))
    assert [type(m) for m in plain] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    assert [type(m) for m in bn] == [
        nn.Linear,
        BatchNorm,
        nn.Tanh,
        nn.Linear,
        BatchNorm,
        nn.Tanh,
        nn.Linear,
    ]
    assert all(m.grad_through_stats for m in bns(bn))
    assert not any(m.grad_through_stats for m in bns(naive))
    assert all(type(m) is nn.BatchNorm1d for m in bns(ref))
    assert [lin.bias is None for lin in linears(bn)] == [True, True, False]
    assert [lin.bias is None for lin in linears(plain)] == [False, False, False]


# --- initial weights -----------------------------------------------------------------


@pytest.mark.parametrize("init", ["gaussian", "xavier", "kaiming"])
def test_all_variants_start_from_identical_weights(init):
    cfg = mlp_config(init=init, init_std=0.1)
    model = LockstepMLP(cfg, 64, 10)
    for W in [*model.weights, model.out_weight]:
        for v in range(1, 4):
            assert torch.equal(W[v], W[0])
    W0 = model.weights[0][0]
    if init == "gaussian":
        assert abs(W0.std().item() - 0.1) < 0.01
    elif init == "xavier":
        bound = (6 / (64 + 16)) ** 0.5
        assert W0.abs().max() <= bound and W0.abs().max() > 0.9 * bound
    else:
        assert abs(W0.std().item() - (2 / 64) ** 0.5) < 0.03
    for b in [*model.biases, model.out_bias]:
        assert torch.count_nonzero(b) == 0
    # Same seed -> same weights; another seed -> other weights.
    again = LockstepMLP(cfg, 64, 10)
    assert torch.equal(again.weights[1], model.weights[1])
    other = LockstepMLP(cfg.replace(seed=1), 64, 10)
    assert not torch.equal(other.weights[1], model.weights[1])


# --- training parity -----------------------------------------------------------------


def train_lockstep_and_torch(digits, cfg: RunConfig, lrs, k: int, optimizer: str = "sgd"):
    model = LockstepMLP(cfg, 64, 10)
    seqs = [model.to_sequential(v) for v in range(len(lrs))]
    opt = _LockstepOptimizer(model, optimizer, list(lrs), cfg.momentum)
    if optimizer == "sgd":
        ref_opts = [
            torch.optim.SGD(s.parameters(), lr=lr, momentum=cfg.momentum)
            for s, lr in zip(seqs, lrs, strict=True)
        ]
    else:
        ref_opts = [
            torch.optim.Adam(s.parameters(), lr=lr) for s, lr in zip(seqs, lrs, strict=True)
        ]
    model.train()
    for s in seqs:
        s.train()
    for x, y in batches(digits, k, cfg.batch_size):
        opt.zero_grad()
        logits, _ = model(x)
        lockstep_loss(logits, y).mean(1).sum().backward()
        opt.step()
        for s, o in zip(seqs, ref_opts, strict=True):
            o.zero_grad()
            F.cross_entropy(s(x), y).backward()
            o.step()
    return model, seqs


def assert_variant_equals(model: LockstepMLP, v: int, seq: nn.Sequential, tol: float) -> None:
    kw = dict(rtol=tol, atol=tol)
    lins = linears(seq)
    for layer, lin in enumerate(lins[:-1]):
        assert_close(model.weights[layer][v], lin.weight.T, **kw)
        if lin.bias is not None:
            assert_close(model.biases[layer][v, 0], lin.bias, **kw)
        else:
            assert torch.count_nonzero(model.biases[layer][v]) == 0
    assert_close(model.out_weight[v], lins[-1].weight.T, **kw)
    assert_close(model.out_bias[v, 0], lins[-1].bias, **kw)
    for layer, bn in enumerate(bns(seq)):
        gamma, beta = model.norms[layer].affine(v)
        assert_close(gamma, bn.weight, **kw)
        assert_close(beta, bn.bias, **kw)
        mean, var = model.norms[layer].stats(v)
        assert_close(mean, bn.running_mean, **kw)
        assert_close(var, bn.running_var, **kw)
    if not bns(seq):
        assert all(norm.affine(v) is None for norm in model.norms)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_sgd_training_matches_torch_sgd_float64(float64, digits, placement):
    cfg = mlp_config(momentum=0.9, placement=placement)
    lrs = [0.1, 0.2, 0.05, 0.3]  # a different lr per variant
    model, seqs = train_lockstep_and_torch(digits, cfg, lrs, k=6)
    for v in range(4):
        assert_variant_equals(model, v, seqs[v], 1e-10)
    # The run really moved the weights.
    fresh = LockstepMLP(cfg, 64, 10)
    assert (model.weights[0] - fresh.weights[0]).abs().amax() > 1e-3


def test_sgd_training_matches_with_kept_bias_and_cumulative_bn(float64, digits):
    cfg = mlp_config(momentum=0.9, keep_bias=True, bn_momentum=None, activation="sigmoid")
    model, seqs = train_lockstep_and_torch(digits, cfg, [0.5] * 4, k=5)
    for v in range(4):
        assert_variant_equals(model, v, seqs[v], 1e-10)


def test_adam_training_matches_torch_adam_float64(float64, digits):
    cfg = mlp_config(optimizer="adam")
    model, seqs = train_lockstep_and_torch(
        digits, cfg, [1e-2, 3e-3, 1e-3, 2e-2], k=5, optimizer="adam"
    )
    for v in range(4):
        assert_variant_equals(model, v, seqs[v], 1e-9)


def test_grouped_bn_variants_with_own_lrs(float64, digits):
    """Two variants of one BN kind share a module; each slice still gets its own lr."""
    variants = [
        {"name": "bn-slow", "norm": "batchnorm", "lr": 0.05},
        {"name": "bn-fast", "norm": "batchnorm", "lr": 0.4},
        {"name": "plain"},
    ]
    cfg = mlp_config(variants=variants, momentum=0.9)
    model, seqs = train_lockstep_and_torch(digits, cfg, [0.05, 0.4, 0.1], k=4)
    assert len(model.norms[0].groups) == 1
    for v in range(3):
        assert_variant_equals(model, v, seqs[v], 1e-10)


def test_per_variant_lr_scales_first_update(digits):
    """Identical variants with lr 0.1 and 0.4: the first SGD update differs by exactly 4x."""
    variants = [
        {"name": "a", "norm": "batchnorm", "lr": 0.1},
        {"name": "b", "norm": "batchnorm", "lr": 0.4},
        {"name": "c", "norm": "none", "lr": 0.1},
        {"name": "d", "norm": "none", "lr": 0.4},
    ]
    cfg = mlp_config(variants=variants, keep_bias=True)
    model = LockstepMLP(cfg, 64, 10).double()
    before = copy.deepcopy(model)
    opt = _LockstepOptimizer(model, "sgd", [0.1, 0.4, 0.1, 0.4], 0.0)
    x, y = batches(digits, 1, 32)[0]
    logits, _ = model(x)
    lockstep_loss(logits, y).mean(1).sum().backward()
    opt.step()
    for p, p0 in zip(model.parameters(), before.parameters(), strict=True):
        delta = p - p0
        if p.shape[0] == 4:  # stacked (V, ...) weights and biases
            assert_close(delta[1], 4 * delta[0], rtol=1e-10, atol=1e-14)
            assert_close(delta[3], 4 * delta[2], rtol=1e-10, atol=1e-14)
        else:  # BN gamma / beta of the shared group: [a | b] slices
            w = p.shape[0] // 2
            assert_close(delta[w:], 4 * delta[:w], rtol=1e-10, atol=1e-14)
            assert delta[:w].abs().amax() > 0


# --- dropped bias --------------------------------------------------------------------


def one_backward(model, x, y):
    model.zero_grad(set_to_none=True)
    logits, _ = model(x)
    lockstep_loss(logits, y).mean(1).sum().backward()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bias_dropped_in_front_of_bn(digits, optimizer):
    # A bias right before BN is cancelled by the mean subtraction: the optimizer never
    # moves it from 0 and the measures report no gradient for it. Through BN's full
    # gradient it gets float rounding of 0; through the naive one, a push it never takes.
    cfg = mlp_config(keep_bias=False)
    model = LockstepMLP(cfg, 64, 10)
    x, y = batches(digits, 1, 32, dtype=torch.float32)[0]
    one_backward(model, x, y)
    for layer, b in enumerate(model.biases):
        assert b.grad[[1, 3]].abs().max() < 1e-6  # batchnorm and batchnorm-torch
        assert b.grad[2].norm() > 1e-4  # batchnorm-naive
        assert b.grad[0].norm() > 1e-4  # the plain net's bias learns
        for v in (1, 2, 3):
            assert torch.count_nonzero(model.bias_grads(v)[layer]) == 0
            assert torch.count_nonzero(model.layer_stacks()[layer].bias_grad[v]) == 0
    opt = _LockstepOptimizer(model, optimizer, [0.5] * 4, 0.9)
    for x, y in batches(digits, 3, 32, dtype=torch.float32):
        one_backward(model, x, y)
        opt.step()
    for layer in range(3):
        for v in (1, 2, 3):
            assert torch.count_nonzero(model.bias_vectors(v)[layer]) == 0
            assert torch.count_nonzero(model.biases[layer][v]) == 0
        assert model.bias_vectors(0)[layer].norm() > 0


def test_bias_kept_when_bn_after_activation(digits):
    model = LockstepMLP(mlp_config(placement="after"), 64, 10)
    x, y = batches(digits, 1, 32, dtype=torch.float32)[0]
    one_backward(model, x, y)
    for b in model.biases:
        for v in range(4):
            assert b.grad[v].norm() > 1e-6


@pytest.mark.parametrize(("dtype", "tiny"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_kept_bias_gets_zero_gradient_through_correct_bn(digits, dtype, tiny):
    model = LockstepMLP(mlp_config(keep_bias=True, activation="sigmoid"), 64, 10).to(dtype)
    x, y = batches(digits, 1, 32, dtype=dtype)[0]
    one_backward(model, x, y)
    for b in model.biases:
        g = b.grad[:, 0]
        assert g[0].norm() > 1e-4  # plain
        assert g[1].norm() < tiny  # batchnorm: d x_hat / d b = 0
        assert g[3].norm() < tiny  # torch's BatchNorm1d: same
        assert g[2].norm() > 1e-4  # batchnorm-naive: the section-2 push


# --- build_model / LeNet -------------------------------------------------------------


def test_build_model_picks_the_architecture():
    assert isinstance(build_model(mlp_config(), 64, 10, (8, 8)), LockstepMLP)
    lenet = build_model(RunConfig(model="lenet"), 64, 10, (8, 8))
    assert isinstance(lenet, LockstepLeNet)
    with pytest.raises(ValueError):
        build_model(RunConfig(model="lenet"), 2, 2, None)


@pytest.mark.parametrize(
    ("side", "shapes"),
    [
        (8, [(6, 8, 8), (16, 4, 4), (120,), (84,)]),
        (28, [(6, 28, 28), (16, 10, 10), (120,), (84,)]),
    ],
)
@pytest.mark.parametrize("placement", ["before", "after"])
def test_lenet_forward_shapes(side, shapes, placement):
    cfg = RunConfig(model="lenet", variants=ALL4, placement=placement, batch_size=8)
    model = LockstepLeNet(cfg, side, 10)
    x = torch.randn(5, side * side, generator=torch.Generator().manual_seed(0))
    logits, records = model(x, record=True)
    assert logits.shape == (4, 5, 10)
    assert torch.isfinite(logits).all()
    assert [r.name for r in records] == ["conv1", "conv2", "fc1", "fc2"]
    for rec, shape in zip(records, shapes, strict=True):
        for t in (rec.preact, rec.postact, rec.bn_input, rec.output):
            assert t.shape == (4, 5, *shape)
    _, none = model(x)
    assert none == []
    for v in range(4):
        stats = model.bn_running_stats(v)
        if v == 0:
            assert stats == [None] * 4
        else:
            assert [s[0].shape for s in stats] == [(6,), (16,), (120,), (84,)]


def test_lenet_variants_start_from_identical_weights():
    cfg = RunConfig(model="lenet", variants=ALL4)
    model = LockstepLeNet(cfg, 8, 10)
    # Biases dropped in front of BN (not for the plain net).
    assert all(m.bias is not None for m in model.nets[0].linears)
    assert all(m.bias is None for net in model.nets[1:] for m in net.linears)
    ref = model.nets[0]
    for net in model.nets[1:]:
        for a, b in zip(ref.linears, net.linears, strict=True):
            assert torch.equal(a.weight, b.weight), a
        assert torch.equal(ref.head.weight, net.head.weight)


def test_lenet_conv_bn_statistics_are_per_channel():
    cfg = RunConfig(model="lenet", variants=ALL4, bn_momentum=0.1)
    model = LockstepLeNet(cfg, 8, 10)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0)) * 2 + 1
    model.train()
    _, records = model(x, record=True)
    for v in (1, 2, 3):
        stats = model.bn_running_stats(v)
        for layer, rec in enumerate(records):
            bn_in = rec.bn_input[v]
            dims = (0, 2, 3) if bn_in.dim() == 4 else (0,)
            mean = bn_in.mean(dims)
            var = bn_in.var(dims)  # unbiased over all N * H * W values of a channel
            assert_close(stats[layer][0], 0.1 * mean, rtol=1e-5, atol=1e-6)
            assert_close(stats[layer][1], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
        # The normalized conv output has per-channel mean 0, std 1 over (N, H, W).
        pre = records[0].preact[v]
        assert_close(pre.mean((0, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
        assert_close(pre.var((0, 2, 3), unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_lenet_variant_index_for_per_variant_lr():
    cfg = RunConfig(model="lenet", variants=["plain", "batchnorm"])
    model = LockstepLeNet(cfg, 8, 10)
    for v, net in enumerate(model.nets):
        for p in net.parameters():
            assert model.variant_index_of(p).flatten().tolist() == [v]
    with pytest.raises(KeyError):
        model.variant_index_of(torch.zeros(3))


def test_lenet_weights_follow_the_configured_init():
    """init = 'gaussian' with init_std s: every conv / fc weight has std about s."""
    cfg = RunConfig(model="lenet", init="gaussian", init_std=0.5, variants=["plain", "batchnorm"])
    model = LockstepLeNet(cfg, 28, 10)
    for net in model.nets:
        for m in [*net.linears, net.head]:
            assert abs(m.weight.std().item() - 0.5) < 0.05, m


# --- runs of BN variants in one activation --------------------------------------------
# Consecutive variants with the same normalization share one BN module that normalizes
# their (V_run, N, C) slice where it lies; each layout must give every variant the numbers
# of its own torch.nn net.

LAYOUTS = {
    "one": ["batchnorm"],
    "mixed": [
        {"name": "b1", "norm": "batchnorm"},
        {"name": "p1", "norm": "none"},
        {"name": "b2", "norm": "batchnorm"},
        {"name": "b3", "norm": "batchnorm"},
        {"name": "n1", "norm": "batchnorm-naive"},
        {"name": "t1", "norm": "batchnorm-torch"},
        {"name": "p2", "norm": "none"},
    ],
    "sweep": [{"name": f"{n}{i}", "norm": n} for n in ("none", "batchnorm") for i in range(4)],
    # The per-example norms, in runs of one and two, between BN and plain variants.
    "normalizers": [
        {"name": "l1", "norm": "layernorm"},
        {"name": "l2", "norm": "layernorm"},
        {"name": "b1", "norm": "batchnorm"},
        {"name": "g1", "norm": "groupnorm"},
        {"name": "g2", "norm": "groupnorm"},
        {"name": "r1", "norm": "rmsnorm"},
        {"name": "p1", "norm": "none"},
        {"name": "r2", "norm": "rmsnorm"},
    ],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("placement", ["before", "after"])
def test_bn_runs_match_each_variants_own_net(float64, digits, layout, placement):
    cfg = mlp_config(variants=LAYOUTS[layout], placement=placement, bn_momentum=0.3)
    torch.manual_seed(0)
    model = LockstepMLP(cfg, 64, 10)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-trivial gamma and beta
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for b in model.biases:  # a bias BN drops stays at 0: the optimizer never moves it
            b.mul_(model.bias_mask)
    V = len(cfg.variants)
    nets = [model.to_sequential(v).train() for v in range(V)]
    x, y = batches(digits, 1, 24)[0]
    logits, _ = model(x)
    lockstep_loss(logits, y).mean(1).sum().backward()
    for v, net in enumerate(nets):
        out = net(x)
        assert_close(logits[v], out, rtol=1e-12, atol=1e-12)
        F.cross_entropy(out, y).backward()
        for W, linear in zip([*model.weights, model.out_weight], linears(net), strict=True):
            assert_close(W.grad[v], linear.weight.grad.T, rtol=1e-10, atol=1e-12)
        stats = model.bn_running_stats(v)
        for layer_stats, bn in zip([st for st in stats if st is not None], bns(net), strict=True):
            assert_close(layer_stats[0], bn.running_mean, rtol=1e-12, atol=1e-12)
            assert_close(layer_stats[1], bn.running_var, rtol=1e-12, atol=1e-12)


# --- residual blocks ----------------------------------------------------------------------
class _ReferenceResidualNet(nn.Module):
    """One variant of a residual MLP written directly with torch.nn layers:
    layer 1 is Linear -> norm -> act; every later layer is h + act(W N(h) + b) ("pre")
    or N(h + act(W h + b)) ("post")."""

    def __init__(self, model: LockstepMLP, variant: int, norm_factory, residual: str):
        super().__init__()
        self.residual = residual
        self.act = model.activation
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for W, b in zip(model.weights, model.biases, strict=True):
            lin = nn.Linear(W.shape[1], W.shape[2])
            with torch.no_grad():
                lin.weight.copy_(W[variant].T)
                lin.bias.copy_(b[variant, 0] * model.bias_mask[variant, 0])
            self.linears.append(lin)
            self.norms.append(norm_factory(W.shape[2]))
        self.head = nn.Linear(model.out_weight.shape[1], model.out_weight.shape[2])
        with torch.no_grad():
            self.head.weight.copy_(model.out_weight[variant].T)
            self.head.bias.copy_(model.out_bias[variant, 0])

    def forward(self, x):
        h = self.act(self.norms[0](self.linears[0](x)))
        for lin, norm in zip(self.linears[1:], self.norms[1:], strict=True):
            pre = self.residual == "pre"
            h = h + self.act(lin(norm(h))) if pre else norm(h + self.act(lin(h)))
        return self.head(h)


@pytest.mark.parametrize("residual", ["pre", "post"])
def test_residual_blocks_match_a_torch_nn_residual_net(float64, digits, residual):
    factories = {
        "plain": lambda c: nn.Identity(),
        "batchnorm": lambda c: nn.BatchNorm1d(c),
        "layernorm": lambda c: nn.LayerNorm(c),
        "groupnorm": lambda c: nn.GroupNorm(4, c),
        "rmsnorm": lambda c: nn.RMSNorm(c, eps=1e-5),
    }
    cfg = mlp_config(variants=list(factories), residual=residual, depth=4, activation="sigmoid")
    model = LockstepMLP(cfg, 64, 10)
    x, y = batches(digits, 1, 24)[0]
    logits, _ = model(x)
    lockstep_loss(logits, y).mean(1).sum().backward()
    for v, factory in enumerate(factories.values()):
        ref = _ReferenceResidualNet(model, v, factory, residual)
        out = ref(x)
        assert_close(logits[v], out, rtol=1e-12, atol=1e-12)
        F.cross_entropy(out, y).backward()
        for W, lin in zip(model.weights, ref.linears, strict=True):
            assert_close(W.grad[v], lin.weight.grad.T, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not a Sequential"):
        model.to_sequential(0)


def test_residual_needs_the_mlp():
    with pytest.raises(ConfigError, match="residual = 'pre'"):
        RunConfig(model="lenet", residual="pre")


# --- a pass over some of the variants -----------------------------------------------------
SUBSET_LAYOUTS = {
    **LAYOUTS,
    "noisy": ["plain", "batchnorm-noisy", "layernorm", "batchnorm"],
}


def buffers_of(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("layout", sorted(SUBSET_LAYOUTS))
@pytest.mark.parametrize("residual", ["none", "post"])
def test_a_pass_over_the_running_stat_variants_is_theirs_in_the_full_pass(
    float64, digits, layout, residual
):
    # The running-statistics pass of an evaluation runs only BN's variants: their logits,
    # records and running averages must be exactly those of a pass over every variant.
    cfg = mlp_config(variants=SUBSET_LAYOUTS[layout], residual=residual, bn_momentum=0.3)
    model = LockstepMLP(cfg, 64, 10)
    picked = model.running_stat_variants()
    names = [v.name for v in cfg.variants]
    assert picked == [i for i, v in enumerate(cfg.variants) if v.norm.startswith("batchnorm")]
    x, _ = batches(digits, 1, 24)[0]
    full_model = copy.deepcopy(model)
    with torch.no_grad():
        logits, records = full_model(x, record=True)
        sub_logits, sub_records = model(x, record=True, variants=picked)
    assert_close(sub_logits, logits[picked], rtol=0, atol=0)
    for sub, full in zip(sub_records, records, strict=True):
        assert_close(sub.preact, full.preact[picked], rtol=0, atol=0)
    for v in picked:
        ours, ref = model.bn_running_stats(v), full_model.bn_running_stats(v)
        assert_close(ours, ref, rtol=0, atol=0, msg=names[v])


def test_a_pass_over_part_of_a_run_is_refused(digits):
    model = LockstepMLP(mlp_config(variants=LAYOUTS["sweep"]), 64, 10)
    x, _ = batches(digits, 1, 8, dtype=torch.float32)[0]
    with pytest.raises(ValueError, match=r"variants \[4, 5\] are not whole runs"):
        model(x, variants=[4, 5])


def test_lenet_pass_over_the_running_stat_variants(digits):
    cfg = RunConfig(
        model="lenet", dataset="digits", variants=["plain", "batchnorm", "groupnorm"], groups=2
    )
    model = LockstepLeNet(cfg, 8, 10).train()
    assert model.running_stat_variants() == [1]
    x, _ = batches(digits, 1, 16, dtype=torch.float32)[0]
    full_model = copy.deepcopy(model)
    with torch.no_grad():
        logits, _ = full_model(x)
        sub_logits, _ = model(x, variants=[1])
    assert_close(sub_logits[0], logits[1], rtol=0, atol=0)
    ours, ref = model.bn_running_stats(1), full_model.bn_running_stats(1)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, rtol=0, atol=0)
