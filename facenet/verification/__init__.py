"""Face verification: pairs (`pairs.py`), the LFW protocol's numbers (`metrics.py`) and embeddings
(`embed.py`); `facenet.evaluate` puts them together for a trained model."""
