"""Print a benchmark module's table at the end of its run (and write it where asked)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def show_table(request, title: str, text: str) -> None:
    """``text`` under ``title`` in pytest's terminal summary, outside output capture; also to
    the file ``$ORC_FAST_BENCH_TABLE`` when set."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_sep("=", title)
            reporter.write_line(text)
    path = os.environ.get("ORC_FAST_BENCH_TABLE")
    if path:
        Path(path).write_text(text + "\n")
