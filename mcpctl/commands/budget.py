"""`mcpctl budget set|delete`: spending limits per tool, owner or pool and period.

A budget's `--soft` fraction warns (state soft); at its limit new allocations
it covers are refused with exit 1 until the period ends.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from mcpctl.escape import printable
from mcpctl.output import call, print_json, usage
from mcpctl.view import money, percent
from mcpresd.protocol import BudgetScope, Method, Period

app = typer.Typer(help="Set or delete spending limits per tool, owner or pool.\n\nExamples:"
                       "\n\n  mcpctl budget set --tool render --limit 20 --period day"
                       "\n\n  mcpctl budget delete --tool render --period day",
                  no_args_is_help=True, suggest_commands=False)  # Click suggests itself

ToolOption = Annotated[str | None, typer.Option("--tool", metavar="ID", help="The budget covers this tool id.")]
OwnerOption = Annotated[
    str | None, typer.Option("--owner", metavar="USER", help="The budget covers this user (a name or a uid).")
]
PoolOption = Annotated[str | None, typer.Option("--pool", metavar="NAME", help="The budget covers this pool.")]
PeriodOption = Annotated[
    Period, typer.Option("--period", help="The period the limit is for; it resets when the next one starts.",
                         show_default=False)
]


def scope_of(tool: str | None, owner: str | None, pool: str | None) -> tuple[str, str]:
    """(scope, subject) from exactly one of --tool, --owner, --pool; an owner as a decimal uid."""
    given = [(scope, value) for scope, value in ((BudgetScope.TOOL, tool), (BudgetScope.OWNER, owner),
                                                (BudgetScope.POOL, pool)) if value is not None]
    if len(given) != 1:
        usage("name what the budget covers with exactly one of --tool, --owner and --pool")
    scope, subject = given[0]
    if scope is BudgetScope.OWNER:
        subject = uid_of(subject)
    return scope.value, subject


def uid_of(user: str) -> str:
    """A user name or uid as the uid in decimal; a usage error for a name this host does not know."""
    if user.isdigit():
        return str(int(user))
    import pwd

    try:
        return str(pwd.getpwnam(user).pw_uid)
    except KeyError:
        usage(f"--owner: no user named {user!r} on this host (give a name or a uid)")


@app.command("set")
def set_budget(
    ctx: typer.Context,
    limit: Annotated[
        float, typer.Option("--limit", metavar="AMOUNT", help="The most to spend in a period (greater than 0).",
                            show_default=False)
    ],
    period: PeriodOption,
    tool: ToolOption = None,
    owner: OwnerOption = None,
    pool: PoolOption = None,
    soft: Annotated[
        float | None,
        typer.Option("--soft", metavar="FRACTION", help="Warn from this fraction of the limit (default 0.8)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the budget as JSON.")] = False,
) -> None:
    """Set (or replace) a budget: at most --limit spent per --period by a tool, an owner or a pool.

    Examples:

      mcpctl budget set --tool train --limit 200 --period week

      mcpctl budget set --owner alice --limit 50 --period day --soft 0.5

      mcpctl budget set --pool gpus --limit 1000 --period month

    Cost is what resources and pools are set to cost per hour (see `mcpctl
    resource set-cost`, `mcpctl pool create --cost`). Past --soft the budget
    reads soft; at --limit, allocations it covers are refused (exit 1).
    """
    scope, subject = scope_of(tool, owner, pool)
    if not math.isfinite(limit) or limit <= 0:
        usage(f"--limit takes an amount greater than 0, got {limit:g}")
    params: dict[str, Any] = {"scope": scope, "subject": subject, "limit": limit, "period": period.value}
    if soft is not None:
        if not math.isfinite(soft) or not 0 < soft <= 1:
            usage(f"--soft takes a fraction of the limit above 0 and at most 1 (e.g. 0.8), got {soft:g}")
        params["soft"] = soft
    budget = call(ctx, Method.BUDGETS_SET, params)
    if json_output:
        print_json(budget)
    else:
        print(printable(f"budget {budget_name(budget)}: {money(budget['limit'])} per {budget['period']}, "
                        f"spent {money(budget.get('spent'))} ({percent(budget.get('fraction'))}), "
                        f"{budget.get('state', '-')}"))


@app.command()
def delete(
    ctx: typer.Context,
    period: PeriodOption,
    tool: ToolOption = None,
    owner: OwnerOption = None,
    pool: PoolOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the deleted budget as JSON.")] = False,
) -> None:
    """Delete a budget: the tool, owner or pool and the period it was set for.

    Example: mcpctl budget delete --tool train --period week
    """
    scope, subject = scope_of(tool, owner, pool)
    result = call(ctx, Method.BUDGETS_DELETE, {"scope": scope, "subject": subject, "period": period.value})
    if json_output:
        print_json(result)
    else:
        print(printable(f"deleted budget {scope} {subject} per {period.value}"))


def budget_name(budget: dict[str, Any]) -> str:
    """'tool train', 'owner 1000 (alice)', 'pool gpus'."""
    return f"{budget['scope']} {subject_text(budget['scope'], budget['subject'])}"


def subject_text(scope: str, subject: str) -> str:
    """An owner's uid with the user name beside it when this host knows it."""
    if scope != BudgetScope.OWNER or not str(subject).isdigit():
        return str(subject)
    name = user_name(int(subject))
    return f"{subject} ({name})" if name else str(subject)


def user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
