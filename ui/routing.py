"""Every page runs inside app.py's navigation, including on a server's first request."""

from __future__ import annotations

import runpy
from pathlib import Path

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

APP = Path(__file__).resolve().parent.parent / "app.py"


def through_app() -> None:
    """Run this request through app.py when Streamlit ran the page's file on its own.

    A Streamlit server with a ``pages/`` folder treats it the old way (every file a page,
    named after the file, with no entry point around it) until a script run calls
    ``st.navigation``, which app.py does. So on a freshly started server, a first visit
    straight to a page's URL, a bookmark or a shared link, runs that file alone: without
    app.py's page settings, style sheet, thread setting and named navigation. Here app.py
    runs instead, in this same script run: its ``st.navigation`` ends the old scheme and
    runs the page the URL names (this file again, now inside the app), then this lone run
    stops. Being one run, it keeps the widget events it came with, a button's click too.
    ``PagesManager.uses_pages_directory`` is that scheme's switch in the pinned Streamlit;
    a browser test catches a change to it.
    """
    if PagesManager.uses_pages_directory:
        runpy.run_path(str(APP))
        st.stop()
