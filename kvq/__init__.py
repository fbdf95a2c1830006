"""kvq: calibrate KV-cache quantization for LLM serving engines.

Data flows one way: CLI -> data -> capture -> stats -> solver -> artifact -> export / validate.
"""

__version__ = "0.1.0"
