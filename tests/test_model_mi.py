import math

import torch

from modsquad import mutual_information_loss, task_expert_joint


def test_mi_loss_is_zero_when_experts_independent_of_task():
    """P(t,e) = P(t)P(e) means no mutual information: L_MI = 0."""
    p_t = torch.tensor([0.2, 0.3, 0.5])[:, None]
    p_e = torch.softmax(torch.randn(1, 7), dim=-1)
    assert abs(mutual_information_loss(p_t * p_e).item()) < 1e-6


def test_mi_loss_is_minus_log_t_for_one_to_one_routing():
    """Each of T tasks owning its own expert (uniform P(t), T <= E) reaches the bound -log T."""
    T, E = 4, 6
    p_te = torch.zeros(T, E)
    p_te[torch.arange(T), torch.arange(T)] = 1 / T
    assert abs(mutual_information_loss(p_te).item() + math.log(T)) < 1e-6


def test_mi_loss_bounds():
    """-log min(T, E) <= L_MI <= 0 for any joint distribution."""
    torch.manual_seed(0)
    for T, E in [(3, 8), (13, 4), (5, 5)]:
        for _ in range(20):
            p_te = torch.rand(T, E) ** 4
            p_te /= p_te.sum()
            loss = mutual_information_loss(p_te).item()
            assert -math.log(min(T, E)) - 1e-6 <= loss <= 1e-6


def test_task_expert_joint_is_a_distribution_with_uniform_task_marginal():
    torch.manual_seed(0)
    probs = [torch.softmax(torch.randn(30, 5), -1) for _ in range(3)]
    p_te = task_expert_joint(probs)
    torch.testing.assert_close(p_te.sum(1), torch.full((3,), 1 / 3))
    torch.testing.assert_close(p_te[1], probs[1].mean(0) / 3)


def test_mi_loss_gradient_increases_specialisation():
    """One gradient step on the router logits raises I(T;E): minimising L_MI specialises tasks on experts."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40, 6, requires_grad=True)  # (T, tokens, E)

    def mi(lg):
        return -mutual_information_loss(task_expert_joint(list(lg.softmax(-1))))

    before = mi(logits)
    (-before).backward()
    with torch.no_grad():
        after = mi(logits - 10.0 * logits.grad)
    assert after > 1.02 * before


def test_mi_loss_gradient_is_finite_where_a_task_never_uses_an_expert():
    """P(t,e) = 0 happens: a softmax underflows once a task has specialised. There L_MI is defined (0 log 0 = 0) and
    its gradient must stay finite, or one such entry turns the whole step's gradients into NaN (as xlogy or
    torch.where would). Elsewhere the gradient is the analytic dL/dP(t,e) = 1 - log[P(t,e) / (P(t)P(e))]."""
    p_te = torch.tensor([[0.30, 0.20, 0.0], [0.0, 0.10, 0.40]], dtype=torch.float64, requires_grad=True)
    loss = mutual_information_loss(p_te)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p_te.grad).all()
    p = p_te.detach()
    ratio = p / (p.sum(1, keepdim=True) * p.sum(0, keepdim=True))
    nz = p > 0
    torch.testing.assert_close(loss, -(p[nz] * ratio[nz].log()).sum())
    torch.testing.assert_close(p_te.grad[nz], 1 - ratio[nz].log())
    # and from router probabilities with exact zeros, through task_expert_joint
    logits = torch.tensor([[[0.0, 1.0, -1e4]], [[-1e4, 0.5, 0.0]]], requires_grad=True)  # (T, tokens, E)
    mutual_information_loss(task_expert_joint(list(logits.softmax(-1)))).backward()
    assert torch.isfinite(logits.grad).all()
