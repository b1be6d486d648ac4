import torch

from training.regularizers import SparseSGD, draw_masks


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(40, 10)), torch.nn.Parameter(torch.randn(7))]


def test_masks_keep_exact_share_and_are_seeded():
    params = _params()
    masks = draw_masks(params, 0.8, seed=5)
    assert [int(m.sum()) for m in masks] == [80, 1]  # round(0.2 * 400), round(0.2 * 7) = 1
    again = draw_masks(params, 0.8, seed=5)
    other = draw_masks(params, 0.8, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    assert not torch.equal(masks[0], other[0])
    assert draw_masks(params, 0.0, seed=5) is None


def test_masked_entries_are_frozen_under_decay_and_momentum():
    params = _params()
    opt = SparseSGD(params, momentum=0.9)
    opt.set_hyper(lr=0.1, weight_decay=0.01)
    # two dense steps build momentum everywhere
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    masks = draw_masks(params, 0.5, seed=1)
    opt.set_masks(masks)
    frozen = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    for p, m, before in zip(params, masks, frozen):
        assert torch.equal(p.detach()[m == 0], before[m == 0])  # no gradient, decay or momentum
        assert (p.detach()[m == 1] != before[m == 1]).all()


def test_dense_step_equals_torch_sgd_with_coupled_decay():
    a, b = _params(), _params()
    ours = SparseSGD(a, momentum=0.9)
    ours.set_hyper(lr=0.05, weight_decay=1e-3)
    ref = torch.optim.SGD(b, lr=0.05, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        for p, q in zip(a, b):
            g = torch.full_like(p, 0.1 * (step + 1))
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
