"""One module per mcpctl command: parse, call, render."""
