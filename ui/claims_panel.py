"""The claims beside a chart: each sentence with its measured numbers and a tick or cross."""

from __future__ import annotations

import streamlit as st

from bn_core.claims import ClaimBook
from bn_core.history import History

_MARK = {True: ":green[**✓**]", False: ":red[**✗**]", None: ":gray[**…**]"}


def show_claims(
    book: ClaimBook, history: History, *, finished: bool, title: str = "What this run shows"
) -> None:
    """Check the book's claims on ``history`` now and list them; nothing when there are none.
    ``finished``: the run has ended, so a claim about its last step can be settled."""
    if not book:
        return
    results = book.results(history, final=finished)
    held = sum(r.holds is True for r in results)
    failed = sum(r.holds is False for r in results)
    with st.container(border=True):
        st.markdown(
            f"**{title}** · {held} of {len(results)} hold"
            + (f", {failed} contradicted by this run" if failed else "")
        )
        for r in results:
            detail = r.measured_text() or "not measured yet"
            note = f"; {r.reason}" if r.reason else ""
            st.markdown(
                f"{_MARK[r.holds]} {r.sentence}  \n"
                f":gray[measured: {detail} · holds when {r.claim.threshold}{note}]"
            )
