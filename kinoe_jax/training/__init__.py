"""Training: the loop (loop.py) and what it is built from: the step, the state, the optimizer,
checkpoints, objectives/ (causal LM, DPO), resilience/, the metrics writer and the schedule check."""
