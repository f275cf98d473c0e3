"""Tasks built in code for common inputs (no task file needed)."""
from .hf_lm import HFCausalLM, hf_lm_task, read_texts, task_from_ref

__all__ = ["HFCausalLM", "hf_lm_task", "read_texts", "task_from_ref"]
