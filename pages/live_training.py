"""Live training: the same net with and without BatchNorm, trained side by side."""

import functools

import streamlit as st

from bn_core import figures
from bn_core.config import FIELDS
from bn_core.train import Trainer
from ui import session, setup_form
from ui.charts import show_chart
from ui.claims_panel import show_claims
from ui.export_panel import config_filename, export_panel
from ui.player import Player
from ui.routing import through_app

through_app()  # a first request for this page's URL, on a fresh server

# The browser asks for a tick every TICK_SECONDS (a request that comes while a tick runs
# waits for it, then starts at once). A tick trains up to TRAIN_SECONDS and then draws,
# about 0.12 s in all on a quiet machine, so the charts redraw 5 times a second and a
# click on Pause finds the server free. On a machine busy with other work drawing takes
# longer, and at a fixed training time the ticks ran back to back and clicks on Pause and
# Reset waited behind them. So a lone session's tick trains only what its interval leaves
# after the last tick's drawing and 0.06 s kept free for clicks, and at least 0.02 s
# (ui/load.py). Measured with server and browser on one 2-core machine
# (tests/test_browser.py): 5.0 redraws a second per chart when quiet, 4.2 with a
# 100,000-step run busy on the same cores.
TICK_SECONDS = 0.2
TRAIN_SECONDS = 0.08  # the most a tick trains (alone on the server)
# Says what each control does, not how the run will turn out: that is for the charts.
JUMP_NOTE = (
    "A jump and a ramp are different lessons: a jump puts the new rate on weights tuned to "
    "the old one, a ramp (a notch every few seconds) lets the weights follow it. Try both "
    "and compare the plain net with BN."
)

ss = session.state()
player = Player(
    "live",
    run_key="trainer",
    playing_key="playing",
    tick_seconds=TICK_SECONDS,
    train_seconds=TRAIN_SECONDS,
    fit_to_tick=True,
)
player.apply_wishes()  # before anything is drawn, so the page shows what the clicks did


@st.fragment
def live_settings() -> None:
    """The live sliders rerun on their own: a key press on one costs these few widgets,
    answered between two ticks, where a run of the whole page (stopping the tick in
    flight) took 0.7 s a press while training. The tick applies what they ask."""
    st.subheader("Live settings")
    st.caption("These act from the next step, without a reset.")
    st.select_slider(
        FIELDS["lr"].label,
        options=session.lr_choices(ss.w_lr),
        key="w_lr",
        persist_state="session",
        format_func=lambda v: f"{v:g}",
        on_change=session.on_live,
        args=(player, "lr"),
        help=f"{FIELDS['lr'].help} (log scale, {session.LR_CHOICES[0]:g} to "
        f"{session.LR_CHOICES[-1]:g})",
    )
    st.button(
        f"×{session.JUMP_FACTOR} now",
        key="w_lr_jump",
        on_click=session.jump_lr,
        args=(player,),
        icon=":material/bolt:",
        disabled=ss.w_lr >= session.LR_CHOICES[-1],
        help=f"The learning rate times {session.JUMP_FACTOR} (at most "
        f"{session.LR_CHOICES[-1]:g}) in one change: 0.5 straight to 10",
    )
    st.caption(JUMP_NOTE)
    st.slider(
        FIELDS["momentum"].label,
        *FIELDS["momentum"].widget_bounds(),
        step=0.01,
        key="w_momentum",
        persist_state="session",
        on_change=session.on_live,
        args=(player, "momentum"),
        help="0 is plain SGD; 0.9 is the usual heavy-ball setting",
    )
    st.select_slider(
        FIELDS["bn_momentum"].label,
        options=session.bn_momentum_choices(ss.w_bn_momentum),
        key="w_bn_momentum",
        persist_state="session",
        format_func=session.format_rate,
        on_change=session.on_live,
        args=(player, "bn_momentum"),
        help="running = (1 - m) * running + m * batch statistic (PyTorch's convention)",
    )
    session.sync_url()


# --- sidebar: live settings first (they act at once), then the set-up (needs Reset) ------
with st.sidebar:
    live_settings()

    st.subheader("Set-up")
    st.caption(session.SETUP_RULE)
    presets = list(session.list_presets())
    st.selectbox(
        "Preset",
        presets,
        index=presets.index(ss.preset),
        key="w_preset",
        persist_state="session",
        format_func=session.preset_label,
        on_change=session.on_preset,
    )
    changed = session.custom_changes()
    if changed:
        st.caption(
            f"**Custom (from {session.preset_label(ss.preset)})**: " + "; ".join(changed) + "."
        )
    else:
        st.caption(session.list_presets()[ss.preset]["description"])
    setup_form.draw()

    st.subheader("Share and save")
    st.caption("The address bar is a link to this set-up: copy it to share it with a class.")
    st.download_button(
        "Download config JSON",
        ss.trainer.config.replace(**ss.trainer.live).to_json(),
        file_name=config_filename(ss.trainer),
        mime="application/json",
        icon=":material/download:",
        help="The running set-up with the live settings as they are now; load it to rerun",
    )
    st.file_uploader(
        "Load a config JSON",
        type=["json"],
        key="w_upload",
        on_change=lambda: (
            ss.w_upload
            and player.wish(
                restart=functools.partial(session.load_uploaded_config, ss.w_upload.getvalue())
            )
        ),
        help="Starts a fresh run with the uploaded set-up; a bad file leaves this run untouched",
    )

# --- main area ---------------------------------------------------------------------------
# Laid out for a projector (1280 x 720): the title shares its row with the buttons, the
# view's controls take one row, and the loss chart and the chosen view's chart stand side
# by side, so both show without scrolling. On a narrow screen Streamlit stacks the columns.
heading, buttons = st.columns(2, vertical_alignment="bottom")
heading.title(
    "Live training",
    help="One net, from the same weights and on the same batches, with and without Batch "
    "Normalization. Press Play, then move the learning rate.",
)
session.show_message()

wanted, differs, problem = session.pending_changes()
notice = st.empty()  # always drawn, so the live panel below never changes its place
if problem:
    notice.error(f"The set-up in the sidebar is not valid: {problem}")
elif differs:
    notice.warning(
        "Set-up changed ("
        + ", ".join(f"{session.FIELD_LABELS.get(f, f)} ({f})" for f in differs)
        + "). Press **Reset** to start a run with it; "
        "the current run continues until then."
    )

# A row of their own that does not stack on a phone, as columns would.
buttons = buttons.container(horizontal=True, gap="small")
player.play_button(buttons)
player.step_button(buttons)
player.reset_button(buttons, session.reset, primary=bool(differs), disabled=problem is not None)


LAYER_VIEWS = ("Fig. 1 percentiles", "Distributions")  # the views of one layer


def draw_panel() -> None:
    """The status line, the view's controls, and the loss and view charts side by side."""
    trainer: Trainer = ss.trainer
    history = trainer.history
    player.status(trainer.status_line(None if player.playing else player.state))
    layers = history.layers() or trainer.model.layer_names
    if ss.get("w_layer") not in layers:
        ss.w_layer = layers[-1]
    # One row, labels hidden (screen readers still get them): each line costs chart room.
    # Columns: on a phone they stack, and the view's options get the whole width.
    view_column, layer_column = st.columns([5, 2], gap="small", vertical_alignment="center")
    view = view_column.segmented_control(
        "View",
        list(session.LIVE_VIEWS),
        key="w_view",
        persist_state="session",
        required=True,
        label_visibility="collapsed",
    )
    layer, pooled = ss.w_layer, False
    layer_row = layer_column.container(horizontal=True, vertical_alignment="center", gap="small")
    if view in LAYER_VIEWS:
        layer = layer_row.selectbox(
            "Layer",
            layers,
            key="w_layer",
            persist_state="session",
            label_visibility="collapsed",
            width=100,
        )
    if view == "Fig. 1 percentiles":
        pooled = layer_row.toggle(
            "Pooled",
            key="w_fig1_pooled",
            persist_state="session",
            width="content",
            help=f"All units of the layer pooled. The paper follows one sigmoid (here unit "
            f"#{trainer.config.probe_unit}); the units' different means widen a pooled band",
        )
    left, right = st.columns(2, gap="medium")
    with left:
        show_chart(figures.loss_accuracy(history), "loss_accuracy", trainer)
    with right:
        draw_view(trainer, view, layer, pooled)
    show_claims(
        ss.run_claims,
        history,
        finished=trainer.finished,
        title="What this run shows (the preset's claims, checked)",
    )
    session.sync_url()  # the view and layer are in the link too


def draw_view(trainer: Trainer, view: str, layer: str, pooled: bool) -> None:
    """The chosen view's chart (and the histogram's step controls)."""
    history = trainer.history
    if view == "Fig. 1 percentiles":
        fig = figures.percentile_bands(history, layer=layer, unit=not pooled)
        show_chart(fig, "percentile_bands", trainer)
    elif view == "Distributions":
        show_chart(figures.preact_heatmaps(history), "preact_heatmaps", trainer)
        c1, c2 = st.columns([1, 2])
        follow = c1.toggle("Latest step", value=True, key="w_hist_follow", persist_state="session")
        # A fixed range keeps the scrubber still while the run grows under it.
        step = c2.slider(
            "Step",
            0,
            trainer.config.steps,
            key="w_hist_step",
            persist_state="session",
            disabled=follow,
        )
        if follow:
            step = history.last_step() or 0
        fig = figures.histogram_overlay(history, layer=layer, step=step)
        show_chart(fig, "histogram_overlay", trainer)
    elif view == "Saturation":
        cfg = trainer.config
        fig = figures.saturation(
            history, threshold=cfg.saturation_threshold, activation=cfg.activation
        )
        show_chart(fig, "saturation", trainer)
    elif view == "Gradient norms":
        show_chart(figures.grad_norms(history), "grad_norms", trainer)
    elif view == "Update ratio":
        show_chart(figures.update_ratio(history), "update_ratio", trainer)


player.panel(draw_panel)
export_panel(ss.trainer)
