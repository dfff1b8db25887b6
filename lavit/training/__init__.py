"""Lightning pieces for image classification: the module, the data, callbacks, checkpoints, loggers."""
