"""`mmpipe` subcommands, one module each (add_parser + run); heavy imports stay inside `run`."""
