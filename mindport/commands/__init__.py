"""One module per ``mindport`` subcommand."""
