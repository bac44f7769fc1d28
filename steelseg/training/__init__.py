"""Training on Ray: the step and the epoch without Ray, the worker loop, ``fit`` and sweeps."""
