from .generate import StepOutput, generate_steps
from .sampling import SamplingParams

__all__ = ["SamplingParams", "StepOutput", "generate_steps"]
