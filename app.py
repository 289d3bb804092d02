"""PromptDev: the Streamlit entry point. It only builds the navigation; each page lives in pages/.

An error no page caught ends up here: an expected one is shown as one line, anything else as Streamlit's error box
with its traceback, logged with it (pages/glue.py).
"""

import streamlit as st

from pages import glue

st.set_page_config(page_title="PromptDev", page_icon=":material/science:", layout="wide")

PAGES = {
    "": [st.Page("pages/home.py", title="Home", icon=":material/home:", default=True)],
    "Build": [
        st.Page("pages/templates.py", title="Templates", icon=":material/description:"),
        st.Page("pages/playground.py", title="Playground", icon=":material/science:"),
        st.Page("pages/ledger.py", title="Ledger", icon=":material/receipt_long:"),
        st.Page("pages/models.py", title="Models", icon=":material/memory:"),
    ],
    "Operate": [
        st.Page("pages/chat.py", title="Chat", icon=":material/chat:"),
        st.Page("pages/monitor.py", title="Monitor", icon=":material/monitor_heart:"),
    ],
    "Evaluate": [
        st.Page("pages/datasets.py", title="Datasets", icon=":material/dataset:"),
        st.Page("pages/evaluations.py", title="Evaluations", icon=":material/balance:"),
        st.Page("pages/analytics.py", title="Analytics", icon=":material/insights:"),
    ],
}

glue.sidebar_user()
glue.start_worker()
glue.start_metrics()
with glue.reported():
    st.navigation(PAGES).run()
