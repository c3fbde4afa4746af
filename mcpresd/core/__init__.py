"""The pure core: values and rules. No clock, no I/O, no sqlite, no asyncio, no psutil."""
