"""Inside a BatchNorm layer: its stages, running statistics, batch size, invariance, placement."""

import math

import streamlit as st

from bn_core.config import load_preset
from bn_core.experiments import charts
from bn_core.experiments.inside import (
    BatchSizeNoise,
    ScaleInvariance,
    TrainEvalGap,
    batch_size_noise,
    identity_params,
    layer_batch,
    momentum_conventions,
    placement_runs,
    scale_invariance,
    single_example_error,
    stages,
    synthetic_batch,
    train_eval_gap,
)
from ui.charts import show_chart
from ui.export_panel import page_export_panel
from ui.routing import through_app

through_app()  # a first request for this page's URL, on a fresh server

PAGE = "inside"
SECTIONS = [
    "Stages",
    "Train vs eval",
    "Momentum conventions",
    "Batch size",
    "Scale invariance",
    "Placement",
]
SYNTHETIC, REAL = "Synthetic batch", "A layer of the current run"
MOMENTA = (0.01, 0.1, 0.5)
POPULATION_MEAN, POPULATION_STD = 2.0, 3.0
METRIC_WIDTH = 150  # px: a row of five on a laptop, two to a row on a phone
A_CHOICES = [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0]

ss = st.session_state
ss.setdefault("ib_gamma", 1.0)
ss.setdefault("ib_beta", 0.0)


# Deterministic and fast numerics: a shared cache is safe (per-session runs go in ss).
@st.cache_data(max_entries=32, show_spinner=False)
def gap_run(steps: int, batch: int) -> TrainEvalGap:
    return train_eval_gap(
        MOMENTA,
        steps=steps,
        batch=batch,
        population_mean=POPULATION_MEAN,
        population_std=POPULATION_STD,
    )


@st.cache_data(max_entries=4, show_spinner=False)
def noise_run() -> BatchSizeNoise:
    return batch_size_noise(trials=500)


@st.cache_data(max_entries=4, show_spinner=False)
def invariance_run() -> ScaleInvariance:
    return scale_invariance(a_values=tuple(A_CHOICES))


def nice_ceil(value: float) -> float:
    """The next number of the form 1, 2 or 5 times a power of ten: stable slider ends."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def metric_row():
    """A row of metrics that wraps instead of stacking one per line on a narrow screen."""
    return st.container(horizontal=True, horizontal_alignment="distribute", gap="medium")


def set_affine(gamma: float, beta: float) -> None:
    ss.ib_gamma, ss.ib_beta = float(gamma), float(beta)


st.title("Inside a BatchNorm layer")
st.caption(
    "Every number here comes from the lab's own from-scratch BN layer; closed forms are "
    "drawn dashed next to the measurements."
)
section = st.segmented_control(
    "Experiment",
    SECTIONS,
    default=SECTIONS[0],
    key="ib_section",
    persist_state="session",
    required=True,
)

# --- stages ----------------------------------------------------------------------------------
if section == "Stages":
    st.subheader("One mini-batch, stage by stage")
    st.markdown("BN treats each channel on its own. For the n values of one channel in a batch:")
    # One formula pair per line: a line of KaTeX does not wrap on a phone.
    st.latex(r"\mu_B = \frac1n\sum_i x_i \qquad \sigma_B^2 = \frac1n\sum_i (x_i-\mu_B)^2")
    st.latex(
        r"\hat x_i = \frac{x_i-\mu_B}{\sqrt{\sigma_B^2+\varepsilon}}"
        r"\qquad y_i = \gamma\,\hat x_i + \beta"
    )
    trainer = ss.get("trainer")
    source = st.radio(
        "Values", [SYNTHETIC, REAL], key="ib_source", persist_state="session", horizontal=True
    )
    x = None
    if source == REAL and trainer is None:
        st.info(
            "No run in this session yet: open **Live training** (it starts one), then come "
            "back. Showing a synthetic batch meanwhile."
        )
        source = SYNTHETIC
    if source == REAL:
        bn_variants = [v.name for v in trainer.config.variants if v.uses_bn]
        layers = list(trainer.model.layer_names)
        c1, c2, c3 = st.columns(3)
        variant = c1.selectbox(
            "Variant",
            bn_variants or trainer.variant_names,
            key="ib_variant",
            persist_state="session",
        )
        layer = c2.selectbox(
            "Layer", layers, index=len(layers) - 1, key="ib_layer", persist_state="session"
        )
        unit = c3.number_input(
            "Unit", 0, 511, trainer.config.probe_unit, key="ib_unit", persist_state="session"
        )
        try:
            x = layer_batch(trainer, layer, int(unit), variant)
            where = (
                f"the input to BN of unit {unit} in {layer} ({variant}) on the run's fixed "
                f"probe batch, at step {trainer.step:,}"
            )
        except Exception as err:
            st.error(f"Could not read that unit: {err}")
    if x is None:
        c1, c2, c3 = st.columns(3)
        mean = c1.slider("Mean", -10.0, 10.0, 3.0, step=0.5, key="ib_mean", persist_state="session")
        spread = c2.slider(
            "Spread (std)", 0.1, 10.0, 2.0, step=0.1, key="ib_std", persist_state="session"
        )
        n = c3.slider("Batch size n", 2, 256, 32, key="ib_n", persist_state="session")
        x = synthetic_batch(n, mean, spread).numpy()
        where = f"{n} draws from N({mean:g}, {spread:g}²), the same for the same settings"
    st.caption(f"Values: {where}.")

    before = stages(x)  # the statistics, to place the sliders and the Identity button
    identity = identity_params(x, before.eps)
    gamma_end = nice_ceil(max(3.0, 2.0 * before.std_B, abs(ss.ib_gamma)))
    beta_end = nice_ceil(max(5.0, 2.0 * abs(before.mu_B), abs(ss.ib_beta)))
    g1, g2 = st.columns(2)
    gamma = g1.slider(
        "γ (scale)", 0.0, gamma_end, step=gamma_end / 500, key="ib_gamma", persist_state="session"
    )
    beta = g2.slider(
        "β (shift)",
        -beta_end,
        beta_end,
        step=beta_end / 500,
        key="ib_beta",
        persist_state="session",
    )
    b1, b2, _ = st.columns([2, 1.2, 2])
    b1.button(
        "Identity: γ = √(σ²_B + ε), β = μ_B",
        on_click=set_affine,
        args=identity,
        icon=":material/undo:",
        help="The affine step can undo the normalization exactly.",
        width="stretch",
    )
    b2.button("γ = 1, β = 0", on_click=set_affine, args=(1.0, 0.0), width="stretch")

    result = stages(x, gamma, beta, before.eps)
    max_diff = result.output_change
    m = metric_row()
    m.metric("μ_B", f"{result.mu_B:.4g}", help="Batch mean", width=METRIC_WIDTH)
    m.metric(
        "σ²_B",
        f"{result.var_B:.4g}",
        help="Biased batch variance (divides by n)",
        width=METRIC_WIDTH,
    )
    m.metric("√(σ²_B + ε)", f"{result.std_B:.4g}", help=f"ε = {result.eps:g}", width=METRIC_WIDTH)
    m.metric("n", f"{len(result.x)}", width=METRIC_WIDTH)
    m.metric(
        "max |y − x|",
        f"{max_diff:.2e}",
        help="0 up to rounding when BN is the identity",
        width=METRIC_WIDTH,
    )
    show_chart(charts.stages_histograms(result), "bn_stages", page=PAGE)
    with st.expander("Why γ and β can give back the input"):
        st.markdown(
            "Normalizing could take away something the next layer needs, say a unit that "
            "should sit on the steep part of a sigmoid or far out on its flat end. The "
            "learned scale and shift can undo it:"
        )
        st.latex(r"\gamma = \sqrt{\sigma_B^2+\varepsilon},\quad \beta = \mu_B")
        st.latex(
            r"\Longrightarrow\ y_i = \sqrt{\sigma_B^2+\varepsilon}\,"
            r"\frac{x_i-\mu_B}{\sqrt{\sigma_B^2+\varepsilon}} + \mu_B = x_i"
        )
        st.markdown(
            "So BN never shrinks what a layer can represent; training decides how much "
            "normalization to keep. Press **Identity** and the output histogram is the "
            "input's again, with max |y − x| at rounding level."
        )

# --- train vs eval ---------------------------------------------------------------------------
elif section == "Train vs eval":
    st.subheader("Train mode and eval mode")
    st.markdown(
        "In training BN normalizes with the batch's own $\\mu_B$ and $\\sigma_B^2$. At test "
        "time an example must not depend on the others in its batch, so BN uses running "
        "averages, updated at every training step with momentum $m$ (PyTorch's convention):"
    )
    st.latex(r"\hat\mu \leftarrow (1-m)\,\hat\mu + m\,\mu_B")
    st.latex(r"\hat\sigma^2 \leftarrow (1-m)\,\hat\sigma^2 + m\,\tfrac{n}{n-1}\,\sigma_B^2")
    st.markdown(
        f"Below, one BN layer per momentum sees the same batches from "
        f"$N({POPULATION_MEAN:g}, {POPULATION_STD:g}^2)$, starting from $\\hat\\mu = 0$, "
        "$\\hat\\sigma^2 = 1$. The gap is the mean |train-mode output − eval-mode output| "
        "on a fixed probe batch of 256."
    )
    c1, c2 = st.columns(2)
    gap_steps = c1.slider(
        "Batches", 20, 500, 200, step=10, key="ib_gap_steps", persist_state="session"
    )
    gap_batch = c2.select_slider(
        "Batch size", [4, 8, 16, 32, 64, 128], 32, key="ib_gap_batch", persist_state="session"
    )
    gap = gap_run(gap_steps, gap_batch)
    show_chart(charts.train_eval_gap_chart(gap, batch_size=gap_batch), "train_eval_gap", page=PAGE)
    st.markdown(
        f"The gap never reaches 0: even the exact population statistics leave "
        f"{gap.gap_at_population:.3g} (dashed), because the probe batch's own mean "
        f"({gap.probe_mean:.3g}) and variance ({gap.probe_var:.3g}) differ from the "
        "population's. A gap far above that line means the running statistics have not "
        "caught up yet."
    )

# --- momentum conventions --------------------------------------------------------------------
elif section == "Momentum conventions":
    st.subheader("Two names for one momentum")
    st.markdown("PyTorch and Keras/TensorFlow write the same update with opposite meanings of *m*:")
    st.latex(r"\text{PyTorch: } \hat\mu \leftarrow (1-m)\,\hat\mu + m\,\mu_B")
    st.latex(r"\text{Keras: } \hat\mu \leftarrow m_K\,\hat\mu + (1-m_K)\,\mu_B")
    st.latex(r"\text{the same rule exactly when } m_K = 1 - m")
    st.markdown(
        "Their defaults are *not* a matching pair: PyTorch uses $m = 0.1$, Keras "
        "$m_K = 0.99$, which is PyTorch's $m = 0.01$, a ten times longer memory."
    )
    m_torch = st.select_slider(
        "PyTorch momentum m",
        [0.01, 0.02, 0.05, 0.1, 0.2, 0.3],
        0.1,
        key="ib_m_torch",
        persist_state="session",
    )
    m_keras = 1.0 - m_torch
    st.markdown(
        f"Below, PyTorch's $m = {m_torch:g}$ next to the Keras rule with the *matching* "
        f"$m_K = {m_keras:g}$ (the two lines coincide), and the widely copied mistake: that "
        f"Keras number put into PyTorch's formula, so each new batch gets weight {m_keras:g}, "
        f"$\\hat\\mu \\leftarrow {m_torch:g}\\,\\hat\\mu + {m_keras:g}\\,\\mu_B$, which "
        "remembers little more than the last few batches."
    )
    means = gap_run(200, 32).batch_means
    conventions = momentum_conventions(means, m_torch=m_torch)
    st.caption("How much each sequence jitters: its standard deviation over its last half.")
    k = metric_row()
    k.metric(f"PyTorch m = {m_torch:g}", f"{conventions.torch_noise:.3g}", width=METRIC_WIDTH)
    k.metric(
        f"Keras m = {conventions.m_keras:g}", f"{conventions.keras_noise:.3g}", width=METRIC_WIDTH
    )
    k.metric(
        f"Mixed up, m = {conventions.m_keras:g}",
        f"{conventions.mistaken_noise:.3g}",
        width=METRIC_WIDTH,
    )
    k.metric("Batch means", f"{conventions.batch_noise:.3g}", width=METRIC_WIDTH)
    fig = charts.momentum_chart(conventions, means, population_mean=POPULATION_MEAN)
    show_chart(fig, "momentum_conventions", page=PAGE)

# --- batch size ------------------------------------------------------------------------------
elif section == "Batch size":
    st.subheader("Batch size and noisy statistics")
    st.markdown(
        "$\\mu_B$ and $\\sigma_B^2$ are estimates from n values, so they differ from batch "
        "to batch. For normal data with standard deviation $\\sigma$:"
    )
    st.latex(
        r"\operatorname{std}(\mu_B) = \frac{\sigma}{\sqrt n} \qquad "
        r"\operatorname{std}(\sigma_B^2) = \sigma^2\,\frac{\sqrt{2(n-1)}}{n}"
    )
    st.latex(r"\operatorname{E}[\sigma_B^2] = \frac{n-1}{n}\,\sigma^2")
    noise = noise_run()
    show_chart(charts.batch_size_noise_chart(noise), "batch_size_noise", page=PAGE)
    st.markdown(
        "That noise acts as a mild regularizer for moderate batches, and drowns the signal "
        "for tiny ones. With one example per channel there is nothing to normalize: "
        "$x - \\mu_B = 0$ and $\\sigma_B^2 = 0$. Our layer refuses such a batch in training "
        "mode, as PyTorch's does:"
    )
    st.code(single_example_error(), language="text", wrap_lines=True)

# --- scale invariance ------------------------------------------------------------------------
elif section == "Scale invariance":
    st.subheader("Scale invariance")
    st.markdown(
        "Multiply the weights in front of BN by a number $a > 0$. Mean and spread scale along:"
    )
    st.latex(r"\mathrm{BN}(aWu) = \frac{aWu - a\mu}{\sqrt{a^2\sigma^2+\varepsilon}}")
    st.latex(r"= \frac{Wu-\mu}{\sqrt{\sigma^2+\varepsilon/a^2}} \approx \mathrm{BN}(Wu)")
    st.latex(
        r"\frac{\partial L}{\partial W}\Big|_{aW} = \frac1a\,"
        r"\frac{\partial L}{\partial W}\Big|_{W}"
    )
    st.markdown(
        "The output ignores the weights' scale, and the gradient shrinks as they grow: "
        "larger weights take relatively smaller steps, which keeps training stable. "
        "Only $\\varepsilon$ breaks the symmetry, once $a^2\\sigma^2$ is no longer large "
        "against it. Measured on a 64 × 20 batch through a 20 → 10 layer:"
    )
    a = st.select_slider(
        "Weight scale a (log)",
        A_CHOICES,
        10.0,
        key="ib_a",
        persist_state="session",
        format_func=lambda v: f"{v:g}",
    )
    inv = invariance_run()
    i = A_CHOICES.index(a)
    k = metric_row()
    k.metric(
        "Output change",
        f"{inv.max_change[i]:.2e}",
        help=f"max |BN(aWu) − BN(Wu)| with ε = {inv.eps:g} fixed, as in the layer",
        width=METRIC_WIDTH,
    )
    k.metric(
        "… with ε·a²",
        f"{inv.max_change_scaled_eps[i]:.2e}",
        help="The same with ε scaled by a²: exact up to rounding",
        width=METRIC_WIDTH,
    )
    k.metric(
        "Gradient-norm ratio",
        f"{inv.grad_ratio[i]:.4g}",
        help="‖dL/dW at aW‖ / ‖dL/dW at W‖",
        width=METRIC_WIDTH,
    )
    k.metric("1/a", f"{inv.expected_ratio[i]:.4g}", width=METRIC_WIDTH)
    fig = charts.scale_invariance_chart(inv, selected=a)
    show_chart(fig, "scale_invariance", page=PAGE)
    st.caption(
        f"Smallest per-unit variance of Wu here: {inv.min_var:.3g}; ε = {inv.eps:g} matters "
        "once a² times that is of order ε."
    )

# --- placement -------------------------------------------------------------------------------
elif section == "Placement":
    st.subheader("BN before or after the nonlinearity")
    placement_config = load_preset("placement")
    st.markdown(
        "The paper normalizes the input of the nonlinearity, $z = g(\\mathrm{BN}(Wu))$, so "
        "the sigmoid always sees values centred at $\\beta$ with spread $\\gamma$. Many "
        "codebases put BN after it instead, $z = \\mathrm{BN}(g(Wu + b))$, normalizing "
        "outputs that may already be saturated. Same net ("
        f"{placement_config.depth} × {placement_config.width} sigmoid MLP on "
        f"{placement_config.dataset}), same seed and batches, lr "
        f"{placement_config.lr:g}; only the placement differs. Which one trains faster "
        "depends on the net and the data: run it and see."
    )
    c1, c2 = st.columns([3, 1.2], vertical_alignment="bottom")
    place_steps = c1.slider(
        "Training steps",
        50,
        1000,
        300,
        step=50,
        key="ib_place_steps",
        persist_state="session",
        help="About 60 steps a second for both runs on one CPU thread.",
    )
    if c2.button(
        "Train both placements", type="primary", icon=":material/play_arrow:", width="stretch"
    ):
        try:
            with st.spinner(f"Training two nets for {place_steps} steps…", show_time=True):
                ss.ib_placement = placement_runs(place_steps)
        except Exception as err:
            ss.pop("ib_placement", None)
            st.error(f"The placement runs failed, nothing is shown: {err}")
    runs = ss.get("ib_placement")
    if runs is None:
        st.info("Press **Train both placements** to compare; it takes a few seconds.")
    else:
        fig = charts.placement_chart(runs, threshold=placement_config.saturation_threshold)
        show_chart(fig, "placement", page=PAGE)

page_export_panel(PAGE)
