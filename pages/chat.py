"""Chat page (being built: see issue 5)."""

import streamlit as st

st.title("Chat")
st.info("This page is being built (issue 5).")
