"""Does BN reduce internal covariate shift? Ioffe & Szegedy's view next to Santurkar et al.'s."""

import streamlit as st

from bn_core import figures
from bn_core.claims import ClaimBook, load_claims
from bn_core.config import ConfigError, load_preset
from bn_core.experiments import make_trainer
from bn_core.experiments.ics import claims_summary
from bn_core.train import Trainer
from ui.charts import show_chart
from ui.claims_panel import show_claims
from ui.export_panel import page_export_panel
from ui.player import Player
from ui.routing import through_app
from ui.session import VARIANT_CHOICES, VARIANT_HELP

through_app()  # a first request for this page's URL, on a fresh server

PAGE = "ics"
PRESET = "ics-smoothness"
TICK_SECONDS = 0.5  # one redraw per tick; these measurements make steps slower
TRAIN_SECONDS = 0.3
TARGET_ACCURACY = 0.9
# The config fields this page's sidebar sets (widget key "ics_w_<field>").
SETTINGS = (
    "variants",
    "steps",
    "seed",
    "ics_every",
    "landscape_every",
    "landscape_low",
    "landscape_high",
    "landscape_points",
    "bn_noise_shift",
    "bn_noise_scale_low",
    "bn_noise_scale_high",
    "bn_noise_shift_spread",
    "bn_noise_scale_std",
)

ss = st.session_state


def new_run() -> bool:
    """A fresh run with the length and cadences chosen; a bad choice keeps the old run.
    True if it started."""
    try:
        if not ss.ics_w_variants:
            raise ConfigError("variants", [], "allowed: pick at least one variant")
        config = load_preset(PRESET).replace(**{f: ss[f"ics_w_{f}"] for f in SETTINGS})
        ss.ics_trainer = make_trainer(config)
    except ConfigError as err:
        ss.ics_message = f"Not restarted, the current run is kept. {err}"
        return False
    ss.ics_claims = ClaimBook(load_claims(PRESET))
    return True


base = load_preset(PRESET)
for field in SETTINGS:
    value = getattr(base, field)
    ss.setdefault(f"ics_w_{field}", [v.name for v in value] if field == "variants" else value)
if "ics_trainer" not in ss:
    new_run()
player = Player(
    "ics",
    run_key="ics_trainer",
    playing_key="ics_playing",
    tick_seconds=TICK_SECONDS,
    train_seconds=TRAIN_SECONDS,
)
player.apply_wishes()  # before anything is drawn, so the page shows what the clicks did

st.title("Does BN reduce internal covariate shift?")
st.caption(
    "Ioffe & Szegedy (2015) introduced BN to reduce internal covariate shift. "
    "Santurkar et al. (2018) measured that shift directly and proposed another explanation. "
    "Both views, on one live run, with each claim checked on the run."
)
c1, c2 = st.columns(2)
with c1.container(border=True):
    st.markdown("**Ioffe & Szegedy (2015): stable inputs, faster training**")
    st.markdown(
        "As the layers below change, each layer's input distribution keeps moving: "
        "*internal covariate shift*. They propose BN to fix the mean and spread of every "
        "layer's input, so that the layer above no longer chases a moving target, and "
        "report faster training that tolerates larger learning rates."
    )
with c2.container(border=True):
    st.markdown("**Santurkar et al. (2018): a smoother landscape**")
    st.markdown(
        "They measure the shift as the change in a layer's gradient when only the "
        "layers below it update (their Definition 2.1), and find it is **not** smaller "
        "with BN. A *noisy* BN, with unstable inputs on purpose, trains about as well. "
        "They report that what BN does change is the landscape: the loss and its "
        "gradient vary more gently along the gradient (a lower effective β-smoothness "
        "in their VGG runs)."
    )
    st.markdown(
        "The checked claims below say which of their findings this small net "
        "reproduces on your run, measured, with a ✓ or a ✗ for each."
    )

with st.sidebar:
    st.subheader("This experiment")
    st.caption(
        f"The **{PRESET}** preset: {base.depth} × {base.width} {base.activation} MLP on "
        f"{base.dataset}, lr {base.lr:g}, batch {base.batch_size}; variants "
        + ", ".join(v.name for v in base.variants)
        + ". Changes here take effect on **Restart**."
    )
    st.multiselect(
        "Variants",
        VARIANT_CHOICES,
        key="ics_w_variants",
        persist_state="session",
        help="; ".join(f"{k}: {v}" for k, v in VARIANT_HELP.items()),
    )
    st.number_input(
        "Training steps", 100, 50_000, step=500, key="ics_w_steps", persist_state="session"
    )
    st.number_input(
        "ICS every (steps)",
        0,
        1000,
        key="ics_w_ics_every",
        persist_state="session",
        help="0 switches the measurement off. Each one costs one extra forward and "
        "backward pass per layer above the first.",
    )
    st.number_input(
        "Landscape probe every (steps)",
        0,
        1000,
        key="ics_w_landscape_every",
        persist_state="session",
        help="0 switches it off. Each probe takes one extra forward and backward pass per "
        "step size (Points, under Probe step sizes).",
    )
    st.number_input("Seed", 0, 2**31 - 1, key="ics_w_seed", persist_state="session")
    with st.expander("Probe step sizes"):
        st.caption(
            "The probe steps η·lr along −g for log-spaced η. Santurkar et al. used about "
            "0.5 to 4 for VGG and 0.01 to 30 for a deep linear net."
        )
        c1, c2 = st.columns(2)
        c1.number_input(
            "η from", 0.001, 100.0, format="%g", key="ics_w_landscape_low", persist_state="session"
        )
        c2.number_input(
            "η to", 0.001, 100.0, format="%g", key="ics_w_landscape_high", persist_state="session"
        )
        st.number_input("Points", 2, 32, key="ics_w_landscape_points", persist_state="session")
    with st.expander("Noise of batchnorm-noisy"):
        st.caption(
            "After each BN: a ← s·a + m. Per step and layer μ ~ U(−shift, shift) and "
            "σ ~ U(low, high); per element m ~ U(μ − spread, μ + spread), s ~ N(σ, std). "
            "In evaluation mode (test accuracy) the noisy BN applies the noise's mean "
            "instead of a draw: scale (low + high) / 2, "
            f"{(ss.ics_w_bn_noise_scale_low + ss.ics_w_bn_noise_scale_high) / 2:g} "
            "here, and shift 0. That is a choice of this app, not of the paper."
        )
        c1, c2 = st.columns(2)
        c1.number_input(
            "Shift", 0.0, 10.0, step=0.1, key="ics_w_bn_noise_shift", persist_state="session"
        )
        c2.number_input(
            "Spread",
            0.0,
            10.0,
            step=0.05,
            key="ics_w_bn_noise_shift_spread",
            persist_state="session",
        )
        c1.number_input(
            "Scale low",
            0.0,
            10.0,
            step=0.05,
            key="ics_w_bn_noise_scale_low",
            persist_state="session",
        )
        c2.number_input(
            "Scale high",
            0.0,
            10.0,
            step=0.05,
            key="ics_w_bn_noise_scale_high",
            persist_state="session",
        )
        st.number_input(
            "Scale std",
            0.0,
            10.0,
            step=0.05,
            key="ics_w_bn_noise_scale_std",
            persist_state="session",
        )

message = st.empty()  # always drawn, so the live panel below never changes its place
if ss.get("ics_message"):
    message.error(ss.ics_message)
    ss.ics_message = None

b1, b2, _ = st.columns([1, 1, 5])
player.play_button(b1)
player.reset_button(b2, new_run, label="Restart")


def ics_panel() -> None:
    trainer: Trainer = ss.ics_trainer
    cfg = trainer.config
    player.status(
        trainer.status_line(None if player.playing else player.state),
        progress=trainer.step / cfg.steps,
    )
    history = trainer.history
    layers = history.layers() or trainer.model.layer_names
    layer = layers[-1]

    st.subheader("The numbers behind both views")
    rows = claims_summary(history, layer, TARGET_ACCURACY)
    variants = history.variants() or trainer.variant_names
    table = {
        "view": [r.claim for r in rows],
        "measure": [r.measure for r in rows],
        **{
            v: ["–" if r.values.get(v) is None else r.fmt.format(r.values[v]) for r in rows]
            for v in variants
        },
    }
    st.dataframe(table, hide_index=True, width="stretch")
    with st.expander("How each number is measured"):
        for r in rows:
            st.markdown(f"- **{r.measure}** ({r.claim}): {r.help}.")
    show_claims(ss.ics_claims, history, finished=trainer.finished, title="What this run shows")

    st.subheader("1 · Stable distributions and speed (Ioffe & Szegedy)")
    show_chart(
        figures.percentile_bands(history, layer=layer), "percentile_bands", trainer, page=PAGE
    )
    show_chart(figures.loss_accuracy(history), "loss_accuracy", trainer, page=PAGE)
    st.subheader("2 · Internal covariate shift itself (Santurkar et al.)")
    if cfg.ics_every:
        show_chart(figures.ics_l2(history), "ics_l2", trainer, page=PAGE)
        show_chart(figures.ics_cos(history), "ics_cos", trainer, page=PAGE)
    else:
        st.info("ICS measurement is off: set **ICS every** in the sidebar and restart.")
    st.subheader("3 · Smoothness of the landscape (Santurkar et al.)")
    if cfg.landscape_every:
        show_chart(figures.landscape(history), "landscape", trainer, page=PAGE)
    else:
        st.info("Landscape probes are off: set **Landscape probe every** and restart.")
    st.markdown(
        "**What to conclude, and what not.** If the noisy variant trains about as fast as "
        "batchnorm while its inputs jump more from one measurement to the next than the "
        "plain net's, steadiness from step to step cannot be what makes BN fast. (Over "
        "the whole run the plain net's band may still drift and widen further than the "
        "noisy net's: the claims above check both.) If BN's ‖G − G′‖ is not below the "
        "plain net's, BN did not reduce internal covariate shift as Santurkar et al. "
        "define it. If BN's loss range along the gradient is smaller but its effective "
        "β is not, this run supports only part of their smoothness finding. None of this "
        "says the shift does not exist, and a small net on digits is one data point, not "
        "a proof: try other seeds and learning rates, and watch the claims above."
    )


player.panel(ics_panel)
page_export_panel(PAGE)
