"""PromptDev: the Streamlit entry point. It only builds the navigation; each page lives in pages/."""

import streamlit as st

from pages import glue

st.set_page_config(page_title="PromptDev", page_icon="🧪", layout="wide")

PAGES = {
    "": [st.Page("pages/home.py", title="Home", icon="🏠", default=True)],
    "Build": [
        st.Page("pages/templates.py", title="Templates", icon="📝"),
        st.Page("pages/playground.py", title="Playground", icon="🛝"),
    ],
    "Operate": [
        st.Page("pages/chat.py", title="Chat", icon="💬"),
        st.Page("pages/monitor.py", title="Monitor", icon="🛰️"),
    ],
    "Evaluate": [
        st.Page("pages/datasets.py", title="Datasets", icon="🗂️"),
        st.Page("pages/evaluations.py", title="Evaluations", icon="⚖️"),
        st.Page("pages/analytics.py", title="Analytics", icon="📈"),
    ],
}

glue.sidebar_user()
glue.start_worker()
st.navigation(PAGES).run()
