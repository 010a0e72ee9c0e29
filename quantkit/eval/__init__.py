"""Evaluation: held-out loss and perplexity."""

from quantkit.eval.load import load_for_eval
from quantkit.eval.loss import evaluate_loss, evaluate_sources, loss_on_ids, window_plan

__all__ = ["evaluate_loss", "evaluate_sources", "load_for_eval", "loss_on_ids", "window_plan"]
