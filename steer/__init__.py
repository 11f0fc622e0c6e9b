"""steer: constrained and persona-steered fine-tuning."""

__version__ = "0.1.0"
