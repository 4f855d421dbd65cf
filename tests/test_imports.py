"""bn_core must stay free of UI code so notebooks, the CLI and tests can use it."""

import subprocess
import sys


def test_bn_core_imports_without_streamlit():
    code = (
        "import sys, importlib, pkgutil, bn_core\n"
        "for m in pkgutil.walk_packages(bn_core.__path__, 'bn_core.'):\n"
        "    if m.name != 'bn_core.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "assert 'streamlit' not in sys.modules, 'bn_core imported streamlit'\n"
        "print('ok')\n"
    )
    # A fresh interpreter: nothing but bn_core's own imports can load streamlit there.
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
