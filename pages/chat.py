"""Chat: an end user identifies with a user id and talks to the companion on the template an operator assigned.

History is loaded from the database, so it survives reloads (the user id is kept in the address, `?user=…`, so a
browser reload comes back to the same conversation); replies stream in. Operator injections are for the AI and are
not shown here; a halted conversation answers with a "paused" notice.
"""

from __future__ import annotations

import streamlit as st

from core import conversations
from pages import glue
from pages.widgets import md, safe_md, write_stream_text

# Widget / session-state keys.
KEY_USER_ID = "chat.user_id"
KEY_INPUT = "chat.input"
QUERY_USER = "user"  # the address keeps the user id: a reload returns to the same conversation
HISTORY_SHOWN = 200

st.title("Chat")

settings = glue.settings()
pool = glue.pool()

if KEY_USER_ID not in st.session_state and st.query_params.get(QUERY_USER):
    st.session_state[KEY_USER_ID] = st.query_params[QUERY_USER]
user_id = st.text_input("Your user id", key=KEY_USER_ID, placeholder="e.g. alice",
                        help="Identifies you: your conversation and memory are kept under this id.")
if not user_id.strip():
    st.query_params.pop(QUERY_USER, None)
    st.info("Enter a user id to start chatting.")
    st.stop()
with glue.reported(stop=True):
    user_id = conversations.check_user_id(user_id)
if st.query_params.get(QUERY_USER) != user_id:
    st.query_params[QUERY_USER] = user_id

AVATARS = {"user": "user", "assistant": "assistant"}
NOTICE_KINDS = {"paused": "⏸️", "blocked": "🛡️", "error": "⚠️"}


def show_message(message: conversations.Message) -> None:
    """One stored message as a chat bubble."""
    with st.chat_message(AVATARS.get(message.role, "assistant")):
        if message.kind in NOTICE_KINDS:
            st.markdown(f"{NOTICE_KINDS[message.kind]} {safe_md(message.content)}")
        elif message.content:
            st.markdown(safe_md(message.content))
        if message.status == "cancelled":
            st.caption("(stopped)")


with glue.reported():
    history = conversations.list_messages(pool, user_id, limit=HISTORY_SHOWN, visible_to_user=True)
    if not history:
        st.caption(md("Hi {} — say something to start a conversation.", user_id))
    elif len(history) == HISTORY_SHOWN:
        st.caption(f"Showing the latest {HISTORY_SHOWN} messages.")
    for message in history:
        show_message(message)

text = st.chat_input("Message", key=KEY_INPUT, max_chars=conversations.MAX_MESSAGE_CHARS)
if text:
    backend = glue.backend()
    stream = None
    with glue.reported():
        stream = conversations.stream_message(pool, backend, settings, user_id, text)  # stores the message
    if stream is not None:
        with st.chat_message("user"):
            st.markdown(safe_md(stream.text))  # as stored: after any redaction
        with st.chat_message("assistant"), glue.reported():
            with stream:  # leaving early (the user navigates away) stops the model and stores what was produced
                write_stream_text(stream)
            reply = stream.reply
            if reply is not None and reply.status in ("paused", "blocked", "error"):
                st.caption({"paused": "This conversation is paused.", "blocked": "Your message was not delivered.",
                            "error": "The reply failed; an operator can see why."}[reply.status])
