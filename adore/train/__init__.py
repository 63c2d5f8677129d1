"""Training: attention labels, the controller, and QLoRA fine-tuning for top-K attention."""
