"""Tools that read runs: generating from a checkpoint, evaluating one, exporting, progress pictures."""
