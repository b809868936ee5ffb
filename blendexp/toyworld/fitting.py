"""The one training loop of every toy asset trained outside Lightning (recogniser, expression encoder, VAE)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm


def fit(params: Iterable[torch.nn.Parameter], steps: int, lr: float, weight_decay: float, pct_start: float,
        desc: str, step: Callable[[], tuple[torch.Tensor, dict[str, str]]]) -> None:
    """AdamW with a one-cycle schedule for ``steps`` calls of ``step`` (→ loss, progress-bar fields): small models
    trained from scratch in minutes need the warm-up and the annealing, not a framework."""
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        loss, shown = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(shown)
