# The UNI prior for PixCell-256: one 1536-d token per 256 px crop of the 1024 px patches (16 samples a patch).
_base_ = ["./_base_/prior.py"]

resolution = 256
