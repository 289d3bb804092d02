"""Analytics page (being built: see issue 7)."""

import streamlit as st

st.title("Analytics")
st.info("This page is being built (issue 7).")
