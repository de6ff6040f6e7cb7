import pytest


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model, loaded once for the whole session (loading takes seconds)."""
    from exactllm import LLM
    return LLM()


@pytest.fixture(scope="session")
def mini_llm():
    from exactllm import LLM
    return LLM("random:llama-mini")
