"""The `ibc` command line: one console script above every part of the Inference Budget Controller."""
