"""Small batches and inference: BN against LayerNorm and GroupNorm at batch sizes 1 to 60."""

import logging

import pandas as pd
import streamlit as st

from bn_core.claims import ClaimBook, load_claims
from bn_core.config import ConfigError, load_preset
from bn_core.data import DatasetUnavailable
from bn_core.experiments import charts
from bn_core.experiments.small_batch import (
    BATCH_SIZES,
    DEFAULT_STEPS,
    MAX_STEPS,
    MIN_STEPS,
    PRESET,
    SmallBatchStudy,
    StudyCheck,
    StudyResult,
    check_steps,
    study_checks,
)
from bn_core.telemetry import STATS_EXAMPLES
from ui import load
from ui.charts import show_chart
from ui.claims_panel import show_checked, show_claims
from ui.export_panel import page_export_panel
from ui.routing import through_app

through_app()  # a first request for this page's URL, on a fresh server

PAGE = "small-batches"
TICK_SECONDS = 0.5
TRAIN_SECONDS = 0.4

_LOG = logging.getLogger(__name__)
ss = st.session_state
ss.setdefault("sb_running", False)
base = load_preset(PRESET)

st.title("Small batches and inference")
st.caption(
    "BatchNorm trains with the statistics of each mini-batch and predicts with running "
    "averages of them. LayerNorm and GroupNorm normalize each example on its own. Here the "
    "same net trains with each of them at batch sizes from 60 down to 1, from the same "
    "initial weights, and every number is measured on your runs."
)
st.markdown(
    f"The **{PRESET}** net: {base.depth} × {base.width} {base.activation} MLP on "
    f"{base.dataset}, {base.optimizer.upper()} at learning rate {base.lr:g}, BN momentum "
    f"{base.bn_momentum:g}, GroupNorm in {base.groups} groups of "
    f"{base.width // base.groups} units. At each batch size "
    + ", ".join(str(b) for b in BATCH_SIZES)
    + " the plain net, batchnorm, layernorm and groupnorm train in lockstep on the same "
    "batches; then the plain net, layernorm and groupnorm train at batch 1."
)

c1, c2, c3, c4 = st.columns([1, 1, 1, 1], vertical_alignment="bottom")
# No bounds on the widgets: a value outside the range gets the study's own message.
c1.number_input(
    "Steps per batch size",
    value=DEFAULT_STEPS,
    step=100,
    key="sb_w_steps",
    persist_state="session",
    help=f"{MIN_STEPS} to {MAX_STEPS:,}. Every batch size trains this many steps, so a "
    "smaller batch sees fewer examples.",
)
c2.number_input(
    "Seed",
    value=base.seed,
    step=1,
    key="sb_w_seed",
    persist_state="session",
    help="Initial weights, data split and batch order; 0 to 2,147,483,647.",
)


def start() -> None:
    # A callback runs before the script: read the widgets' values from the session.
    try:
        steps = check_steps(ss.sb_w_steps)
        study = SmallBatchStudy(base.replace(seed=ss.sb_w_seed), steps=steps)
    except (ConfigError, DatasetUnavailable) as err:
        ss.sb_message = f"The study did not start; the last one is kept. {err}"
        return
    ss.sb_study = study
    ss.sb_claims = ClaimBook(load_claims(PRESET))
    ss.sb_running = True


def stop() -> None:
    ss.sb_running = False


c3.button(
    "Start study",
    on_click=start,
    type="primary",
    icon=":material/play_arrow:",
    width="stretch",
    disabled=ss.sb_running,
)
c4.button(
    "Stop",
    on_click=stop,
    icon=":material/stop:",
    width="stretch",
    disabled=not ss.sb_running,
)
message = st.empty()  # always drawn, so the live panel below never changes its place
if ss.get("sb_message"):
    message.error(ss.sb_message)
    ss.sb_message = None


def show_checks(checks: list[StudyCheck]) -> None:
    """The study's checked sentences, in the panel the preset claims use."""
    rows = [(c.holds, c.sentence, c.measured_text(), c.threshold, c.reason) for c in checks]
    show_checked("What this study shows across batch sizes", "study", rows)


def results_table(result: StudyResult) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "batch size": r.batch_size,
                "examples seen": r.examples,
                "BN, eval mode": r.accuracy["batchnorm"],
                "BN, train mode": r.bn_train_mode_accuracy,
                "LayerNorm": r.accuracy["layernorm"],
                "GroupNorm": r.accuracy["groupnorm"],
                "plain": r.accuracy["plain"],
                "BN mean error": r.running_mean_error,
                "BN var error": r.running_var_error,
                "BN var error, relative": r.relative_var_error,
                # A diverged variant's accuracy is its last one before it diverged.
                "diverged": ", ".join(f"{v} at step {s:,}" for v, s in r.diverged.items()) or "–",
            }
            for r in result.rows
        ]
    )


def batch_one_section(result: StudyResult) -> None:
    one = result.batch_one
    st.subheader("What happens at batch 1")
    st.markdown("The study asks for the BN net at batch 1. The run's configuration refuses it:")
    st.code(one.config_refusal, language=None, wrap_lines=True)
    st.markdown("and so does the BN layer itself, in the study's BN net in training mode:")
    st.code(one.layer_refusal, language=None, wrap_lines=True)
    st.markdown(
        f"LayerNorm and GroupNorm normalize each example by itself, so they train at batch 1: "
        f"{one.steps:,} steps of one example each, {one.steps:,} examples in all, beside the "
        f"plain net. Test accuracy on the {result.test_examples} test images at the last step:"
    )
    row = st.container(horizontal=True, gap="medium")
    for variant in ("layernorm", "groupnorm", "plain"):
        value = "training…" if one.accuracy is None else f"{one.accuracy[variant]:.1%}"
        row.metric(f"{variant}, batch 1", value, width=200)


@st.fragment(run_every=TICK_SECONDS if ss.sb_running else None)
def study_panel() -> None:
    study: SmallBatchStudy | None = ss.get("sb_study")
    if study is None:
        st.info(
            f"Choose the steps and a seed and press **Start study**. At {DEFAULT_STEPS:,} "
            f"steps per batch size the six runs train {DEFAULT_STEPS * 6:,} lockstep steps; "
            "the bar shows how far they are."
        )
        return
    try:
        if ss.sb_running:
            study.advance(load.training_seconds(TRAIN_SECONDS))
            if study.finished:
                ss.sb_running = False
                st.rerun()
        result = study.result()
    except Exception as err:  # said on the page and logged, never only in the log
        _LOG.error("small-batch study failed", exc_info=err)
        ss.sb_running = False
        st.error(
            f"The study stopped: a step failed ({type(err).__name__}: {err}). The numbers "
            "so far are kept; press Start study to run it again."
        )
        return
    if result.finished:
        state = "finished"
    elif ss.sb_running:
        state = f"running, batch {result.training} training"
    else:
        state = f"stopped at batch {result.training}"
    sizes = ", ".join(str(b) for b in result.batch_sizes)
    st.progress(
        study.progress,
        text=f"Study {state}: {result.steps_done:,} of {result.steps_total:,} steps "
        f"(batch sizes {sizes} and 1, {result.steps:,} steps each)",
    )
    show_chart(charts.small_batch_chart(result), "small_batch", page=PAGE)
    st.dataframe(
        results_table(result),
        hide_index=True,
        column_config={
            "examples seen": st.column_config.NumberColumn(format="localized"),
            **{
                name: st.column_config.NumberColumn(format="percent")
                for name in ("BN, eval mode", "BN, train mode", "LayerNorm", "GroupNorm", "plain")
            },
            **{
                name: st.column_config.NumberColumn(format="%.3g")
                for name in ("BN mean error", "BN var error", "BN var error, relative")
            },
        },
    )
    st.caption(
        f"The table is the chart's data. Each row is {result.steps:,} steps of its batch "
        f"size, so it has seen steps × batch size examples: {BATCH_SIZES[0] * result.steps:,} "
        f"at batch {BATCH_SIZES[0]}, {BATCH_SIZES[-1] * result.steps:,} at batch "
        f"{BATCH_SIZES[-1]}. LayerNorm, GroupNorm and the plain net in a row saw exactly BN's "
        f"batches. Accuracy is on the {result.test_examples} test images at the last step; "
        "BN's train mode predicts them in shuffled batches of the row's size. BN mean and var "
        "error: how far its running statistics are off, the mean over BN's layers and channels "
        f"of |running statistic − the statistic over {STATS_EXAMPLES:,} training examples|; "
        "relative: divided by the layer's mean running variance. Rows appear as their batch "
        "size finishes."
    )
    show_checks(study_checks(result))
    # The study's run at the preset's batch size has the preset's net, data, seed, batches
    # and evaluation cadence (its probes are sparser and it may be shorter), so the
    # preset's claims, which read evaluations, are read off it.
    trainer = study.trainer(base.batch_size)
    show_claims(
        ss.sb_claims,
        trainer.history,
        finished=trainer.finished,
        title=f"What the {PRESET} preset's run shows (the study's batch-{base.batch_size} run)",
    )
    batch_one_section(result)


# In a container of its own: the panel's element count changes between its reruns, and
# the elements after it must not move (or a stale copy of them lingers on screen).
with st.container():
    study_panel()

st.subheader("Why the batch size matters to BN and not to the others")
st.markdown(
    "In training, BN normalizes each unit with the mean and variance of the mini-batch in "
    "hand; in eval mode it uses running averages of them (running = (1 − m)·running + "
    f"m·batch, m = {base.bn_momentum:g} here). A batch of B examples has a mean that strays "
    "from the population's by about σ/√B, so at a small B the net learns on normalizations "
    "that change from batch to batch, and each example's output depends on the others in "
    "its batch: at B = 2 a unit's two normalized values are about −1 and +1, whatever the "
    "inputs. Eval mode then hands the net running averages, steadier statistics than any "
    "batch it trained on. Ioffe (2017) describes this difference between the statistics of "
    "training and of inference, which his Batch Renormalization corrects. LayerNorm and "
    "GroupNorm normalize each example over its own units, so a prediction does not depend "
    "on the batch, training and inference compute the same function, and they can train "
    "on one example at a time. "
    "Wu & He (2018) report a ResNet-50 on ImageNet whose error with BN rises from 23.6% at "
    "32 images per GPU to 34.7% at 2, while with GroupNorm it stays near 24%."
)
page_export_panel(PAGE)
