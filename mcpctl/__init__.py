"""mcpctl: the command-line client of mcpresd."""
