"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on held-out patients so that
softmax(logits / T) is calibrated; argmax (and so the error) is unchanged. The exported graph
divides by T before its softmax, and T is recorded in the model's metadata."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """T minimising the NLL of softmax(logits / T) on (logits [n, C], targets [n]); ambiguous
    (-1) targets are ignored. Optimises log T with LBFGS, so T stays positive."""
    keep = targets >= 0
    logits = logits[keep].detach().double().cpu()
    targets = targets[keep].cpu()
    if len(targets) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    # Guard against a degenerate fit (e.g. a perfectly separated tiny val set drives T → 0).
    return min(max(t, 0.05), 20.0)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    keep = targets >= 0
    return float(F.cross_entropy(logits[keep].double() / temperature, targets[keep]))
