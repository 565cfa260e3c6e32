"""After training: export (GGUF, quantized folders: export.py, quant.py) and the deployed models
compared (compare.py)."""
