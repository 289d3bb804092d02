"""Playground page (being built: see issue 4)."""

import streamlit as st

st.title("Playground")
st.info("This page is being built (issue 4).")
