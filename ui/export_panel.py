"""The export panel: a page's charts as print-ready files, its data, and a teaching pack."""

from __future__ import annotations

import streamlit as st

from bn_core import export
from bn_core.claims import ClaimBook
from bn_core.train import Trainer

_MIME = {
    "png": "image/png",
    "svg": "image/svg+xml",
    "pdf": "application/pdf",
    "html": "text/html",
    "csv": "text/csv",
    "zip": "application/zip",
}


def config_filename(trainer: Trainer) -> str:
    """The config JSON download's name, in the scheme of every exported file."""
    return export.figure_filename(
        export.PAGE, "config", trainer.variant_names, trainer.step, "json"
    )


def _prepare_chart(trainer: Trainer, key: str) -> None:
    """Render one chart in every format from the run as it is now (one browser session)."""
    specs = export.figure_specs(trainer.history, trainer.config)
    spec = next(s for s in specs if s.key == key)
    with st.spinner(f"Rendering {spec.title} as PNG, SVG, PDF, HTML and CSV..."):
        files = export.chart_files(spec)
    st.session_state.export_chart = (key, spec.filename, files)


def _prepare_pack(trainer: Trainer) -> None:
    bar = st.progress(0.0, text="Building the teaching pack...")

    def progress(done: int, total: int, label: str) -> None:
        bar.progress(done / max(total, 1), text=f"Teaching pack: {label} ({done}/{total})")

    book = st.session_state.get("run_claims") or ClaimBook([])
    claims = book.results(trainer.history, final=trainer.finished)
    data = export.teaching_pack(trainer.history, trainer.config, progress=progress, claims=claims)
    bar.empty()
    name = export.figure_filename(export.PAGE, "teaching-pack", trainer.variant_names, trainer.step)
    st.session_state.export_pack = (name, data)


def export_panel(trainer: Trainer) -> None:
    """Per chart: PNG, SVG, PDF (server-side, print theme), offline HTML and CSV; plus the
    config and a zip of everything. Files are made on request from the run as it is then."""
    ss = st.session_state
    with st.expander("Export figures and data", icon=":material/ios_share:"):
        available, why = export.static_export_available()
        if not available:
            st.info(f"{why} HTML, CSV and the config still export.")
        st.caption(
            "Files use the print theme (white background, large type, thick lines) and "
            "capture the run at the moment you press a button; pause first for a fixed step."
        )
        keys = {s: export.SPEC_TITLES[s] for s in export.SPEC_TITLES}
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        key = c1.selectbox(
            "Chart", list(keys), format_func=keys.get, key="w_export_chart", persist_state="session"
        )
        if c2.button("Prepare files", icon=":material/image:", width="stretch"):
            _prepare_chart(trainer, key)
        prepared = ss.get("export_chart")
        if prepared and prepared[0] == key:
            _, filename, files = prepared
            cols = st.columns(len(files))
            for col, (ext, data) in zip(cols, files.items(), strict=True):
                col.download_button(
                    ext.upper(),
                    data,
                    file_name=f"{filename}.{ext}",
                    mime=_MIME[ext],
                    key=f"dl_chart_{ext}",
                    width="stretch",
                )
        st.divider()
        c1, c2 = st.columns(2)
        if c1.button(
            "Build teaching pack (zip)",
            icon=":material/folder_zip:",
            help="Every chart in every format, metrics.csv, config.json and a README.txt",
        ):
            _prepare_pack(trainer)
        if ss.get("export_pack"):
            name, data = ss.export_pack
            c2.download_button(
                f"Download {name}.zip ({len(data) / 1e6:.1f} MB)",
                data,
                file_name=f"{name}.zip",
                mime=_MIME["zip"],
                key="dl_pack",
                icon=":material/download:",
            )


def _shown_run(entry: tuple) -> tuple[tuple[str, ...], int | None]:
    """The variants and step recorded with a shown chart (none for a chart without a run)."""
    return (entry[2], entry[3]) if len(entry) >= 4 else ((), None)


def page_export_panel(page: str) -> None:
    """Export for a page without a run History: the charts it shows now, as files."""
    ss = st.session_state
    shown = ss.get("shown_figures", {}).get(page, {})
    if not shown:
        return
    with st.expander("Export figures and data", icon=":material/ios_share:"):
        available, why = export.static_export_available()
        if not available:
            st.info(f"{why} HTML and CSV still export.")
        st.caption("The charts as this page shows them now, in the print theme.")
        titles = {key: export.chart_title(key, entry[0]) for key, entry in shown.items()}
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        key = c1.selectbox(
            "Chart",
            list(shown),
            format_func=titles.get,
            key=f"w_export_{page}",
            persist_state="session",
        )
        if c2.button("Prepare files", icon=":material/image:", key=f"prep_{page}"):
            fig, caption = shown[key][:2]
            spec = export.spec_from_figure(page, key, fig, caption, *_shown_run(shown[key]))
            with st.spinner(f"Rendering {spec.title}..."):
                ss[f"export_{page}"] = (key, spec.filename, export.chart_files(spec))
        prepared = ss.get(f"export_{page}")
        if prepared and prepared[0] == key:
            _, filename, files = prepared
            for col, (ext, data) in zip(st.columns(len(files)), files.items(), strict=True):
                col.download_button(
                    ext.upper(),
                    data,
                    file_name=f"{filename}.{ext}",
                    mime=_MIME[ext],
                    key=f"dl_{page}_{ext}",
                    width="stretch",
                )
        st.divider()
        if st.button("Build a zip of every chart on this page", key=f"zip_{page}"):
            specs = [
                export.spec_from_figure(page, k, entry[0], entry[1], *_shown_run(entry))
                for k, entry in shown.items()
            ]
            # Named by every variant the charts show and the latest step among them.
            runs = [_shown_run(entry) for entry in shown.values()]
            variants = list(dict.fromkeys(v for names, _ in runs for v in names))
            step = max((s for _, s in runs if s is not None), default=None)
            name = export.figure_filename(page, "all-charts", variants, step)
            with st.spinner(f"Rendering {len(specs)} charts in every format..."):
                ss[f"export_zip_{page}"] = (name, export.page_pack(specs))
        if ss.get(f"export_zip_{page}"):
            name, data = ss[f"export_zip_{page}"]
            st.download_button(
                f"Download {name}.zip ({len(data) / 1e6:.1f} MB)",
                data,
                file_name=f"{name}.zip",
                mime=_MIME["zip"],
                key=f"dl_zip_{page}",
                icon=":material/download:",
            )
