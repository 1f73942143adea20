"""Training on Ray Train V2: the worker loop (`loop`), the driver (`trainer`), checkpoint state
(`checkpoint`), the run directory (`rundir`) and the task metrics (`metrics`).

Nothing is imported here, so `import pipeline.train.checkpoint` does not pull in Ray."""
