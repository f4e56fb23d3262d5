"""Training engine: one loop for every model family, on CPU, one GPU or several.

How the pieces fit (each module's docstring says more):

* ``config``     -- :class:`TrainConfig`: ``params.train`` with the recipe applied and what the data
  dictates, frozen and typed; its :meth:`~config.TrainConfig.key` (the keys params.py marks
  semantic) names the work directory and decides whether a checkpoint may be resumed.
* ``objectives`` -- one :class:`~objectives.Objective` per family (GAN: D phases with gradient
  penalty and lazy R1, then the G phase; VAE): builds the networks and optimizers, draws every
  random input of a step (``draw``), names the step's variant, and computes the step on the
  device with no host syncs and no random number generation (``step``).
* ``executor``   -- how a step runs: eagerly, or captured once per variant in CUDA graphs and
  replayed (under DDP the all-reduce runs between captured segments); torch.compile applies to
  the objective's networks, whatever the executor.
* ``sampler``    -- where the images live (GPU, pinned host memory) and the seeded draws.
* ``monitor``    -- device-side NaN/Inf guard and loss accumulators; best score and collapse.
* ``checkpoint`` -- run state to file and back (atomic, ``weights_only``), transfer of weights.
* ``loop``       -- :class:`~loop.Trainer`: wires the above; ``run()`` is the loop itself.
* ``ema``, ``diffaug``, ``distributed`` -- generator EMA, DiffAugment (draw, then apply), DDP helpers.

Adding a model family: a network in :mod:`pipeline.models` (and its registry line), an
:class:`~objectives.Objective` subclass registered in ``objectives.OBJECTIVES`` (or an existing
objective), and a recipe in ``models.RECIPES`` naming both. The loop, the executors, checkpoints,
resume, DDP and the stages need no change.
"""
