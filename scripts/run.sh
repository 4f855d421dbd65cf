#!/usr/bin/env bash
# Install the app's requirements into .venv and start it on http://localhost:8501.
# Extra arguments go to `streamlit run` (for example --server.port 8600).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" requirements.txt
# The compiled BatchNorm kernel (about 30 s, once); without a compiler the app runs on
# the Python kernel and says so.
python -m bn_core.native build --optional
exec streamlit run app.py "$@"
