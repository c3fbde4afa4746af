"""`mcpctl predict`: where a resource's metric is heading, and how good such forecasts have been."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mcpctl import complete
from mcpctl.escape import printable
from mcpctl.output import call, duration, print_json, usage
from mcpctl.view import human_duration, metric_text
from mcpresd.protocol import Method


def predict(
    ctx: typer.Context,
    resource: Annotated[str, typer.Argument(help="A resource name (gpu:0, cpu, memory) or a GPU UUID.",
                                            autocompletion=complete.resource_names)],
    metric: Annotated[
        str, typer.Option("--metric", "-m", metavar="M", help="Which metric to forecast (utilisation, "
                                                             "utilisation_rate, memory_used, ...).")
    ] = "utilisation",
    within: Annotated[
        str, typer.Option("--in", metavar="DURATION", help="How far ahead: 5m, 30m, 2h (at most 30d).")
    ] = "30m",
    json_output: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Forecast a metric: its value now, in --in, when it will be full, and the forecasts' track record.

    Examples:

      mcpctl predict gpu:0

      mcpctl predict memory --in 2h

      mcpctl predict gpu:0 --json | jq .predicted

    Prints e.g. "gpu:0 utilisation: now 42 %, in 30m ~ 55 % (full in 1h 12m);
    accuracy: MAPE 4.2 % over 12 scored forecasts (5m ahead)". The forecast is
    a straight line through the recent samples; the daemon forecasts every
    utilisation ahead once a minute and scores those forecasts when their time
    comes (MAPE: mean absolute percentage error).
    """
    seconds = duration(within, "--in", forever=False)
    if seconds is None or seconds <= 0:
        usage(f"--in takes a duration greater than zero, e.g. 5m, 30m or 2h; got {within!r}")
    result = call(ctx, Method.PREDICT, {"resource": resource, "metric": metric, "in": seconds})
    if json_output:
        print_json(result)
    else:
        print(printable(forecast_line(result)))


def forecast_line(result: dict[str, Any]) -> str:
    metric = result["metric"]
    head = f"{result['resource']} {metric}: "
    if result["current"] is None:
        return head + f"no samples in the last {human_duration(result['window_s'])}, nothing to forecast from"
    text = head + f"now {metric_text(metric, result['current'])}, "
    if result["predicted"] is None:
        text += f"too few samples to forecast yet ({result['samples']})"
    else:
        text += f"in {human_duration(result['horizon_s'])} ~ {metric_text(metric, result['predicted'])}"
        if result.get("threshold") is not None:
            until = result.get("seconds_until_threshold")
            text += (" (not rising)" if until is None else " (full now)" if until < 0.5
                     else f" (full in {human_duration(until)})")
    return text + "; accuracy: " + accuracy_text(result["accuracy"])


def accuracy_text(accuracy: dict[str, Any]) -> str:
    if accuracy.get("mape_pct") is None:
        return "no accuracy yet"
    scored = accuracy["scored"]
    return (f"MAPE {accuracy['mape_pct']:.1f} % over {scored} scored forecast{'s' if scored != 1 else ''}"
            f" ({human_duration(accuracy['horizon_s'])} ahead)")


def register(app: typer.Typer) -> None:
    app.command()(predict)
