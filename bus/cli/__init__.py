"""The command line: `lamabus` and its subcommands."""
