"""exactllm: a fast LLM inference engine that gives the same bits however it is run."""
from exactllm.llm import LLM
from exactllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
