"""--precision and --channels-last (orc_fast/precision.py, GroupStep, the trainer)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_orc import batch, make_group
from test_train_cli import FAST

from orc_fast import checkpoint
from orc_fast.group_step import GroupStep, StepConfig
from orc_fast.guard import NonFiniteGuard
from orc_fast.precision import LossScaler, cpu_has_fast_bf16, default_channels_last, resolve_precision
from orc_fast.roles import batch_scores
from orc_fast.train import main

STRATEGIES = ["sequential", "streams", "fused", "auto"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_a_step_of_every_strategy(precision, strategy):
    models, optimizers = make_group(3)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    step = GroupStep(models, optimizers, StepConfig(strategy=strategy, precision=precision, teacher_size=1), "cpu", None)
    for _ in range(3):
        out = step(*batch())
    assert torch.isfinite(out.losses).all() and out.losses.dtype == torch.float32
    for model, state in zip(models, before):
        assert not torch.equal(model.conv.weight, state["conv.weight"])
        assert model.conv.weight.dtype == torch.float32  # master weights stay fp32


def test_low_precision_logits_reach_the_loss_and_the_loss_is_close_to_fp32():
    models, optimizers = make_group(3)
    x, y = batch()
    losses = {}
    for precision in ("fp32", "bf16"):
        group = [copy.deepcopy(m) for m in models]
        step = GroupStep(group, [torch.optim.SGD(m.parameters(), lr=0.1) for m in group],
                         StepConfig(precision=precision), "cpu", None)
        logits = step.forward(x)
        assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        losses[precision] = batch_scores(logits, y, "ce")
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=2e-2, atol=2e-2)


def test_fp16_skips_a_step_whose_gradients_overflow_and_backs_off_the_scale():
    models, optimizers = make_group(3)
    step = GroupStep(models, optimizers, StepConfig(precision="fp16"), "cpu", None)
    step(*batch())  # a normal step: momentum buffers exist
    guard = NonFiniteGuard("skip-step", torch.device("cpu"), step.state_tensors)

    def weights_and_momentum():  # batch-norm statistics move in any forward, as with GradScaler
        return [t.clone() for m in models for t in m.parameters()] + [
            o.state[p]["momentum_buffer"].clone() for o, m in zip(optimizers, models) for p in m.parameters()]

    state = weights_and_momentum()
    step.scaler.scale.fill_(3e38)  # the scaled gradients overflow fp16 (and fp32)
    guard.before_step()
    out = step(*batch(seed=2))
    guard.after_step(out.losses, 0, 1)
    assert torch.isfinite(out.losses).all()  # the loss itself was fine: the scaler, not the guard, skipped
    assert guard.take_skipped() == 0
    for tensor, saved in zip(weights_and_momentum(), state):
        assert torch.equal(tensor, saved)  # no weight and no momentum moved
    assert step.scaler.scale.item() == pytest.approx(1.5e38)
    step(*batch(seed=3))  # the next step, at the lower scale... still too high: skipped again
    step.scaler.scale.fill_(2.0**10)
    step(*batch(seed=4))
    assert not all(torch.equal(t, s) for t, s in zip(weights_and_momentum(), state))


def test_loss_scaler_state_round_trip():
    scaler = LossScaler("cpu", init_scale=8.0, growth_interval=2)
    for _ in range(2):
        scaler.unscale([])
        scaler.update()
    assert scaler.scale.item() == 16.0
    other = LossScaler("cpu")
    other.load_state_dict(scaler.state_dict())
    assert other.scale.item() == 16.0 and other.growth_tracker.item() == scaler.growth_tracker.item()


def test_auto_precision_and_channels_last_rules():
    amd = "flags\t\t: fpu avx512f avx512_bf16\n"
    intel = "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert cpu_has_fast_bf16(amd) and cpu_has_fast_bf16(intel) and not cpu_has_fast_bf16("flags\t: fpu avx2\n")
    assert resolve_precision("bf16", torch.device("cpu")) == ("bf16", "asked for")
    name, why = resolve_precision("auto", torch.device("cpu"))
    assert name == ("bf16" if cpu_has_fast_bf16() else "fp32") and why.startswith("auto")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_channels_last(cpu, "fp32") and default_channels_last(cpu, "bf16")
    assert default_channels_last(cuda, "bf16") and not default_channels_last(cpu, "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", torch.device("cpu"))


def test_resume_is_exact_under_bf16(tmp_path, capsys):
    common = FAST + ["--epochs", "2", "--precision", "bf16", "--channels-last", "--seed", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--out", str(straight)]) == 0
    assert main(common + ["--out", str(split), "--stop-after", "1"]) == 0
    assert main(common + ["--out", str(split), "--resume"]) == 0
    a, b = checkpoint.load(straight / "latest.pt"), checkpoint.load(split / "latest.pt")
    for state_a, state_b in zip(a["models"], b["models"]):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    config = json.loads((straight / "metrics.json").read_text())["config"]
    assert config["precision"] == "bf16" and config["channels_last"] is True
    assert "bf16 (asked for), channels-last" in capsys.readouterr().out


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    common = FAST + ["--epochs", "2", "--precision", "fp16", "--train-subset", "100"]
    assert main(common + ["--out", str(tmp_path), "--stop-after", "1"]) == 0
    saved = checkpoint.load(tmp_path / "latest.pt")["scaler"]
    assert saved["scale"].item() > 0
    assert main(common + ["--out", str(tmp_path), "--resume"]) == 0
    with pytest.raises(SystemExit):  # a changed precision is a different run
        main(FAST + ["--epochs", "3", "--precision", "fpx", "--out", str(tmp_path), "--resume"])
    assert main(FAST + ["--epochs", "2", "--precision", "bf16", "--train-subset", "100", "--out", str(tmp_path),
                        "--resume"]) == 2
