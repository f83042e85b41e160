"""Predicting what OVMF measures when it boots a guest image, and the policy from it."""
