"""Models: the registry of models the Playground, evaluations and judges can run on — GGUF files loaded in this
process and OpenAI-compatible servers: register one (checked before it is saved), remove one."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import models
from core.config import CHAT_FORMATS, key_env_patterns
from pages import glue, widgets

GGUF, SERVER = "GGUF file (in-process model)", "OpenAI-compatible server"


def registry_table(registry: list[models.Model]) -> None:
    """Every registered model."""
    st.dataframe(pd.DataFrame([{
        "name": m.name, "default": m.is_default, "backend": m.backend, "GGUF path or server": m.location,
        "chat format": m.chat_format, "context": m.n_ctx, "SHA-256": m.sha256 or "",
        "API key variable": m.api_key_env or "", "registered": m.created_at} for m in registry]),
        hide_index=True, key="models.table")


def register_form() -> None:
    """Register a GGUF file or a server; the model is checked before it is saved."""
    st.subheader("Register a model")
    with st.form("models.form", clear_on_submit=False):
        name = st.text_input("Name", key="models.name")
        kind = st.radio("Kind", [GGUF, SERVER], key="models.kind", horizontal=True)
        path = st.text_input("GGUF path", key="models.path", placeholder="mistral-7b-instruct.Q4_K_M.gguf",
                             help=f"a file in the models directory, `{settings.models_dir}`: its name, or a path "
                                  f"inside that directory")
        base_url = st.text_input("Base URL", key="models.base_url", placeholder="http://host:8000/v1",
                                 help="http:// or https://, without a user name or password; link-local and cloud "
                                      "metadata addresses are refused")
        remote = st.text_input("Model name on the server", key="models.remote_model")
        allowed = (", ".join(f"`{p}`" for p in key_env_patterns(settings))
                   or "none (`PROMPTDEV_MODEL_KEY_ENV_ALLOW` is empty)")
        key_env = st.text_input("API key environment variable (its name, never the key)", key="models.api_key_env",
                                placeholder="PROMPTDEV_KEY_MYSERVER", help=f"variables the administrator allows: "
                                                                          f"{allowed}")
        left, right = st.columns(2)
        chat_format = left.selectbox("Chat format", CHAT_FORMATS, key="models.chat_format")
        n_ctx = right.number_input("Context size", 128, 1_048_576, value=4096, step=512, key="models.n_ctx")
        if st.form_submit_button("Register"):
            gguf = kind == GGUF
            with glue.reported():
                with st.spinner("Checking the model…"):
                    added = models.register_model(
                        pool, name, backend=models.IN_PROCESS if gguf else models.SERVER,
                        path=path.strip() if gguf else None, base_url=None if gguf else base_url.strip(),
                        remote_model=None if gguf else remote.strip(), api_key_env=None if gguf else key_env.strip(),
                        chat_format=chat_format, n_ctx=int(n_ctx), settings=settings)
                widgets.flash("success", widgets.md("Registered {} ({})", added.name, added.backend))
                st.rerun()


def remove_form(registry: list[models.Model]) -> None:
    """Remove a model that is not the default."""
    removable = [m.name for m in registry if not m.is_default]
    if not removable:
        return
    st.subheader("Remove a model")
    left, right = st.columns([3, 1])
    gone = left.selectbox("Model", removable, key="models.remove_name", label_visibility="collapsed")
    if right.button("Remove", key="models.remove"):
        with glue.reported():
            models.delete_model(pool, gone)
            widgets.flash("success", widgets.md("Removed {}", gone))
            st.rerun()


st.title("Models")
settings = glue.settings()
pool = glue.pool()
widgets.carry_over()

registry = glue.model_registry(pool, settings)
if registry:
    registry_table(registry)
register_form()
remove_form(registry)
