"""A raw-line tap: `python tap.py DIR -- CMD [ARGS]...` runs CMD and copies its stdio, recording every line.

DIR/in.log gets the bytes CMD read, DIR/out.log the bytes it wrote, exactly;
DIR/in.log.times and DIR/out.log.times get one `UNIX_TIME LENGTH` line per line.
Exits with CMD's status. Standard library only, so it adds little start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def copy(source, target, log_path: str, close_target: bool) -> None:
    with open(log_path + ".log", "ab") as log, open(log_path + ".log.times", "a") as times:
        for line in iter(source.readline, b""):
            log.write(line)
            log.flush()
            times.write(f"{time.time():.6f} {len(line)}\n")
            times.flush()
            try:
                target.write(line)
                target.flush()
            except (BrokenPipeError, ValueError):
                break
    if close_target:
        try:
            target.close()
        except OSError:
            pass


def main() -> int:
    directory, command = sys.argv[1], sys.argv[3:]
    os.makedirs(directory, exist_ok=True)
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    threading.Thread(target=copy, args=(sys.stdin.buffer, child.stdin, os.path.join(directory, "in"), True),
                     daemon=True).start()
    copy(child.stdout, sys.stdout.buffer, os.path.join(directory, "out"), False)
    status = child.wait()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
