"""Data for pre-training: tokenizer training, prepare (tokenize/pack/shard), mixtures, loader.

The trainer needs only `open_pretrain_data`, `DataError` and `tokenizer_fingerprint`; the
modules below are the pieces data_tools/ scripts drive.
"""
from doge.data.errors import DataError
from doge.data.loader import EpochEvent, PretrainData, ValData, open_pretrain_data
from doge.data.tokenizer import tokenizer_fingerprint

__all__ = ["DataError", "EpochEvent", "PretrainData", "ValData", "open_pretrain_data", "tokenizer_fingerprint"]
