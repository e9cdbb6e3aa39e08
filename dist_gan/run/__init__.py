"""The run machinery: the loop, the step, the networks as trained, the run state, checkpoints, the
backend, stop and save policies, launching."""
