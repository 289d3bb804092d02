"""Monitor page (being built: see issue 5)."""

import streamlit as st

st.title("Monitor")
st.info("This page is being built (issue 5).")
