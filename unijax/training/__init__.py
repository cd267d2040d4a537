"""Training utilities: losses and train steps."""
