"""Evaluation of openglm models."""
