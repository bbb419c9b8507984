"""Benchmark set-up: collect bench_*.py files and print the loss table at the end.

The benchmark files are named bench_*.py so that `make test` (tests/) never runs them;
this hook makes `pytest benchmarks` collect them.
"""

import pytest
from fused_linear_cases import results_table as fused_linear_table
from loss_cases import results_table


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter):
    table = results_table()
    if table:
        terminalreporter.write_sep("=", "group-KD loss: forward + backward, median of the timed rounds")
        terminalreporter.write_line(table)
    fused = fused_linear_table()
    if fused:
        terminalreporter.write_sep("=", "group KD from hidden states: fused vs materialised logits, forward + backward")
        terminalreporter.write_line(fused)
