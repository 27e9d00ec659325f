"""bitsandbytes' 8-bit AdamW with its 32-bit-state tensors stepped together (trainer/speed.py says why).

Imported only when bitsandbytes is: `import bitsandbytes` fails on some machines (see optim.py).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch.optim.adamw import adamw


class AdamW8bitSmallTogether(bnb.optim.AdamW8bit):
    """The same optimizer, state and checkpoint format as `bnb.optim.AdamW8bit`.

    bitsandbytes keeps fp32 Adam moments (`state1`, `state2`) for tensors under `min_8bit_size`
    elements and updates each with its own call; those updates are the AdamW of torch (same
    decoupled weight decay, bias corrections and eps placement), so they are made here by one
    fused `torch.optim.adamw` call per parameter group on bitsandbytes' own state.
    8-bit tensors go through bitsandbytes unchanged.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            small = []
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self.init_state(group, p, gindex, pindex)
                if state["state1"].dtype == torch.float32 and not self._overridden(gindex, pindex):
                    small.append(p)
                else:
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
            if small:
                self._step_together(group, small)
        return loss

    def _overridden(self, gindex: int, pindex: int) -> bool:
        """A parameter given its own settings (bitsandbytes' GlobalOptimManager) keeps its own call."""
        return (gindex, pindex) in self.mng.index2config

    def _step_together(self, group: dict, params: list[torch.nn.Parameter]) -> None:
        states = [self.state[p] for p in params]
        # torch counts steps in tensors and adds one before using them; bitsandbytes keeps ints.
        steps = [torch.tensor(float(s["step"]), device=p.device) for s, p in zip(states, params, strict=True)]
        for state in states:
            state["step"] += 1
        beta1, beta2 = group["betas"][:2]
        adamw(
            [p.data for p in params],
            [p.grad for p in params],
            [s["state1"] for s in states],
            [s["state2"] for s in states],
            [],
            steps,
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
