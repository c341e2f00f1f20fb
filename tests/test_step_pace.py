"""The training step's pace on a GPU, measured by proxies on the CPU: what it dispatches, that it
never reads a value back, that torch.compile traces it whole and compiles it once, and how
runtime settings are recorded in checkpoints."""

import json

import pytest
import torch

from gn_diffusion.diffusion.draws import draw_step
from gn_diffusion.diffusion.objective import objective
from gn_diffusion.diffusion.schedules import noise_tables
from gn_diffusion.diffusion.seeding import seeded_generator
from gn_diffusion.train.loop import check_run, start_session, train
from op_count import OpCounter

from conftest import TINY, assert_fails_cleanly, tiny_config

# The digits topology shrunk: 8x8, base 8 channels, batch 2, the torch backend.
SHRUNK = ["model.base_channels=8", "model.groups=4", "train.batch_size=2", "runtime.backend=torch",
          "train.log_every=4", "train.warmup_steps=2"]


def session_of(tmp_path, *overrides):
    return start_session(check_run(tiny_config(tmp_path / "run", *SHRUNK, *overrides)))


def model_forward_backward_ops(session) -> int:
    """Ops of the model's own forward and backward on one micro-batch (the floor of any step)."""
    model = session.train_step.model
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    with OpCounter() as ops:
        model(x, t).sample.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return ops.total


@pytest.mark.parametrize("extra", [[], ["model.norm=batch", "model.num_classes=10", "data.random_flip=true"]])
def test_steps_between_logs_dispatch_little_more_than_the_model_and_never_sync(tmp_path, extra):
    session = session_of(tmp_path, *extra)
    session.train_step(session.batches, 0)  # warm-up: lazy optimizer state, first loader iterator
    floor = model_forward_backward_ops(session)
    steps = 3  # the steps between two logs (train.log_every=4)
    with OpCounter() as ops:
        for step in range(1, 1 + steps):
            session.train_step(session.batches, step)
    per_step = ops.total / steps
    assert ops.syncs == 0, ops.sync_calls
    assert per_step <= 1.25 * floor, f"{per_step:.0f} ops per step against {floor} for the model alone"


def test_training_objective_traces_without_a_graph_break(tmp_path):
    for backend in ("torch", "triton"):
        attention = ["model.attention_resolutions=[8]"] if backend == "torch" else []  # its norm is any other
        cfg = tiny_config(tmp_path, *SHRUNK, f"runtime.backend={backend}", "model.num_classes=10",
                          "data.random_flip=true", *attention)
        if backend == "triton":
            pytest.importorskip("triton")
        from gn_diffusion.model.unet import build_unet

        images, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
        draws = draw_step(images, cfg.diffusion.num_train_timesteps, 0.5, seeded_generator(0, 1))
        with pytest.MonkeyPatch.context() as mp:
            if backend == "triton":
                mp.setenv("TRITON_INTERPRET", "1")
            model = build_unet(cfg.model, cfg.runtime)
            tables = noise_tables(cfg.diffusion, "cpu")
            explained = torch._dynamo.explain(lambda: objective(model, images, labels, draws, cfg, tables))()
        assert explained.graph_break_count == 0, (backend, explained.break_reasons)
        torch._dynamo.reset()


def graphs_compiled(monkeypatch, cfg) -> tuple[int, int]:
    """Graphs dynamo compiled by the end of a run's first step, and by the end of the run (with
    the eager backend: no code generation)."""
    import gn_diffusion.train.loop as training
    from gn_diffusion.runtime import compile_model

    after_first = []
    real_first_step = training.first_step

    def first_step(*args):
        losses = real_first_step(*args)
        after_first.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return losses

    monkeypatch.setattr(training, "compile_model", lambda model, runtime: compile_model(model, runtime, "eager"))
    monkeypatch.setattr(training, "first_step", first_step)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(cfg, progress=False)
    return after_first[0], torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_training_compiles_once_not_per_step_nor_on_resume(tmp_path, monkeypatch):
    common = [*SHRUNK, "runtime.compile=default", "train.sample_every=2", "train.checkpoint_every=2"]
    first, total = graphs_compiled(monkeypatch, tiny_config(tmp_path, *common, "train.max_steps=3"))
    assert first >= 1 and total == first  # steps 2 and 3, a grid and a checkpoint added no graph
    resumed_first, resumed_total = graphs_compiled(
        monkeypatch, tiny_config(tmp_path, *common, "train.max_steps=5", "train.resume=auto"))
    assert resumed_first == first and resumed_total == first


def test_checkpoints_record_how_they_were_made_and_a_changed_resume_says_so(tmp_path, capsys):
    cfg = tiny_config(tmp_path, *SHRUNK, "train.max_steps=2", "train.checkpoint_every=2", "runtime.deterministic=true")
    train(cfg, progress=False)
    state = json.loads((tmp_path / "checkpoints" / "step-2" / "train_state.json").read_text())
    assert state["execution"] == {"device": "cpu", "gpu": None, "compile": "none", "deterministic": True}
    capsys.readouterr()
    train(tiny_config(tmp_path, *SHRUNK, "train.max_steps=3", "train.resume=auto", "runtime.deterministic=false"),
          progress=False)
    out = capsys.readouterr().out
    assert "deterministic True -> False" in out and "the continuation is not bit-exact" in out


def test_channels_last_trains_and_exports(tmp_path):
    out = train(tiny_config(tmp_path, *SHRUNK, "train.max_steps=2", "runtime.channels_last=true"), progress=False)
    from gn_diffusion.sample.model_folder import load_model

    model, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    (["runtime.compile=reduce-overhead"], "runtime.compile=reduce-overhead captures CUDA graphs and needs a CUDA device"),
    (["runtime.compile=max-autotune", "runtime.deterministic=true"], "set runtime.deterministic=false to use it"),
    (["runtime.compile=fastest"], "'runtime.compile' is 'fastest'; choose one of"),
])
def test_compile_settings_that_cannot_run_are_refused_before_anything_runs(tmp_path, capsys, overrides, message):
    args = [*SHRUNK, f"train.output_dir={tmp_path / 'out'}", "train.max_steps=1", *overrides]
    assert_fails_cleanly(capsys, "train.py", [*TINY, *args], message, tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_never_sync(tmp_path):
    session = session_of(tmp_path, "runtime.backend=auto")
    session.train_step(session.batches, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync inside a step raises
    try:
        losses = [loss for step in range(1, 4) for loss in session.train_step(session.batches, step)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(losses) == 3 and bool(torch.isfinite(torch.stack(losses)).all())


def test_the_eager_triton_norm_plans_once_per_forward_and_backward_and_refuses_double_backward(monkeypatch):
    """The backward reuses the forward's launch plan. A backward that builds a graph works (its
    first-order results are right), and only differentiating those results again is refused."""
    from gn_diffusion.kernels import triton_impl
    from gn_diffusion.model.norms import GroupNorm32

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    norm = GroupNorm32(2, 4, backend="triton")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    scale, shift = torch.randn(2, 8, requires_grad=True).chunk(2, dim=1)
    real, calls = triton_impl.prepare, []
    monkeypatch.setattr(triton_impl, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.autograd.grad(norm(x, scale, shift, act=True).square().sum(), [x, norm.weight, scale])
    assert len(calls) == 1  # the backward reuses the forward's plan
    first = torch.autograd.grad(norm(x, scale, shift, act=True).square().sum(), x)[0]
    graphed = torch.autograd.grad(norm(x, scale, shift, act=True).square().sum(), x, create_graph=True)[0]
    assert torch.equal(first, graphed)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        graphed.sum().backward()


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_runs_sdpas_fused_kernel_not_its_math_path(heads):
    """q, k and v reach scaled_dot_product_attention with the head dimension contiguous; else
    it falls back to the math path, which materializes the attention matrix (CPU and CUDA)."""
    from gn_diffusion.model.unet import AttentionBlock, NormSpec

    block = AttentionBlock(16, heads, NormSpec(kind="group", groups=4, eps=1e-5, backend="torch"))
    with OpCounter() as ops:
        block(torch.randn(2, 16, 4, 4, requires_grad=True)).sum().backward()
    assert ops.counts["aten._scaled_dot_product_flash_attention_for_cpu"] == 1, sorted(ops.counts)
    assert ops.counts["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == 1
    assert "aten.bmm" not in ops.counts and "aten._softmax" not in ops.counts
