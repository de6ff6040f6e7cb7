"""Training-side forward: per-token log-probs of given sequences with the serving kernels."""
from exactllm.train.logprobs import TrainModel, sequence_logprobs

__all__ = ["TrainModel", "sequence_logprobs"]
