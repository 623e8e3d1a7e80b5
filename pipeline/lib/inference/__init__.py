"""Predicting new images with a trained model (the predict tool)."""
