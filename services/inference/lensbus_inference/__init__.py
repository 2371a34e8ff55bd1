"""lensbus inference service: model import and inference backends."""
