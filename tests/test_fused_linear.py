"""FusedLinearGroupKDLoss (docs/design.md §4) against the materialised computation.

The reference is ``materialised_group_kd``: full [N, V] logits by F.linear, then
``group_kd`` on the reference backend, differentiated by autograd. Every case draws fresh
random inputs (seed printed on failure; ORC_FAST_TEST_SEED replays it).
"""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS

from orc_fast import FusedLinearGroupKDLoss, fused_linear_group_kd, group_kd
from orc_fast.fused_linear import materialised_group_kd

ROOT = Path(__file__).resolve().parents[1]
# Interpreted Triton is slow: it runs the small cases only.
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]


def make_problem(generator, tokens, width, vocab, num_teachers, dtype=torch.float32, bias=True,
                 ignore_fraction=0.0, ignore_index=-100):
    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator) * scale).to(dtype)

    # weights scaled so logits have a spread of a few units, as a trained head's do
    hidden = randn(tokens, width)
    weight = randn(vocab, width, scale=2.0 / math.sqrt(width))
    teacher_widths = [width + 3 * g for g in range(num_teachers)]  # teachers' H_g differ
    teacher_hidden = [randn(tokens, w) for w in teacher_widths]
    teacher_weights = [randn(vocab, w, scale=2.0 / math.sqrt(w)) for w in teacher_widths]
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    if ignore_fraction:
        target[torch.rand(tokens, generator=generator) < ignore_fraction] = ignore_index
        target[0] = 0  # at least one counted token
    problem = dict(student_hidden=hidden, student_head_weight=weight, target=target,
                   teacher_hidden=teacher_hidden, teacher_head_weights=teacher_weights)
    if bias:
        problem["student_head_bias"] = randn(vocab)
        problem["teacher_head_biases"] = [randn(vocab) if g % 2 == 0 else None for g in range(num_teachers)]
    return problem


def run(fn, problem, upstream=1.0, **options):
    """Loss, per-token outputs and the gradients of (upstream · loss) for hidden, weight, bias."""
    leaves = {name: problem[name].detach().clone().requires_grad_(True)
              for name in ("student_hidden", "student_head_weight", "student_head_bias") if name in problem}
    result = fn(**{**problem, **leaves}, **options)
    (result.loss * upstream).backward()
    out = result._asdict()
    out.update({f"grad_{name}": leaf.grad for name, leaf in leaves.items()})
    return out


def check_close(got, want, dtype=torch.float32):
    loose = dtype != torch.float32
    for name in ("loss", "kl", "ce"):
        assert got[name].dtype == torch.float32
        tol = dict(rtol=2e-2, atol=2e-2) if loose else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    if not loose:  # argmaxes of near-tied bf16 logits may differ with the matmul's blocking
        for name in ("student_correct", "teacher_correct", "error_mask"):
            assert torch.equal(got[name], want[name]), name
    for name in [k for k in want if k.startswith("grad_")]:
        assert got[name].dtype == want[name].dtype == dtype, name
        scale = want[name].abs().max().item()
        tol = dict(rtol=2e-2, atol=2e-2 * scale) if loose else dict(rtol=1e-4, atol=1e-6 * max(scale, 1e-30))
        torch.testing.assert_close(got[name].float(), want[name].float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(params=FAST_BACKENDS)
def backend(request):
    return request.param


# (tokens, width, vocab, teachers, chunk_size, bias): chunks that divide N and that don't,
# one chunk bigger than N, one-row chunks, and an LLM-sized vocabulary with few tokens.
SHAPES = [
    (16, 8, 50, 1, 4, True),
    (13, 8, 50, 2, 4, False),
    (13, 8, 50, 3, 5, True),
    (13, 8, 50, 2, 100, True),
    (5, 4, 7, 2, 1, True),
    (6, 16, 32000, 2, 4, True),
    (6, 16, 32000, 3, 6, False),
]


@pytest.mark.parametrize("tokens,width,vocab,num_teachers,chunk_size,bias", SHAPES)
def test_matches_materialised(backend, generator, tokens, width, vocab, num_teachers, chunk_size, bias):
    problem = make_problem(generator, tokens, width, vocab, num_teachers, bias=bias, ignore_fraction=0.2)
    got = run(fused_linear_group_kd, problem, backend=backend, chunk_size=chunk_size)
    want = run(materialised_group_kd, problem)
    check_close(got, want)
    assert got["kl"].shape == got["ce"].shape == (tokens,)
    assert got["teacher_correct"].shape == (num_teachers, tokens)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton (interpreted) not available")
def test_triton_backend_matches_materialised(generator):
    problem = make_problem(generator, 9, 8, 40, 2, ignore_fraction=0.2)
    check_close(run(fused_linear_group_kd, problem, backend="triton", chunk_size=4),
                run(materialised_group_kd, problem))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,chunk_size", [(50, 4), (32000, 3)])
def test_low_precision_inputs(backend, generator, dtype, vocab, chunk_size):
    problem = make_problem(generator, 7, 16, vocab, 2, dtype=dtype, ignore_fraction=0.2)
    check_close(run(fused_linear_group_kd, problem, backend=backend, chunk_size=chunk_size),
                run(materialised_group_kd, problem), dtype=dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_options_and_upstream(backend, generator, reduction):
    problem = make_problem(generator, 11, 8, 30, 3, ignore_fraction=0.4, ignore_index=5)
    problem["target"][problem["target"] == 5] = 6  # class 5 is the ignore marker here
    problem["target"][3:6] = 5
    options = dict(reduction=reduction, ignore_index=5, temperature=2.5, alpha=0.3, teacher_weights=[0.5, 2.0, 0.0],
                   error_rule="majority")
    got = run(fused_linear_group_kd, problem, upstream=3.0, backend=backend, chunk_size=3, **options)
    want = run(materialised_group_kd, problem, upstream=3.0, **options)
    check_close(got, want)
    assert torch.all(got["kl"][3:6] == 0) and torch.all(got["ce"][3:6] == 0)
    assert torch.all(got["grad_student_hidden"][3:6] == 0)


def test_ignored_tokens_count_for_nothing(backend, generator):
    """Appending ignored tokens changes neither the mean loss nor the weight gradient."""
    problem = make_problem(generator, 8, 8, 30, 2)
    extra = make_problem(generator, 5, 8, 30, 2)
    padded = {
        "student_hidden": torch.cat([problem["student_hidden"], extra["student_hidden"]]),
        "student_head_weight": problem["student_head_weight"],
        "student_head_bias": problem["student_head_bias"],
        "target": torch.cat([problem["target"], torch.full((5,), -100)]),
        "teacher_hidden": [torch.cat([a, b]) for a, b in zip(problem["teacher_hidden"], extra["teacher_hidden"])],
        "teacher_head_weights": problem["teacher_head_weights"],
        "teacher_head_biases": problem["teacher_head_biases"],
    }
    plain = run(fused_linear_group_kd, problem, backend=backend, chunk_size=3)
    with_padding = run(fused_linear_group_kd, padded, backend=backend, chunk_size=3)
    torch.testing.assert_close(with_padding["loss"], plain["loss"])
    torch.testing.assert_close(with_padding["grad_student_head_weight"], plain["grad_student_head_weight"])
    torch.testing.assert_close(with_padding["grad_student_hidden"][:8], plain["grad_student_hidden"])
    assert torch.all(with_padding["grad_student_hidden"][8:] == 0)


def test_all_tokens_ignored_gives_nan_like_group_kd(backend, generator):
    problem = make_problem(generator, 4, 8, 10, 1)
    problem["target"][:] = -100
    got = fused_linear_group_kd(**problem, backend=backend)
    assert torch.isnan(got.loss)


def _topk_problem(generator, tokens, vocab, num_teachers, k):
    problem = make_problem(generator, tokens, 8, vocab, num_teachers, ignore_fraction=0.2)
    teacher_logits = torch.stack([
        F.linear(h, w, b) for h, w, b in zip(problem["teacher_hidden"], problem["teacher_head_weights"],
                                              problem["teacher_head_biases"])
    ])
    logprobs = torch.log_softmax(teacher_logits, -1)
    top = logprobs.topk(k, dim=-1)
    return problem, teacher_logits, top.indices, top.values


@pytest.mark.parametrize("num_teachers,k,chunk_size", [(1, 1, 4), (2, 5, 3), (3, 17, 16)])
def test_sparse_topk_matches_dense_with_zero_tail(backend, generator, num_teachers, k, chunk_size):
    """Top-K teachers = the dense loss on teacher logits that are -inf outside the top-K."""
    problem, teacher_logits, indices, logprobs = _topk_problem(generator, 10, 40, num_teachers, k)
    tail = torch.full_like(teacher_logits, -math.inf).scatter(-1, indices, teacher_logits.gather(-1, indices))
    sparse = {name: problem[name] for name in ("student_hidden", "student_head_weight", "student_head_bias", "target")}
    got = run(fused_linear_group_kd, sparse, backend=backend, chunk_size=chunk_size, teacher_topk=(indices, logprobs))

    hidden = problem["student_hidden"].clone().requires_grad_(True)
    weight = problem["student_head_weight"].clone().requires_grad_(True)
    bias = problem["student_head_bias"].clone().requires_grad_(True)
    want = group_kd(F.linear(hidden, weight, bias), tail, problem["target"], backend="reference")._asdict()
    want["loss"].backward()
    want.update(grad_student_hidden=hidden.grad, grad_student_head_weight=weight.grad, grad_student_head_bias=bias.grad)
    check_close(got, want)
    # and the tail really holds no mass: kl is finite wherever the student is finite
    assert torch.isfinite(got["kl"]).all()


def test_topk_of_all_classes_is_the_dense_teacher(backend, generator):
    """K = V: renormalising over every class is the dense teacher, from hidden states."""
    problem, _, indices, logprobs = _topk_problem(generator, 9, 12, 2, 12)
    sparse = {name: problem[name] for name in ("student_hidden", "student_head_weight", "student_head_bias", "target")}
    got = run(fused_linear_group_kd, sparse, backend=backend, chunk_size=4, teacher_topk=(indices, logprobs))
    want = run(fused_linear_group_kd, problem, backend=backend, chunk_size=4)
    check_close(got, want)


def test_only_the_student_head_can_be_trained(backend, generator):
    """A frozen trunk (hidden without grad) and teachers that do require grad get none."""
    problem = make_problem(generator, 7, 8, 20, 2)
    weight = problem["student_head_weight"].clone().requires_grad_(True)
    teacher_weight = problem["teacher_head_weights"][0].clone().requires_grad_(True)
    loss = fused_linear_group_kd(**{**problem, "student_head_weight": weight,
                                    "teacher_head_weights": [teacher_weight, problem["teacher_head_weights"][1]]},
                                 backend=backend, chunk_size=3).loss
    loss.backward()
    assert weight.grad is not None and teacher_weight.grad is None
    reference = run(materialised_group_kd, problem)
    torch.testing.assert_close(weight.grad, reference["grad_student_head_weight"], rtol=1e-4, atol=1e-6)


def test_module_and_no_grad(backend, generator):
    problem = make_problem(generator, 6, 8, 20, 2)
    criterion = FusedLinearGroupKDLoss(temperature=2.0, alpha=0.5, chunk_size=4, backend=backend)
    assert "chunk_size=4" in repr(criterion)
    options = dict(temperature=2.0, alpha=0.5)
    want = materialised_group_kd(**problem, **options).loss
    torch.testing.assert_close(criterion(**problem), want)
    with torch.no_grad():
        torch.testing.assert_close(criterion(**problem), want)


def test_compiled_step_matches_eager(generator):
    """torch.compile(fullgraph=True) of a training step that calls the loss: no graph break, eager's numbers."""
    import torch._dynamo

    problem = make_problem(generator, 12, 8, 30, 2, ignore_fraction=0.2)
    trunk = torch.nn.Linear(8, 8)
    head = torch.nn.Linear(8, 30)
    criterion = FusedLinearGroupKDLoss(chunk_size=5)

    def step(x, target, teacher_hidden, teacher_weights):
        return criterion(trunk(x), head.weight, target, teacher_hidden=teacher_hidden,
                         teacher_head_weights=teacher_weights, student_head_bias=head.bias)

    args = (problem["student_hidden"], problem["target"], problem["teacher_hidden"], problem["teacher_head_weights"])
    eager = step(*args)
    eager.backward()
    eager_grads = [p.grad.clone() for p in (*trunk.parameters(), *head.parameters())]
    trunk.zero_grad()
    head.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(*args)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip([p.grad for p in (*trunk.parameters(), *head.parameters())], eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _good(generator):
    return make_problem(generator, 4, 8, 6, 2)


def _drop(problem, *names):
    return {k: v for k, v in problem.items() if k not in names}


BAD_INPUTS = {
    "hidden rank": (lambda p: {**p, "student_hidden": p["student_hidden"][0]}, {}, "student_hidden"),
    "hidden dtype": (lambda p: {**p, "student_hidden": p["student_hidden"].double()}, {}, "student_hidden"),
    "hidden not a tensor": (lambda p: {**p, "student_hidden": [[1.0]]}, {}, "student_hidden"),
    "weight width": (lambda p: {**p, "student_head_weight": p["student_head_weight"][:, :3]}, {}, "student_head_weight"),
    "weight dtype": (lambda p: {**p, "student_head_weight": p["student_head_weight"].half()}, {}, "student_head_weight"),
    "bias shape": (lambda p: {**p, "student_head_bias": p["student_head_bias"][:2]}, {}, "student_head_bias"),
    "teacher tokens": (lambda p: {**p, "teacher_hidden": [p["teacher_hidden"][0][:2], p["teacher_hidden"][1]]},
                       {}, "teacher_hidden"),
    "teacher vocab": (lambda p: {**p, "teacher_head_weights": [p["teacher_head_weights"][0][:3],
                                                               p["teacher_head_weights"][1]]}, {}, "teacher_head_weights"),
    "teacher count": (lambda p: {**p, "teacher_head_weights": p["teacher_head_weights"][:1]}, {}, "teacher_head_weights"),
    "teacher dtype": (lambda p: {**p, "teacher_hidden": [t.half() for t in p["teacher_hidden"]]}, {}, "teacher_hidden"),
    "no teachers": (lambda p: {**p, "teacher_hidden": [], "teacher_head_weights": []}, {}, "teacher_hidden"),
    "teacher bias count": (lambda p: {**p, "teacher_head_biases": [None]}, {}, "teacher_head_biases"),
    "neither teacher form": (lambda p: _drop(p, "teacher_hidden", "teacher_head_weights", "teacher_head_biases"),
                             {}, "teacher_topk"),
    "both teacher forms": (lambda p: {**p, "teacher_topk": (torch.zeros(2, 4, 1, dtype=torch.long), torch.zeros(2, 4, 1))},
                           {}, "teacher_topk"),
    "float target": (lambda p: {**p, "target": p["target"].float()}, {}, "target"),
    "target shape": (lambda p: {**p, "target": p["target"][:3]}, {}, "target"),
    "target range": (lambda p: {**p, "target": torch.tensor([0, 1, 6, 2])}, {}, "target"),
    "negative target": (lambda p: {**p, "target": torch.tensor([0, 1, -3, 2])}, {}, "target"),
    "temperature 0": (lambda p: p, {"temperature": 0.0}, "temperature"),
    "alpha > 1": (lambda p: p, {"alpha": 1.5}, "alpha"),
    "reduction none": (lambda p: p, {"reduction": "none"}, "reduction"),
    "backend": (lambda p: p, {"backend": "tpu"}, "backend"),
    "chunk size": (lambda p: p, {"chunk_size": 0}, "chunk_size"),
    "weights length": (lambda p: p, {"teacher_weights": [1.0, 1.0, 1.0]}, "teacher_weights"),
    "zero weights": (lambda p: p, {"teacher_weights": [0.0, 0.0]}, "teacher_weights"),
}


def _topk_bad(indices=None, logprobs=None):
    def transform(p):
        good_indices = torch.tensor([[[0, 1]] * 4, [[2, 3]] * 4])
        pair = (good_indices if indices is None else indices, torch.zeros(2, 4, 2) if logprobs is None else logprobs)
        return {**_drop(p, "teacher_hidden", "teacher_head_weights", "teacher_head_biases"), "teacher_topk": pair}
    return transform


BAD_INPUTS.update({
    "topk not a pair": (lambda p: {**_drop(p, "teacher_hidden", "teacher_head_weights", "teacher_head_biases"),
                                   "teacher_topk": torch.zeros(2, 4, 2)}, {}, "teacher_topk"),
    "topk index dtype": (_topk_bad(indices=torch.zeros(2, 4, 2, dtype=torch.int32)), {}, "teacher_topk"),
    "topk index range": (_topk_bad(indices=torch.full((2, 4, 2), 6)), {}, "teacher_topk"),
    "topk repeated index": (_topk_bad(indices=torch.zeros(2, 4, 2, dtype=torch.long)), {}, "teacher_topk"),
    "topk shape": (_topk_bad(logprobs=torch.zeros(2, 4, 3)), {}, "teacher_topk"),
    "topk tokens": (_topk_bad(indices=torch.zeros(2, 3, 2, dtype=torch.long), logprobs=torch.zeros(2, 3, 2)),
                    {}, "teacher_topk"),
    "topk logprob dtype": (_topk_bad(logprobs=torch.zeros(2, 4, 2, dtype=torch.float64)), {}, "teacher_topk"),
})


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_argument(generator, case):
    transform, options, argument = BAD_INPUTS[case]
    problem = transform(_good(generator))
    with pytest.raises(ValueError, match=argument):
        fused_linear_group_kd(**problem, **options)


@pytest.mark.parametrize("options,argument", [
    ({"temperature": 0}, "temperature"), ({"alpha": 2}, "alpha"), ({"reduction": "none"}, "reduction"),
    ({"backend": "gpu"}, "backend"), ({"chunk_size": -1}, "chunk_size"), ({"chunk_size": 2.5}, "chunk_size"),
])
def test_module_rejects_bad_configuration(options, argument):
    with pytest.raises(ValueError, match=argument):
        FusedLinearGroupKDLoss(**options)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_distillation_example_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "distill_tiny_lm.py"), "--steps", "2"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [line for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2, done.stdout
