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
    rows = [(r.holds, r.sentence, r.measured_text(), r.claim.threshold, r.reason) for r in results]
    show_checked(title, "run", rows)


def show_checked(
    title: str, subject: str, rows: list[tuple[bool | None, str, str, str, str]]
) -> None:
    """Checked sentences in one bordered panel under a tally, each with a tick, a cross or
    "…" (not settled yet). A row is (holds, sentence, measured, threshold, reason);
    ``subject`` names what contradicts them ("run", "study")."""
    held = sum(holds is True for holds, *_ in rows)
    failed = sum(holds is False for holds, *_ in rows)
    with st.container(border=True):
        st.markdown(
            f"**{title}** · {held} of {len(rows)} hold"
            + (f", {failed} contradicted by this {subject}" if failed else "")
        )
        for holds, sentence, measured, threshold, reason in rows:
            note = f"; {reason}" if reason else ""
            st.markdown(
                f"{_MARK[holds]} {sentence}  \n"
                f":gray[measured: {measured or 'not measured yet'} · holds when {threshold}{note}]"
            )
