"""scale="batch": the stateless robust scale (docs/DESIGN.md, Scale), in the functional losses and the module."""

import pytest
import torch

import robust_diffusion as rd


def reference_batch_scale(penalty, t, temperature=1.0, neighbours=8):
    """Loop version: sort by t, take the k-window centred on each sample (shifted inside the batch), its median
    over the finite penalties (the lower middle value, as torch.median), 1 where there is none."""
    batch = len(penalty)
    order = sorted(range(batch), key=lambda i: (t[i], i)) if t is not None else list(range(batch))
    k = min(batch, max(neighbours, batch // 4))
    out = [0.0] * batch
    for position, index in enumerate(order):
        start = min(max(position - k // 2, 0), batch - k)
        window = sorted(v for v in (penalty[order[j]] for j in range(start, start + k)) if v == v and abs(v) != float("inf"))
        typical = window[(len(window) - 1) // 2] if window else 1.0
        out[index] = 1.0 / (temperature * max(typical, 1e-12))
    return torch.tensor(out)


@pytest.mark.parametrize("batch", [1, 2, 5, 8, 9, 32, 64, 100])
def test_batch_scale_matches_the_loop_reference(batch):
    g = torch.Generator().manual_seed(batch)
    penalty = torch.rand(batch, generator=g) * 3
    t = torch.randint(0, 1000, (batch,), generator=g)
    torch.testing.assert_close(rd.batch_scale(penalty, t, 0.5), reference_batch_scale(penalty.tolist(), t.tolist(), 0.5))
    torch.testing.assert_close(rd.batch_scale(penalty), reference_batch_scale(penalty.tolist(), None))


def test_non_finite_penalties_are_left_out_and_an_all_bad_window_gives_scale_one():
    penalty = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0])
    torch.testing.assert_close(rd.batch_scale(penalty), torch.full((5,), 0.5))  # median of 1, 3, 2
    torch.testing.assert_close(rd.batch_scale(torch.full((4,), float("nan"))), torch.ones(4))
    assert rd.batch_scale(torch.zeros(3)).max().item() == pytest.approx(1e12)  # the floor, never inf


def test_contaminated_samples_get_low_influence_without_any_state():
    """30% of a batch with errors ten times the rest, at every noise level: their influence weights under NED with
    the batch scale are far below the clean samples', on the first call."""
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=g)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = x + 0.3 * torch.randn(64, 3, 8, 8, generator=g)
    y[:19] = x[:19] + 3.0 * torch.randn(19, 3, 8, 8, generator=g)
    w = rd.influence_weights(x, y, t, divergence="ned", scale="batch")
    loss_fn = rd.RobustDiffusionLoss("ned", scale="batch")
    loss_fn(x, y, t)
    influence = loss_fn.last_influence
    assert influence[:19].max() < 0.05 < 0.3 < influence[19:].min()
    # the module reports the weight relative to a typical sample's, the function phi'(delta) itself
    torch.testing.assert_close(w, influence * loss_fn.typical_influence)


@pytest.mark.parametrize("loss", ["hellinger", "ned", "alpha", "js", "lecam", "tv", "pseudo_huber"])
def test_functional_and_module_give_the_same_loss_and_gradient(loss):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (16,), generator=g)
    x = torch.randn(16, 2, 4, 4, generator=g)
    y = torch.randn(16, 2, 4, 4, generator=g)
    params = {"alpha": {"alpha": 0.25}, "pseudo_huber": {"c": 0.1}}.get(loss, {})
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    module = rd.RobustDiffusionLoss(loss, scale="batch", **params)
    functional = getattr(rd, f"{loss}_loss")
    a = module(x1, y, t)
    b = functional(x2, y, t, scale="batch", **params, **({"c_schedule": "snr"} if loss == "pseudo_huber" else {}))
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert module.adaptive_scale.bucket_penalty.eq(1).all() and not module.adaptive_scale.initialized  # no state was touched


def test_batch_scale_has_no_gradient_path_and_leaves_the_default_alone():
    """The scale is computed from detached penalties (the operator refuses a scale that requires grad); the
    default scale of every functional loss is unchanged (kl_loss == F.mse_loss)."""
    x = torch.randn(8, 5, requires_grad=True)
    y = torch.randn(8, 5)
    rd.hellinger_loss(x, y, scale="batch").backward()
    assert torch.isfinite(x.grad).all()
    assert rd.kl_loss(x, y).item() == pytest.approx(torch.nn.functional.mse_loss(x, y).item(), rel=1e-6)


def test_batch_scale_scripts_compiles_and_exports():
    t = torch.randint(0, 1000, (12,))
    x, y = torch.randn(12, 3, 4, 4), torch.randn(12, 3, 4, 4)
    module = rd.RobustDiffusionLoss("ned", scale="batch")
    expected = module(x, y, t)
    torch.testing.assert_close(torch.jit.script(module)(x, y, t), expected)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x, y, t), expected)
    exported = torch.export.export(module, (x, y, t))
    torch.testing.assert_close(exported.module()(x, y, t), expected)


def test_the_cli_accepts_batch():
    from robust_diffusion.training.experiment import parse_scale
    assert parse_scale("batch") == "batch"
    with pytest.raises(ValueError, match="'batch'"):
        parse_scale("median")
