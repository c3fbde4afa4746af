"""A raw MCP server for the gateway's tests: standard library only, it answers by tool name.

`python scripted.py TAP_FILE` appends every line it reads, byte for byte, to
TAP_FILE (and `UNIX_TIME LENGTH` per line to TAP_FILE.times), and writes its pid
to TAP_FILE.pid first. It answers
`initialize`, `server/discover`, `ping` and `tools/list`, and these tools:

- echo: answers at once with its arguments as JSON text. A `free_` prefix on a name is ignored
  (the tests leave `free_*` tools ungated).
- slow {seconds, late?, keep_on?}: progress 0..2 on the call's token, sleeps, answers; a
  cancel stops it without an answer, unless `late` is true (then it answers at once), or
  `keep_on` is true too (then it finishes its sleep first, as a server that ignores it).
  With `steps`, it sends progress 1..steps of steps spread over `seconds` instead, and a
  cancel suppresses its answer (with `keep_on`, not its work), as the TypeScript SDK does.
- task {task_id, ttl?, finish_after?}: answers a 2025-11-25 CreateTaskResult
  (`resultType: "task"` too if `modern`); after `finish_after` seconds it sends
  `notifications/tasks/status` completed.
- input: answers `resultType: "input_required"`.
- ask: sends the client a `sampling/createMessage` request with the *same id*
  as the call, waits for the answer, and returns it.
- raw {lines}: writes each string as a raw line (not necessarily JSON) first.
- big {size, id_last?}: a text result of `size` characters (with `id_last`, its id written last).
- environ: the environment the server was started with (/proc/self/environ), as a JSON object.
- hang: never answers. crash {code}: exits at once.
`tasks/get` says any task is completed. At end of input it exits 0, unless SCRIPTED_IGNORE_EOF is set (then it stays,
and with SCRIPTED_IGNORE_TERM it ignores SIGTERM too).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

TAP = sys.argv[1]
lock = threading.Lock()
cancelled: dict[str, threading.Event] = {}
asked: dict[str, tuple[threading.Event, list]] = {}
TOOLS = ["echo", "slow", "task", "input", "ask", "raw", "big", "environ", "hang", "crash"]


def send(message) -> None:
    data = message if isinstance(message, bytes) else json.dumps(message, separators=(",", ":")).encode()
    with lock:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.buffer.flush()


def result(request_id, value) -> None:
    send({"jsonrpc": "2.0", "id": request_id, "result": value})


def text(request_id, content: str, **extra) -> None:
    result(request_id, {"content": [{"type": "text", "text": content}], **extra})


def call(message) -> None:
    request_id = message["id"]
    params = message.get("params") or {}
    name, args = str(params.get("name")).removeprefix("free_"), params.get("arguments") or {}
    token = (params.get("_meta") or {}).get("progressToken")
    key = json.dumps(request_id)
    if name == "echo":
        text(request_id, json.dumps(args, ensure_ascii=False))
    elif name == "slow":
        stop = cancelled.setdefault(key, threading.Event())

        def run() -> None:
            if args.get("steps"):  # as server-everything's long-running operation: progress i of steps, paced
                steps = int(args["steps"])
                for step in range(1, steps + 1):
                    time.sleep(float(args.get("seconds", 0.5)) / steps)
                    if token is not None:
                        send({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": token, "progress": step, "total": steps}})
                    if stop.is_set() and not args.get("keep_on"):
                        return
                if not stop.is_set():
                    text(request_id, "slow done")
                return
            if token is not None:
                for step in range(3):
                    send({"jsonrpc": "2.0", "method": "notifications/progress",
                          "params": {"progressToken": token, "progress": step, "total": 2}})
            if args.get("keep_on"):
                time.sleep(float(args.get("seconds", 0.5)))
            else:
                stop.wait(float(args.get("seconds", 0.5)))
            if not stop.is_set() or args.get("late"):
                text(request_id, "slow done" + (" (late)" if stop.is_set() else ""))

        threading.Thread(target=run, daemon=True).start()
    elif name == "task":
        task = {"taskId": args["task_id"], "status": "working", "ttl": args.get("ttl"),
                "createdAt": "2026-01-01T00:00:00Z", "lastUpdatedAt": "2026-01-01T00:00:00Z"}
        result(request_id, {"task": task, **({"resultType": "task"} if args.get("modern") else {})})
        if args.get("finish_after") is not None:
            def finish() -> None:
                time.sleep(float(args["finish_after"]))
                send({"jsonrpc": "2.0", "method": "notifications/tasks/status",
                      "params": {**task, "status": "completed"}})

            threading.Thread(target=finish, daemon=True).start()
    elif name == "input":
        result(request_id, {"resultType": "input_required",
                            "inputRequests": {"confirm": {"method": "elicitation/create", "params": {}}}})
    elif name == "ask":
        done: tuple[threading.Event, list] = (threading.Event(), [])
        asked[key] = done

        def run() -> None:
            send({"jsonrpc": "2.0", "id": request_id, "method": "sampling/createMessage",
                  "params": {"messages": [], "maxTokens": 1}})
            done[0].wait(10)
            text(request_id, "client said " + json.dumps(done[1][0] if done[1] else None))

        threading.Thread(target=run, daemon=True).start()
    elif name == "raw":
        for line in args.get("lines", []):
            send(line.encode())
        text(request_id, "raw done")
    elif name == "big":
        content = {"content": [{"type": "text", "text": "x" * int(args.get("size", 1 << 20))}]}
        if args.get("id_last"):  # as the TypeScript SDK writes it
            send(json.dumps({"result": content, "jsonrpc": "2.0", "id": request_id}, separators=(",", ":")).encode())
        else:
            result(request_id, content)
    elif name == "environ":
        with open("/proc/self/environ", "rb") as file:
            started = dict(entry.decode().split("=", 1) for entry in file.read().split(b"\0") if entry)
        text(request_id, json.dumps(started))
    elif name == "crash":
        os._exit(int(args.get("code", 3)))
    elif name != "hang":
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"no tool {name}"}})


def handle(message) -> None:
    method = message.get("method")
    if method is None:
        key = json.dumps(message.get("id"))
        if key in asked:
            asked[key][1].append(message.get("result"))
            asked[key][0].set()
        return
    if method == "initialize":
        result(message["id"], {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                               "serverInfo": {"name": "scripted", "version": "1"}})
    elif method == "server/discover":
        result(message["id"], {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}},
                               "resultType": "complete"})
    elif method == "ping":
        result(message["id"], {})
    elif method == "tools/list":
        result(message["id"], {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in TOOLS]})
    elif method == "tools/call":
        call(message)
    elif method == "tasks/get":
        task_id = (message.get("params") or {}).get("taskId")
        result(message["id"], {"taskId": task_id, "status": "completed", "ttl": None,
                               "createdAt": "2026-01-01T00:00:00Z", "lastUpdatedAt": "2026-01-01T00:00:01Z"})
    elif method == "notifications/cancelled":
        key = json.dumps((message.get("params") or {}).get("requestId"))
        cancelled.setdefault(key, threading.Event()).set()


def main() -> None:
    with open(TAP + ".pid", "w") as pid:
        pid.write(str(os.getpid()))
    with open(TAP, "ab") as tap, open(TAP + ".times", "a") as times:
        for line in iter(sys.stdin.buffer.readline, b""):
            tap.write(line)
            tap.flush()
            times.write(f"{time.time():.6f} {len(line)}\n")
            times.flush()
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                handle(message)
    if os.environ.get("SCRIPTED_IGNORE_EOF"):
        if os.environ.get("SCRIPTED_IGNORE_TERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)


if __name__ == "__main__":
    main()
