"""Training: the loop (loop), one optimizer step (step), its non-finite guard (guard), the
EMA (ema) and the tracker (tracking)."""
