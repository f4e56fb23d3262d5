"""Reproducible GAN/VAE image-generation pipeline.

The package is layered (dependencies point down, never up):

    __main__  ->  stages/  ->  params, tracking, data/, training/, metrics/, report/  ->  models/, losses, io

Nothing runs at import time, and nothing below ``stages/`` imports dvc or mlflow, so training and
evaluation run on a machine that has neither.
"""

__version__ = "0.1.0"
