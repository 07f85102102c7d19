from .generate import StepOutput, generate_steps
from .inputs import PromptInputs, prepare_chat, prepare_prompt
from .llm_engine import LLMEngine
from .sampling import SamplingParams
from .scheduler import Output, PromptTooLong, QueueFull

__all__ = ["LLMEngine", "Output", "PromptInputs", "PromptTooLong", "QueueFull", "SamplingParams", "StepOutput",
           "generate_steps", "prepare_chat", "prepare_prompt"]
