"""compactor/training/losses.py: distillation losses on known tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compactor.training import losses


def test_kl_of_identical_logits_is_zero():
    z = torch.randn(16, 10) * 5
    for t in (1.0, 4.0, 10.0):
        value = float(losses.kl_loss(z, z.clone(), t))
        assert abs(value) < 1e-6, f"KL(z‖z) at T={t} is {value}"


def test_kl_matches_hinton_with_t_squared_scaling():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    for temp in (1.0, 2.0, 4.0):
        p = F.softmax(t / temp, dim=1)
        manual = (p * (p.log() - F.log_softmax(s / temp, dim=1))).sum(1).mean() * temp**2
        got = losses.kl_loss(s, t, temp)
        assert torch.allclose(got, manual, atol=1e-6), (temp, float(got), float(manual))
    # T² keeps the gradients' size: at high T they tend to (z_s - z_t) / (N · classes)
    s.requires_grad_(True)
    losses.kl_loss(s, t, 50.0).backward()
    centred = (s - t) - (s - t).mean(dim=1, keepdim=True)
    want = centred.detach() / (s.shape[0] * s.shape[1])
    err = float((s.grad - want).abs().max() / want.abs().max())
    assert err < 0.05, f"relative gradient error at T=50: {err:.4f}"


def test_kl_on_token_logits_counts_every_token():
    z = torch.randn(2, 3, 7)
    flat = losses.kl_loss(z.reshape(6, 7), z.reshape(6, 7) * 0.5, 2.0)
    assert torch.allclose(losses.kl_loss(z, z * 0.5, 2.0), flat)


def test_ce_with_labels_and_one_hot():
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(losses.ce_loss(z, y), F.cross_entropy(z, y))
    assert torch.allclose(losses.ce_loss(z, F.one_hot(y, 4)), F.cross_entropy(z, y), atol=1e-6)


def test_mse_and_cosine():
    a = torch.randn(5, 8)
    assert float(losses.mse_loss(a, a)) == 0.0
    assert float(losses.cosine_loss(a, a)) < 1e-6
    assert abs(float(losses.cosine_loss(a, -a)) - 2.0) < 1e-6
    assert float(losses.cosine_loss(a, 3.0 * a)) < 1e-6, "cosine ignores scale"
    assert float(losses.mse_loss(a, 3.0 * a)) > 0.1, "mse does not"


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [((2, 8, 4, 4), (2, 16, 4, 4), "Conv2d"), ((2, 5, 32), (2, 5, 64), "Linear"),
     ((2, 32), (2, 48), "Linear"), ((2, 8, 4, 4), (2, 8, 4, 4), None)],
)
def test_projection_maps_the_student_width_to_the_teacher(student, teacher, kind):
    s, t = torch.randn(*student), torch.randn(*teacher)
    proj = losses.make_projection(s, t)
    assert (None if proj is None else type(proj).__name__) == kind
    if proj is not None:
        assert proj(s).shape == t.shape


def test_projection_refuses_other_differences():
    with pytest.raises(ValueError, match="more than their width"):
        losses.make_projection(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8))


def test_distill_loss_sums_its_weighted_parts():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    fs, ft = [torch.randn(4, 6)], [torch.randn(4, 6)]
    fn = losses.DistillLoss(losses.LossWeights(kl=0.5, ce=2.0, mse=1.0, cosine=0.25), 3.0,
                            hint_weights=[4.0])
    total, parts = fn(s, t, y, fs, ft)
    assert set(parts) == {"kl", "ce", "mse", "cosine", "hint0"}
    assert torch.allclose(parts["kl"], 0.5 * losses.kl_loss(s, t, 3.0))
    assert torch.allclose(parts["hint0"], 4.0 * F.mse_loss(fs[0], ft[0]))
    assert torch.allclose(total, sum(parts.values()))
    with pytest.raises(ValueError, match="needs labels"):
        fn(s, t, None)


def test_masked_hint_counts_real_positions_only():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    real = mask.bool()
    want = F.mse_loss(s[real], t[real])
    got = losses.hint_loss(s, t, mask)
    assert torch.allclose(got, want, atol=1e-6), (float(got), float(want))
    s2 = s.clone()
    s2[~real] += 100.0  # padding positions: anything goes
    assert torch.allclose(losses.hint_loss(s2, t, mask), want, atol=1e-6)
    assert torch.allclose(losses.hint_loss(s, t, torch.ones(3, 5)), F.mse_loss(s, t))
    fn = losses.DistillLoss(losses.LossWeights(cosine=1.0), hint_weights=[2.0])
    _, parts = fn(s.mean(1), t.mean(1), None, [s2], [t], mask)
    assert torch.allclose(parts["hint0"], 2.0 * want, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        losses.hint_loss(s, t, mask[:, :4])


def test_nmse_is_unit_free_and_one_for_a_constant_predictor():
    torch.manual_seed(0)
    t = 100.0 * torch.randn(64, 4)  # pixels
    var = float(t.var(unbiased=False))
    mean = t.mean().expand_as(t)
    assert abs(float(losses.nmse_loss(mean, t, var)) - 1.0) < 1e-5
    s = t + 10.0 * torch.randn(64, 4)
    # the same relative error in other units scores the same
    assert torch.allclose(losses.nmse_loss(s, t, var), losses.nmse_loss(s / 100, t / 100,
                                                                         var / 1e4))
    assert float(losses.nmse_loss(t, t, var)) == 0.0


def test_distill_loss_over_several_outputs_names_each_term():
    torch.manual_seed(0)
    s = (torch.randn(4, 3), 50 * torch.randn(4, 4), torch.rand(4, 5, 2))
    t = (torch.randn(4, 3), 50 * torch.randn(4, 4), torch.rand(4, 5, 2))
    y = torch.tensor([0, 1, 2, 0])
    heads = [*losses.LossWeights(kl=1.0, ce=0.5).heads(2.0, 0, "logits"),
             losses.HeadLoss(1, "box", "nmse", 2.0, variance=2500.0),
             losses.HeadLoss(2, "points", "mse", 0.0)]  # weight 0: left out
    fn = losses.DistillLoss(None, 2.0, heads=heads)
    total, parts = fn(s, t, y)
    assert list(parts) == ["logits.kl", "logits.ce", "box.nmse"]
    assert torch.allclose(parts["logits.kl"], losses.kl_loss(s[0], t[0], 2.0))
    assert torch.allclose(parts["box.nmse"], 2.0 * F.mse_loss(s[1], t[1]) / 2500.0)
    assert torch.allclose(total, sum(parts.values()))
    assert fn.needs_teacher and fn.needs_labels
    unlabelled = fn.without_labels()
    assert not unlabelled.needs_labels
    assert list(unlabelled(s, t, None)[1]) == ["logits.kl", "box.nmse"]
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        losses.HeadLoss(0, "", "huber", 1.0)
    with pytest.raises(ValueError, match="repeat"):
        losses.DistillLoss(losses.LossWeights(kl=1.0), heads=[losses.HeadLoss(0, "", "kl", 1)])
