"""Evaluations page (being built: see issue 6)."""

import streamlit as st

st.title("Evaluations")
st.info("This page is being built (issue 6).")
