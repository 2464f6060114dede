"""The web dashboard (``qtasks dashboard``, extra ``qtasks[dashboard]``): queues, live
workers, throughput, a live feed of every event, each task's partial stream as it happens,
and the dead letters, in a browser.

It is one more listener: one subscription to every task's events per dashboard process
(``hub``), fanned out to any number of browsers over server-sent events; it never talks
to a worker except by the ping every operator command uses. Read-only unless started with
``--allow-actions``, and then each action needs the token (``actions``).

Nothing here is imported by ``import qtasks``: Starlette and uvicorn load only with this
package.
"""

from qtasks.dashboard.app import create_app
from qtasks.dashboard.board import DashboardSettings

__all__ = ["DashboardSettings", "create_app"]
