"""PromptDev engine: templates, executions, conversations, evaluations, analytics. Never imports Streamlit."""
