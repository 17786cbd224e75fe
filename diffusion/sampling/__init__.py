"""The sampling stack: UNI2-h tokens in, H&E images out.

    samplers.py             diffusers schedulers, DEFAULT_STEPS / default guidance, THE classifier-free guidance,
                            the denoising loop
    pipeline.py             PixCellPipeline (a diffusers DiffusionPipeline): one batch of conditions -> images
    controlnet_pipeline.py  the cell-mask ControlNet variant of the pipeline
    hub.py                  the published Hub snapshots read as data (never as code), diffusers registration
    large_image.py          4096 px regions: sliding-window denoising and blended tiled decoding
    conditions.py           where conditions come from (dataset index, image files, embedding files, regions)
    runner.py               dataset-scale runs (patches and regions): resumable, sharded, lossless, manifest

Geometry (UNI tile, VAE factor, latent shift/scale) lives in `diffusion/geometry.py`.
"""
