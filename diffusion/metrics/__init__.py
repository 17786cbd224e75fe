"""Evaluation metrics: FID/KID through clean-fid, Frechet distances and paired cosine similarity in any
encoder's feature space, cached reference features, and the report. Entry point: `tools/evaluate.py`."""
