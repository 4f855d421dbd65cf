"""BatchNorm Lab: the Streamlit entry point, a router with a shared look and sidebar."""

import os
from pathlib import Path

import streamlit as st
import torch

st.set_page_config(page_title="BatchNorm Lab", page_icon=":material/insights:", layout="wide")


@st.cache_resource
def _set_threads() -> int:
    """Set torch's CPU threads once per server process.

    The nets are small, so one thread per step is close to the fastest and leaves the other
    cores to other sessions. BN_LAB_THREADS overrides it (e.g. 4 on a workstation).
    """
    threads = int(os.environ.get("BN_LAB_THREADS", "1"))
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


_set_threads()

pages = [
    st.Page(
        "pages/live_training.py", title="Live training", icon=":material/play_circle:", default=True
    ),
    st.Page("pages/bias_blowup.py", title="Bias blow-up", icon=":material/trending_up:"),
    st.Page("pages/inside_batchnorm.py", title="Inside a BatchNorm layer", icon=":material/tune:"),
    st.Page("pages/ics_question.py", title="Does BN reduce ICS?", icon=":material/help:"),
    st.Page("pages/lr_sweep.py", title="Learning-rate sweep", icon=":material/speed:"),
    st.Page("pages/small_batches.py", title="Small batches and inference", icon=":material/apps:"),
]
page = st.navigation(pages)
# Focus rings, no fading of live charts while a fragment reruns, screen-reader text: a style
# sheet alone, which Streamlit adds to the page without taking any room.
st.html(Path(__file__).with_name("static") / "look.css")
with st.sidebar:
    st.markdown("### :material/insights: BatchNorm Lab")
    st.caption("See internal covariate shift and Batch Normalization at work.")
page.run()
