"""Bias blow-up (Ioffe & Szegedy, section 2): why BN's gradient must go through the batch mean."""

import streamlit as st

from bn_core import figures
from bn_core.claims import ClaimBook, load_claims
from bn_core.config import load_preset
from bn_core.experiments import charts
from bn_core.experiments.blowup import BlowupResult, blowup_summary, network_blowup, run_blowup
from ui.charts import show_chart
from ui.claims_panel import show_claims
from ui.export_panel import page_export_panel
from ui.routing import through_app

through_app()  # a first request for this page's URL, on a fresh server

PAGE = "blowup"
# Log-spaced 1-2-5 grid: the slope is proportional to lr, so ratios are what matter.
LR_CHOICES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
NET_PRESET = "bias-blowup"
METRIC_WIDTH = 175  # px: four to a row on a laptop, two on a phone

ss = st.session_state


# The minimal model is deterministic and takes well under a second: a shared cache is safe.
@st.cache_data(max_entries=64, show_spinner=False)
def minimal_model(steps: int, lr: float, scale: bool) -> BlowupResult:
    return run_blowup(steps=steps, lr=lr, scale=scale)


def metric_row():
    """A row of metrics that wraps instead of stacking one per line on a narrow screen."""
    return st.container(horizontal=True, horizontal_alignment="distribute", gap="medium")


st.title("Bias blow-up")
st.caption("Ioffe & Szegedy (2015), section 2: what goes wrong when the gradient step ignores BN.")
st.markdown(
    "If a gradient step treats the batch statistics as constants, a bias in front of the "
    "normalization gets a push that the normalization erases. In the paper's minimal "
    "model the push is the same at every step, so the bias grows without bound while the "
    "loss never moves. In a real network the push shrinks as the net learns, so the bias "
    "drifts ever more slowly, but the naive rule still does harm. First the minimal "
    "model, then a real network."
)

# --- the minimal model -------------------------------------------------------------------
st.subheader("The minimal model")
st.markdown(
    "A fixed batch of n = 32 numbers $u_i$, one scalar bias $b$, inputs $x_i = u_i + b$, "
    "and normalization by centering only: $\\hat x_i = x_i - \\mu_B$. The loss is "
    "$L = \\tfrac12\\sum_i (\\hat x_i - t_i)^2$, where the target $t$ has mean $c = 1$, "
    "which no centered batch can reach. Gradient descent on $b$ runs twice: **naive**, "
    "with $\\mu_B$ held constant, and **aware**, with the gradient through $\\mu_B$."
)
c1, c2, c3 = st.columns([2, 2, 1.4], vertical_alignment="bottom")
lr = c1.select_slider(
    "Learning rate",
    options=LR_CHOICES,
    value=0.1,
    key="bb_lr",
    persist_state="session",
    format_func=lambda v: f"{v:g}",
    help="Log scale: each notch multiplies by 2 or 2.5.",
)
steps = c2.slider("Gradient steps", 10, 1000, 200, step=10, key="bb_steps", persist_state="session")
scale = c3.toggle(
    "Also scale",
    key="bb_scale",
    persist_state="session",
    help="Divide by the batch std as well, x̂ = (x − μ_B)/√(σ²_B + ε), as BN does.",
)

try:
    result = minimal_model(steps, lr, scale)
except Exception as err:  # bounded widgets should make this unreachable; never a traceback
    st.error(f"The minimal model could not run with lr = {lr:g}, {steps} steps: {err}")
    st.stop()
summary = blowup_summary(result)
divided = " / s" if scale else ""
row = metric_row()
row.metric(
    "Measured slope of b",
    f"{summary.measured_slope:.6g}",
    help="(b_K − b_0) / K of the naive run: how far b moves per step.",
    width=METRIC_WIDTH,
)
row.metric(
    f"Predicted lr·|Σ ∂L/∂x̂ᵢ|{divided}",
    f"{summary.predicted_slope:.6g}",
    help=f"lr · n · c{divided} = {lr:g} · {summary.grad_sum:g}"
    + (f" / {summary.divisor:.4g}" if scale else ""),
    width=METRIC_WIDTH,
)
row.metric(
    "Aware bias moved",
    charts.sci_format(summary.aware_drift),
    help="Largest |b_k − b_0| with the gradient through μ_B: rounding only.",
    width=METRIC_WIDTH,
)
row.metric(
    "Loss change",
    charts.sci_format(summary.loss_change),
    help="Largest |L_k − L_0| over both runs: float64 rounding.",
    width=METRIC_WIDTH,
)
if scale:
    st.info(
        f"Also scaling: the naive bias still grows linearly, with slope "
        f"{summary.predicted_slope:.4g} = lr · n · c / s, where s = √(var(u) + ε) = "
        f"{summary.divisor:.4g}. The loss and x̂ still do not change."
    )
show_chart(charts.blowup_bias(result), "blowup_bias", page=PAGE)
show_chart(charts.blowup_loss(result), "blowup_loss", page=PAGE)

with st.expander("Why x̂ and the loss never change, and why the aware gradient is 0", expanded=True):
    st.markdown("The bias cancels in the normalization, whatever its value:")
    st.latex(r"\hat x_i = (u_i + b) - \frac1n \sum_j (u_j + b) = u_i - \bar u")
    st.markdown(
        "So $\\hat x$, and with it $L$, do not depend on $b$ at all. The naive backward "
        "pass treats $\\mu_B$ as a constant, so it uses $\\partial \\hat x_i / \\partial b = 1$ "
        "and finds a gradient that is not zero:"
    )
    st.latex(r"g = \sum_i \frac{\partial L}{\partial \hat x_i} = \sum_i (\hat x_i - t_i) = -n\,c")
    st.latex(r"b_{k+1} = b_k - \mathrm{lr}\cdot g")
    st.markdown(
        "The step changes $b$ but not $\\hat x$, so the next step sees the same $g$ again, "
        "and $b_k = b_0 - k\\,\\mathrm{lr}\\,g$: a straight line with slope "
        "$\\mathrm{lr}\\cdot n c$. Taking the gradient through the mean instead gives"
    )
    st.latex(
        r"\frac{\partial \hat x_i}{\partial b} = 1 - \frac{\partial \mu_B}{\partial b} = 1 - 1 = 0"
    )
    st.latex(r"\Longrightarrow\quad \frac{\partial L}{\partial b} = 0")
    st.markdown(
        "which is the truth: the bias is redundant in front of BN, and BN's $\\beta$ "
        "takes over its job. That is why BN nets drop it."
    )
    st.markdown(
        "**With scaling.** The variance ignores a shift, so $\\sigma_B^2$ does not depend on $b$:"
    )
    st.latex(r"\hat x_i = \frac{x_i - \mu_B}{s},\quad s = \sqrt{\sigma_B^2 + \varepsilon}")
    st.latex(r"\Longrightarrow\quad g = -\frac{n\,c}{s}")
    st.markdown(
        "The paper remarks that the problem gets worse when the normalization also scales. "
        "In this one-bias model it does not: the naive bias still climbs on a straight "
        "line, with the centering-only slope divided by $s$; here "
        f"$s = {summary.batch_std:.4g}$. Turn on **Also scale** to see it."
    )
# --- the real network --------------------------------------------------------------------
st.subheader("In a real network")
net_config = load_preset(NET_PRESET)
st.markdown(
    f"The **{NET_PRESET}** preset: the {net_config.dataset} data set, a "
    f"{net_config.depth} × {net_config.width} sigmoid MLP with BN before each sigmoid, and "
    "the linear biases *kept* in front of BN. Two copies train in lockstep on the same "
    f"batches of {net_config.batch_size} with plain SGD at lr {net_config.lr:g}: "
    "**batchnorm** (gradient through $\\mu_B$ and $\\sigma_B^2$) and **batchnorm-naive** "
    "(statistics held constant)."
)
st.markdown(
    "With the correct gradient the biases get no gradient at all (float32 rounding of "
    "0) and stay put: BN's $\\beta$ does their job. With the naive gradient each bias gets "
    "a push that the normalization cancels, so it drifts. Unlike the minimal model, the "
    "push is not the same every step: held-constant statistics make it "
    "$\\tfrac{\\gamma}{s}\\,\\partial L/\\partial \\beta$, the gradient that $\\beta$ gets, "
    "and that shrinks as the net fits the data. So the drift slows down rather than "
    "running away. The naive rule also bends the weight gradients, since it drops the "
    "terms through $\\mu_B$ and $\\sigma_B^2$ that BN's backward pass subtracts, and the "
    "naive net still trains, only to a higher loss. The claims under the numbers check "
    "each of these on your run, at step 0 and step 1,000."
)
n1, n2 = st.columns([3, 1.2], vertical_alignment="bottom")
net_steps = n1.slider(
    "Training steps",
    20,
    1000,
    1000,  # the claims below are checked at step 1,000
    step=20,
    key="bb_net_steps",
    persist_state="session",
    help="1,000 steps take some 10 to 40 seconds on one CPU thread. The claims under the "
    "numbers are checked at step 1,000: a shorter run leaves most of them unchecked.",
)
if n2.button("Train both nets", type="primary", icon=":material/play_arrow:", width="stretch"):
    try:
        with st.spinner(f"Training both nets for {net_steps} steps…", show_time=True):
            ss.bb_network = network_blowup(steps=net_steps)
    except Exception as err:
        ss.pop("bb_network", None)
        st.error(f"The network run failed, nothing is shown: {err}")

net = ss.get("bb_network")
if net is None:
    st.info(
        "Press **Train both nets** to run the comparison; 1,000 steps take some 10 to 40 seconds."
    )
else:
    grad_range = net.bias_grad_range()
    row = metric_row()
    row.metric("Steps trained", f"{len(net.steps):,}", width=METRIC_WIDTH)
    row.metric(
        "Max ‖dL/db‖, correct",
        charts.sci_format(grad_range["batchnorm"][1]),
        help="batchnorm, over all layers and steps: an exact 0 up to float32 rounding.",
        width=METRIC_WIDTH,
    )
    row.metric(
        "Min ‖dL/db‖, naive",
        charts.sci_format(grad_range["batchnorm-naive"][0]),
        help="batchnorm-naive, the smallest over all layers and steps: compare it with the "
        "correct gradient's largest, left.",
        width=METRIC_WIDTH,
    )
    first, last = net.first_and_last("batchnorm-naive", "bias_grad_norm")
    row.metric(
        f"Naive push, {net.layers[0]}",
        charts.sci_format(last),
        delta=f"{charts.sci_format(first)} at step 0",
        delta_color="off",
        delta_arrow="off",
        help=f"‖dL/db‖ of {net.layers[0]}'s bias at the last step trained, and at the "
        "first: the push shrinks, so the drift slows.",
        width=METRIC_WIDTH,
    )
    show_claims(
        ClaimBook(load_claims(NET_PRESET)),
        net.history,
        finished=True,
        title=f"What this run shows (the {NET_PRESET} preset's claims, checked)",
    )
    show_chart(charts.network_bias_norms(net), "network_bias_norms", trainer=net.trainer, page=PAGE)
    show_chart(charts.network_bias_grads(net), "network_bias_grads", trainer=net.trainer, page=PAGE)
    show_chart(
        figures.loss_accuracy(net.history),
        "network_loss_accuracy",
        trainer=net.trainer,
        page=PAGE,
    )

page_export_panel(PAGE)
