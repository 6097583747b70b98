"""The course's tiny GPTs: a character tokenizer, the model, its KV cache interface, and the two
shipped checkpoints ("target" and "draft") trained on Moby-Dick by ``train.py``."""

from .cache import DenseKVCache as DenseKVCache
from .cache import KVCache as KVCache
from .gpt import GPT as GPT
from .gpt import GPTConfig as GPTConfig
from .gpt import generate as generate
from .gpt import load as load
from .gpt import load_meta as load_meta
from .tokenizer import CharTokenizer as CharTokenizer
from .tokenizer import load_corpus as load_corpus


def load_tokenizer() -> CharTokenizer:
    """The tokenizer both shipped checkpoints were trained with."""
    return CharTokenizer.load()
