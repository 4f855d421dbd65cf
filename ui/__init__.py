"""Streamlit-side helpers shared by the pages; with pages/, the only code importing streamlit."""
