"""Pipeline stages: one module per DVC stage, each a pure ``run()`` plus a thin ``main()``."""
