"""Learning-rate sweep: which learning rates work with and without BN (BN-x5, BN-x30)."""

import pandas as pd
import streamlit as st

from bn_core.config import NORMS, ConfigError, load_preset
from bn_core.experiments import charts
from bn_core.experiments.sweep import MAX_RATES, USABLE_WITHIN, LrSweep, lr_grid
from ui.charts import show_chart
from ui.export_panel import page_export_panel
from ui.player import Player
from ui.routing import through_app

through_app()  # a first request for this page's URL, on a fresh server

PAGE = "sweep"
PRESET = "ioffe-fig1"
TICK_SECONDS = 0.5
TRAIN_SECONDS = 0.4
LR_CHOICES = [
    1e-4,
    2e-4,
    5e-4,
    1e-3,
    2e-3,
    5e-3,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
]

# Each normalization's name in the charts: "plain" for none, else the norm itself.
NORM_LABELS = {norm: "plain" if norm == "none" else norm for norm in NORMS}

ss = st.session_state
player = Player(
    "sweep",
    run_key="sweep",
    playing_key="sweep_running",
    tick_seconds=TICK_SECONDS,
    train_seconds=TRAIN_SECONDS,
)
player.apply_wishes()  # before anything is drawn, so the page shows what the clicks did

st.title("Learning-rate sweep")
st.caption(
    "Ioffe & Szegedy (2015, section 4.2) trained BN nets at 5 and 30 times the usual "
    "learning rate, where the plain net diverged. Here the same net trains at several "
    "learning rates with and without BN, from the same initial weights and batches."
)
base = load_preset(PRESET)
st.markdown(
    f"The **{PRESET}** net: {base.depth} × {base.width} {base.activation} MLP on "
    f"{base.dataset}, batch {base.batch_size}, {base.optimizer.upper()} with momentum "
    f"{base.momentum:g}. Each learning rate trains one copy per normalization picked "
    "below, all from the same weights and batches."
)
st.multiselect(
    "Normalizations",
    list(NORM_LABELS),
    default=["none", "batchnorm"],
    format_func=NORM_LABELS.get,
    key="sweep_w_norms",
    persist_state="session",
    help="; ".join(f"{NORM_LABELS[k]}: {v}" for k, v in NORMS.items()),
)

c1, c2, c3, c4 = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
c1.select_slider(
    "Learning rates from / to",
    options=LR_CHOICES,
    value=(0.01, 10.0),
    format_func=lambda v: f"{v:g}",
    key="sweep_w_range",
    persist_state="session",
)
c2.number_input(
    "Rates", 2, MAX_RATES, 6, key="sweep_w_count", persist_state="session", help="log-spaced"
)
c3.number_input(
    "Steps each", 50, 20_000, 1000, step=250, key="sweep_w_steps", persist_state="session"
)
c4.number_input("Seed", 0, 2**31 - 1, 0, key="sweep_w_seed", persist_state="session")


def new_sweep() -> bool:
    """A sweep of the rates chosen (the Player then plays it); a bad choice keeps the last
    one. True if it was built."""
    try:
        low, high = ss.sweep_w_range
        rates = lr_grid(low, high, int(ss.sweep_w_count))
        config = base.replace(seed=int(ss.sweep_w_seed))
        norms = tuple(ss.sweep_w_norms)
        if not norms:
            raise ConfigError("normalizations", [], "allowed: pick at least one")
        ss.sweep = LrSweep(config, rates, norms=norms, steps=int(ss.sweep_w_steps))
    except ConfigError as err:
        ss.sweep_message = f"The sweep did not start; the last one is kept. {err}"
        return False
    return True


b1, b2, _ = st.columns([1, 1, 4])
player.reset_button(
    b1,
    new_sweep,
    label="Start sweep",
    icon=":material/play_arrow:",
    primary=True,
    disabled=player.playing,
    then_play=True,
)
player.pause_button(b2, "Stop")
message = st.empty()  # always drawn, so the live panel below never changes its place
if ss.get("sweep_message"):
    message.error(ss.sweep_message)
    ss.sweep_message = None


# The Player's states in the sweep's words.
SWEEP_STATES = {"playing": "running", "paused": "stopped", "finished": "finished"}


def sweep_panel() -> None:
    sweep: LrSweep | None = ss.get("sweep")
    if sweep is None:
        st.info(
            "Choose a range and press **Start sweep**. Six rates of 1,000 steps take "
            "about half a minute on one CPU core."
        )
        return
    nets = len(sweep.rates) * len(sweep.norms)
    player.status(
        f"Sweep {SWEEP_STATES[player.state]}: {sweep.steps_done:,} of "
        f"{sweep.steps_total:,} lockstep steps ({nets} nets of {sweep.steps:,} steps, "
        "trained at most 8 at a time)",
        progress=sweep.progress,
    )
    result = sweep.result()
    row = st.container(horizontal=True, gap="medium")
    for label in result.usable:
        text = result.usable_text(label, short=True) or ("none" if sweep.finished else "none yet")
        row.metric(
            f"Usable learning rates, {label}",
            text,
            width=340,  # room for "0.01 – 10 (≥ 1,000×)" in the metric font
            help=f"Did not diverge and ended within {USABLE_WITHIN:.0%} of the sweep's best "
            "accuracy. A range that reaches an end of the grid may go on past it: its "
            "ratio is then a lower bound (≥).",
        )
    bounded = [label for label in result.usable if result.touches_grid_end(label)]
    if bounded:
        st.caption(
            "; ".join(f"{label}: {result.usable_text(label)}" for label in bounded)
            + ". A range that reaches an end of the grid may go on past it, so its ratio "
            "is a lower bound: widen the grid to find where it ends."
        )
    show_chart(charts.lr_sweep_chart(result), "lr_sweep", page=PAGE)
    table = pd.DataFrame(
        [
            {
                "variant": p.label,
                "lr": p.lr,
                "training loss": p.loss,
                "test loss": p.test_loss,
                "test accuracy": p.test_accuracy,
                "diverged at step": "–" if p.diverged_at is None else f"{p.diverged_at:,}",
            }
            for p in result.points
        ]
    )
    st.dataframe(
        table,
        hide_index=True,
        column_config={"test accuracy": st.column_config.NumberColumn(format="percent")},
    )


player.panel(sweep_panel)
page_export_panel(PAGE)
