"""Data loading: raw-sample sources and the training input pipeline."""
