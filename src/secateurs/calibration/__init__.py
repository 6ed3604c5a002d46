"""Calibration: data sources -> token batches, the statistics collected by hooks in one pass, and
layer-streamed execution for models larger than memory."""
