"""Short refits of replaced layers' low-rank factors (a labelled, cheap training step).

GRASP and SVD-LLM choose each factor pair per matrix. A replaced decoder layer is then a chain of seven
low-rank Linears whose errors compound inside the layer (q/k through softmax, gate·up through SiLU),
and the layers above see inputs that already carry the error of the replaced layers below.

- `refit_layers` (grasp-wr): replaced layer by replaced layer from the bottom up, a few Adam steps on
  that layer's factors only (norms, attention and every other layer frozen) so that, fed the hidden
  states the *compressed* model produces at its input, it reproduces the hidden states the *dense*
  model has at its output. Errors from below are thus partly absorbed; memory stays one layer's
  activations.
- `refit_end_to_end` (grasp-wre): every replaced layer's factors jointly, so the model's final normed
  hidden states match the dense model's.

Calibration data only; no labels, no loss through the LM head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgecompress.attribution.layer_walker import LayerWalker
from edgecompress.attribution.low_rank import factor_parameters

REFIT_LOSSES = ("hidden", "kl")
# Fitting-set losses before/after a refit are reported on the first few windows only (each costs a forward
# pass; on 128 windows the report alone took minutes). Decisions use the held-out windows, all of them.
REPORT_BATCHES = 8


def _cosine_lr(optimizer: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    for group in optimizer.param_groups:  # cosine decay to zero
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def refit_layers(walker: LayerWalker, chosen: list[int], dense_outputs: dict, steps: int, lr: float,
                 progress=None) -> dict:
    """Refit the LowRankLinear factors installed in `chosen` layers in place; returns loss statistics.

    dense_outputs[index][batch]: the dense model's output hidden state of layer `index` (the target).
    """
    n_batches = walker.n_batches
    shown = range(min(n_batches, REPORT_BATCHES))  # the fitting windows the report's losses are measured on
    report = {}
    # The walk runs each layer as it is when it advances: the refit layers below feed the next one.
    for step_index, (index, hidden) in enumerate(walker.inputs(chosen)):
        layer = walker.layers[index]
        params = factor_parameters(layer)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        targets = dense_outputs[index]  # possibly stored in float16: compared in the layer's dtype
        scale = [float(t.float().pow(2).mean()) for t in targets]

        def loss_on(batch: int) -> torch.Tensor:
            out = walker.run_layer(index, hidden[batch], batch)
            return (out - targets[batch].to(out.dtype)).pow(2).mean() / scale[batch]

        with torch.no_grad():
            before = sum(float(loss_on(b)) for b in shown) / len(shown)
        for step in range(steps):
            _cosine_lr(optimizer, lr, step, steps)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_on(step % n_batches)
            loss.backward()
            optimizer.step()
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            after = sum(float(loss_on(b)) for b in shown) / len(shown)
        report[index] = {"relative_mse_before": round(before, 6), "relative_mse_after": round(after, 6)}
        if progress is not None:
            progress(f"refit layer {index}", step_index + 1, len(chosen))
    return report


class Objective:
    """What the end-to-end refit matches on one batch: the dense model's final normed hidden states
    ("hidden", relative MSE) or its next-token distribution ("kl": KL(dense || compressed) of the logits,
    over every position; the LM head is frozen unless a caller made it trainable)."""

    def __init__(self, walker: LayerWalker, start: int, start_inputs: list, final_targets: list, loss: str = "hidden"):
        if loss not in REFIT_LOSSES:
            raise ValueError(f"refit loss must be one of {REFIT_LOSSES}, got {loss!r}")
        self.walker, self.start, self.loss = walker, start, loss
        self.start_inputs, self.final_targets = start_inputs, final_targets
        self.scale = [float(t.pow(2).mean()) for t in final_targets]
        self.teacher_head = walker.model.get_output_embeddings()  # the dense head, even if a factored one is swapped in

    def __call__(self, batch: int) -> torch.Tensor:
        states = self.walker.final_states(self.start_inputs[batch], batch, self.start)
        target = self.final_targets[batch]
        if self.loss == "hidden":
            return (states - target).pow(2).mean() / self.scale[batch]
        with torch.no_grad():
            teacher = F.log_softmax(self.teacher_head(target).float(), dim=-1)
        student = F.log_softmax(self.walker.model.get_output_embeddings()(states).float(), dim=-1)
        return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")

    @torch.no_grad()
    def mean(self, limit: int | None = None) -> float:
        """Mean over the batches (the first `limit` of them: a report, not a decision)."""
        count = self.walker.n_batches if limit is None else min(limit, self.walker.n_batches)
        return sum(float(self(b)) for b in range(count)) / count


def refit_end_to_end(walker: LayerWalker, chosen: list[int], start_inputs: list, final_targets: list, steps: int,
                     lr: float, progress=None, *, loss: str = "hidden", holdout: Objective | None = None,
                     eval_every: int = 16, patience: int = 4, extra_params=()) -> dict:
    """Refit every chosen layer's factors jointly so that the model's output (final normed hidden states,
    or logits with loss="kl") matches the dense model's, running from the lowest chosen layer up.

    start_inputs[batch]: the dense hidden state entering layer min(chosen) (layers below are unchanged);
    final_targets[batch]: the dense model's final normed hidden state.
    holdout: the same objective on held-out calibration windows; every `eval_every` steps it is measured,
    the best factors so far are kept, and the refit stops after `patience` measurements without a gain
    (the step count is chosen on held-out data, never on the test text). extra_params: more tensors to
    train (a factored embedding).
    """
    params = [p for index in chosen for p in factor_parameters(walker.layers[index])] + list(extra_params)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    objective = Objective(walker, min(chosen), start_inputs, final_targets, loss)
    tracker = _HoldoutTracker(holdout, params, patience)
    before = objective.mean(REPORT_BATCHES)
    for step in range(steps):
        _cosine_lr(optimizer, lr, step, steps)
        optimizer.zero_grad(set_to_none=True)
        objective(step % walker.n_batches).backward()
        optimizer.step()
        if progress is not None:
            progress("refit", step + 1, steps)
        if ((step + 1) % eval_every == 0 or step + 1 == steps) and tracker.measure(step + 1):
            break
    tracker.restore_best()
    for p in params:
        p.requires_grad_(False)
    name = "final_hidden_relative_mse" if loss == "hidden" else "logit_kl"
    return {"loss": loss, f"{name}_before": round(before, 6), f"{name}_after": round(objective.mean(REPORT_BATCHES), 6),
            **tracker.report(steps)}


class _HoldoutTracker:
    """Early stopping on held-out calibration windows: keeps a copy of the best parameters."""

    def __init__(self, holdout: Objective | None, params: list, patience: int):
        self.holdout, self.params, self.patience = holdout, params, patience
        self.history: list[tuple[int, float]] = []
        self.best, self.best_step, self.best_state = None, 0, None
        if holdout is not None:
            self._record(0, holdout.mean())

    def _record(self, step: int, value: float) -> None:
        self.history.append((step, round(value, 6)))
        if self.best is None or value < self.best:
            self.best, self.best_step = value, step
            self.best_state = [p.detach().clone() for p in self.params]

    def measure(self, step: int) -> bool:
        """Record the held-out loss at `step`; True when the refit should stop."""
        if self.holdout is None:
            return False
        self._record(step, self.holdout.mean())
        return len(self.history) - 1 - [s for s, _ in self.history].index(self.best_step) >= self.patience

    @torch.no_grad()
    def restore_best(self) -> None:
        if self.best_state is not None:
            for p, saved in zip(self.params, self.best_state):
                p.copy_(saved)

    def report(self, steps: int) -> dict:
        if self.holdout is None:
            return {"steps": steps}
        return {"steps": steps, "steps_run": self.history[-1][0], "best_step": self.best_step,
                "holdout_before": self.history[0][1], "holdout_best": round(self.best, 6),
                "holdout_history": self.history}
