"""The method registry (orc_fast/methods/): each default in one place, and a new method
needs its own file and one registry line only."""

from __future__ import annotations

import json

import pytest
import torch

from orc_fast import methods
from orc_fast.cli import parse_args
from orc_fast.config import resolve
from orc_fast.group_step import StepConfig
from orc_fast.loss import group_kd
from orc_fast.methods.dml import dml_losses
from orc_fast.methods.kd import kd_losses
from orc_fast.methods.kdcl import kdcl_losses
from orc_fast.methods.orc_peer import orc_losses
from orc_fast.methods.orc_pivot import pivot_orc_losses
from orc_fast.train import main

N, B, C = 4, 6, 5


def variants():
    """(method, needs a pivot) for every registered method and its pivot-mode variant."""
    found = []
    for name in methods.names():
        method = methods.get(name)
        if method.pivot != "required":
            found.append((method, False))
        if method.pivot != "never":
            found.append((methods.get(name, pivot=True), True))
    return found


@pytest.mark.parametrize("method, pivot", variants(), ids=lambda v: getattr(v, "__class__", type(v)).__name__)
def test_step_config_and_the_command_line_take_the_methods_defaults(method, pivot, tmp_path):
    defaults = method.defaults
    expected = {"temperature": defaults.temperature, "alpha": defaults.alpha, "kd_scale": defaults.kd_scale,
                **defaults.settings}
    # The library: a StepConfig with nothing set, resolved for this method.
    step = StepConfig(method=method.name).resolved(method, N)
    for key, value in expected.items():
        if hasattr(step, key):
            assert getattr(step, key) == value, key
    # The command line: the run's effective values.
    pivot_file = tmp_path / "pivot.pt"
    pivot_file.write_bytes(b"")  # resolving checks that it exists; it is read later
    argv = ["--method", method.name, "--out", str(tmp_path / "run")] + (["--pivot", str(pivot_file)] if pivot else [])
    if not method.distils:
        expected = {k: v for k, v in expected.items() if k == "temperature"}
    record = resolve(parse_args(argv)).record()
    for key, value in expected.items():
        assert record[key] == value, key


def test_the_library_defaults_are_orc_peer_modes():
    step = StepConfig()
    orc = methods.get("orc")
    assert step.method == "orc"
    resolved = step.resolved(orc, N)
    assert (resolved.alpha, resolved.kd_scale, resolved.rank_by, resolved.teacher_size) == (
        orc.defaults.alpha, orc.defaults.kd_scale, orc.defaults.settings["rank_by"], N // 2)


def test_the_loss_functions_defaults_are_their_methods():
    torch.manual_seed(0)
    logits, target = torch.randn(N, B, C), torch.randint(0, C, (B,))
    pivot, roles = torch.randn(B, C), torch.tensor([1.0, 0.0, 1.0, 0.0])
    cases = [
        ("orc", lambda **kw: orc_losses(logits, target, roles, **kw)),
        ("dml", lambda **kw: dml_losses(logits, target, **kw)),
        ("kdcl", lambda **kw: kdcl_losses(logits, target, **kw)),
        ("kd", lambda **kw: kd_losses(logits, target, pivot, **kw)),
    ]
    pivot_mode = methods.get("orc", pivot=True)
    cases.append((pivot_mode, lambda **kw: pivot_orc_losses(logits, pivot, target, roles, **kw)))
    for method, losses in cases:
        method = methods.get(method) if isinstance(method, str) else method
        d = method.defaults
        explicit = losses(temperature=d.temperature, alpha=d.alpha, kd_scale=d.kd_scale)
        torch.testing.assert_close(losses().per_member, explicit.per_member, rtol=0, atol=0)


class EnsembleKD(methods.Method):
    """A toy method: every member, CE + tau^2 KL to the mean of the whole group (itself included)."""

    name = "ensemble_kd"
    defaults = methods.MethodDefaults(3.0, 1.0, 1.0, "a test's toy method")
    reads = ("temperature", "alpha", "ce_weight", "kd_weight")

    def losses(self, step, images, logits, target):
        cfg = step.config
        result = group_kd(logits, logits.detach(), target, temperature=cfg.temperature, alpha=cfg.alpha,
                          reduction="none", validate=False)
        kd = cfg.temperature**2 * result.kl.mean(1).detach()
        return methods.MemberLosses(cfg.kd_scale * result.loss.mean(1), torch.zeros_like(result.error_mask),
                                    result.ce.mean(1).detach(), kd)


@pytest.fixture
def toy_method():
    methods.register(EnsembleKD())
    yield EnsembleKD.name
    methods.unregister(EnsembleKD.name)


def test_a_registered_method_trains_end_to_end(toy_method, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--method", toy_method, "--num-nets", "2", "--epochs", "2", "--train-subset", "200", "--batch-size", "32",
            "--threads", "1", "--progress", "off", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == toy_method and metrics["config"]["temperature"] == 3.0
    assert len(metrics["epochs"]) == 2 and all(kd > 0 for kd in metrics["epochs"][-1]["train_kd"])
    assert "loss: 1 CE + 1 tau^2 KL, tau = 3 (a test's toy method)" in capsys.readouterr().out
    # It reads the distillation flags and no other method's.
    assert main(argv[:-1] + [str(tmp_path / "t"), "--temperature", "2"]) == 0
    assert main(argv[:-1] + [str(tmp_path / "k"), "--teacher-size", "1"]) == 2
    assert "does not use --teacher-size" in capsys.readouterr().err
