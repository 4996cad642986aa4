"""One module per `ibc` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
