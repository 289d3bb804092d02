"""PromptDev: the entry point, in two roles.

Served (`make run`, which runs `promptdev serve`, or `streamlit run app.py`): Streamlit imports this file as the
module `app` and serves `app`, an `st.App` (Streamlit's ASGI app) with core/web.py in front of Streamlit: the sign-in
routes and the middleware that refuses every request without a session, on the same port. Each browser session of
that server runs this same file as its script, as `__main__`.

As a session's script (and under AppTest): who is signed in comes from the session cookie (pages/glue.py); then the
navigation runs the page, each of which lives in pages/. An error no page caught ends up here: an expected one is
shown as one line, anything else as Streamlit's error box with its traceback, logged with it (pages/glue.py).
"""

import streamlit as st

if __name__ != "__main__":  # imported by the server: the ASGI app, whose sessions run this file as their script
    import sys
    from pathlib import Path

    from streamlit import config as streamlit_config

    from core import web
    from core.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"promptdev: configuration error: {exc}")
    app = st.App(Path(__file__).resolve(), **web.app_options(
        settings, server_port=lambda: streamlit_config.get_option("server.port"),
        server_address=lambda: streamlit_config.get_option("server.address") or ""))

else:
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
        "Account": [st.Page("pages/users.py", title="Users", icon=":material/group:")],
    }

    user = glue.signed_in_user()
    if user is None:  # the session ended while the tab was open (the server lets no one in without one)
        st.navigation([st.Page(glue.signed_out, title="Signed out")], position="hidden").run()
        st.stop()
    glue.sidebar_user(user)
    glue.start_worker()
    glue.start_metrics()
    with glue.reported():
        st.navigation(PAGES).run()
