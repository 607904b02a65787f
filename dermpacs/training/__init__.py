"""Data sets, the synthetic photo generator, training and evaluation."""
