"""`mcpctl metrics`: a resource's sampled history, current values, or all of them in the Prometheus text format."""

from __future__ import annotations

import shutil
import time
from typing import Annotated, Any

import typer

from mcpctl import complete, exitcodes
from mcpctl.actions import fail
from mcpctl.escape import printable
from mcpctl.output import call, duration, exit_with, fancy, plain_table, print_json, usage
from mcpctl.view import UNSUPPORTED, age, human_duration, metric_text, metric_unit, sparkline
from mcpresd.protocol import Method


def metrics(
    ctx: typer.Context,
    resource: Annotated[
        str | None,
        typer.Argument(help="A resource name (gpu:0, cpu, disk:/) or a GPU UUID. Without one: every "
                            "resource's current values.", show_default=False,
                       autocompletion=complete.resource_names),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option("--metric", "-m", metavar="M",
                     help="Which metric (utilisation, utilisation_rate, memory_used, temperature_c, power_w, ...). "
                          "Default: utilisation."),
    ] = None,
    since: Annotated[
        str, typer.Option("--since", metavar="DURATION", help="How far back: 10m, 1h, 1d (at most 30d).")
    ] = "1h",
    prometheus: Annotated[
        bool, typer.Option("--prometheus", help="Print every metric in the Prometheus text exposition format, as GET /metrics "
                                         "and the textfile (docs/metrics.md).")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Show a resource's history with a sparkline, min, max and average; or current values.

    Examples:

      mcpctl metrics gpu:0

      mcpctl metrics gpu:0 --metric temperature_c --since 10m

      mcpctl metrics gpu:0 | tail -1      # a pipe gets "TIMESTAMP VALUE" lines

      mcpctl metrics --prometheus > /var/lib/node_exporter/mcpres.prom

      mcpctl metrics                      # every resource's current values

    A value the device does not offer reads "unsupported" ("n/a" in tables), a
    failed read "unknown" ("?"); never 0. Older history comes as one-minute
    averages. Exits 1 for an unknown resource or metric.
    """
    if prometheus:
        if json_output:
            usage("--prometheus prints text; it does not go with --json")
        if resource is not None or metric is not None:
            usage("--prometheus prints every metric (docs/metrics.md); it does not go with a resource or --metric")
        print(call(ctx, Method.METRICS_EXPOSITION, {})["text"], end="")
        return
    if resource is None:
        current = call(ctx, Method.METRICS_CURRENT, {})
        if json_output:
            print_json(current)
        elif not current["resources"]:
            print(f"no samples yet: the daemon samples every {current['interval_s']:g}s")
        else:
            plain_table(("RESOURCE", "METRIC", "VALUE"), [
                (name, key, metric_text(key, value))
                for name, values in current["resources"].items() for key, value in values.items()])
        return
    seconds = duration(since, "--since", forever=False)
    if seconds is None or seconds <= 0:
        usage(f"--since takes a duration greater than zero, e.g. 10m, 1h or 1d; got {since!r}")
    params: dict[str, Any] = {"resource": resource, "since": seconds}
    if metric is not None:
        params["metric"] = metric
    history = call(ctx, Method.METRICS_HISTORY, params)
    name, metric = history["resource"], history["metric"]
    known = history.get("metrics") or []
    if known and metric not in known:
        exit_with(fail(f"{name} has no metric {metric!r}; it has: {', '.join(known)}", exitcodes.ERROR))
    if json_output:
        print_json(history)
        return
    series = series_of(history)
    if not series:
        print(printable(f"no history yet for {name}: the daemon has not sampled it" if not known
                        else f"no samples of {name} {metric} in the last {human_duration(seconds)}"))
        return
    if fancy():
        print("\n".join(map(printable, summary_lines(name, metric, series, seconds, time.time(),
                                                   shutil.get_terminal_size().columns))))
    else:
        for ts, value in series:
            print(f"{ts:.3f} {_plain(value)}")


def series_of(history: dict[str, Any]) -> list[tuple[float, float | str]]:
    """(time, value) oldest first: one-minute averages from before the raw samples, then the samples; a value
    is a number, 'unsupported' or 'unknown'."""
    points = history["points"]
    first = points[0]["ts"] if points else float("inf")
    older: list[tuple[float, float | str]] = [(r["minute"], r["avg"]) for r in history["rollups"]
                                              if r["minute"] + 60 <= first and r["avg"] is not None]
    return older + [(p["ts"], p["value"] if p["status"] == "ok" and p["value"] is not None else p["status"])
                    for p in points]


def summary_lines(name: str, metric: str, series: list[tuple[float, float | str]], since: float, now: float,
                  width: int) -> list[str]:
    numbers = [v for _, v in series if isinstance(v, (int, float))]
    head = f"{name} {metric}, last {human_duration(since)} ({len(series)} samples)"
    if not numbers:
        states = {v for _, v in series}
        why = "the device does not report it" if states == {UNSUPPORTED} else "the daemon could not read it"
        return [head, f"{'unsupported' if states == {UNSUPPORTED} else 'unknown'}: {why}"]
    # Scaled to the data (its min and max are printed below it): on 0..100 % ordinary values draw a flat line.
    spark = sparkline([v if isinstance(v, (int, float)) else None for _, v in series], max(10, width - 1))
    latest_ts, latest = series[-1]
    return [
        head,
        spark,
        f"latest {metric_text(metric, latest)} ({age(now - latest_ts)} ago)   min {metric_text(metric, min(numbers))}"
        f"   max {metric_text(metric, max(numbers))}   avg {metric_text(metric, sum(numbers) / len(numbers))}",
    ]


def _plain(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def register(app: typer.Typer) -> None:
    app.command()(metrics)
