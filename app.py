"""BatchNorm Lab: the Streamlit entry point (placeholder until the live page lands)."""

import streamlit as st

st.set_page_config(page_title="BatchNorm Lab", page_icon="📊", layout="wide")
st.title("BatchNorm Lab")
st.write("Live side-by-side training with and without Batch Normalization is coming here.")
