#!/usr/bin/env bash
# Install the app's requirements into .venv and start it on http://localhost:8501.
# Extra arguments go to `streamlit run` (for example --server.port 8600).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" requirements.txt
exec streamlit run app.py "$@"
