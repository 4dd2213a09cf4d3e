"""The ``nbdsink`` command line: one module per group of subcommands."""
