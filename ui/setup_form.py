"""The live page's set-up widgets, drawn from the field table (bn_core.config.FIELDS).

A widget's label, range, help and kind come from its FieldSpec; this module adds only the
layout and when a widget does not apply. Each widget keeps its value in
``st.session_state["w_<field>"]``, where ui/session.py fills and reads it.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from bn_core.config import FIELDS
from bn_core.data import DATASETS
from ui import session

TOY_DATASETS = ("moons", "circles", "spirals", "blobs")
# Rows of the sidebar: one field takes the whole width, two share it in columns. A field in
# session.SETUP_FIELDS that no row names is drawn full width after these rows.
ROWS: tuple[tuple[str, ...], ...] = (
    ("dataset",),
    ("noise",),
    ("model", "activation"),
    ("depth", "width"),
    ("init", "init_std"),
    ("placement", "batch_size"),
    ("groups", "residual"),
    ("seed", "device"),
)
LAST = ("keep_bias",)  # below the columns, however many fields join the form


def _inapplicable(ss: Any) -> set[str]:
    """The fields whose widget is drawn disabled, given what the other widgets say."""
    off = set()
    if ss.w_dataset not in TOY_DATASETS:
        off.add("noise")
    if ss.w_model != "mlp":
        off |= {"depth", "width", "residual"}
    if ss.w_init != "gaussian":
        off.add("init_std")
    if "groupnorm" not in ss.w_variants:
        off.add("groups")
    return off


def field_widget(where: Any, name: str, *, disabled: bool = False) -> Any:
    """Draw the widget of one field in ``where`` (the sidebar or a column of it)."""
    spec = FIELDS[name]
    common = {
        "key": f"w_{name}",
        "persist_state": "session",
        "help": spec.help,
        "disabled": disabled,
    }
    label = spec.label or name
    kind = spec.widget_kind()
    if kind == "checkbox":
        return where.checkbox(label, **common)
    if kind == "selectbox":
        return where.selectbox(label, list(spec.choices), format_func=spec.display or str, **common)
    low, high = spec.widget_bounds()
    if kind == "slider":
        return where.slider(label, low, high, step=spec.step, **common)
    return where.number_input(label, low, high, step=spec.step, format=spec.format, **common)


def draw() -> None:
    """The Variants pick, then every set-up field's widget, in the sidebar's layout."""
    ss = st.session_state
    st.multiselect(
        session.VARIANTS_LABEL,
        session.variant_options(),
        key="w_variants",
        persist_state="session",
        help="; ".join(f"{k}: {v}" for k, v in session.VARIANT_HELP.items()),
    )
    # Widgets that do not apply are disabled, not hidden: Streamlit forgets the value of
    # a widget that is not drawn, and switching back must find it again.
    off = _inapplicable(ss)
    fields = [name for name in session.SETUP_FIELDS if name != "variants"]
    placed = {name for row in (*ROWS, LAST) for name in row}
    rows = [*ROWS, *((name,) for name in fields if name not in placed), LAST]
    columns = None  # consecutive pairs share one block of two columns, as one form
    for row in rows:
        drawn = [name for name in row if name in fields]
        if len(drawn) == 2:
            columns = columns or st.columns(2)
            for column, name in zip(columns, drawn, strict=True):
                field_widget(column, name, disabled=name in off)
            continue
        columns = None
        for name in drawn:
            field_widget(st, name, disabled=name in off)
            if name == "dataset":
                st.caption(DATASETS[ss.w_dataset])
