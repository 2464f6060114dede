"""A child process of the harness: ``python -m benchmarks.agent '<json>'`` runs one
measurement function, ``{"fn": "module.function", "kwargs": {...}}``, and prints its result
as one ``BENCH-RESULT {json}`` line (peers first print ``BENCH-READY``)."""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

import orjson

from benchmarks.common import emit_result, run_loop

ALLOWED_MODULES = ("raw_rabbitmq", "raw_nats", "qtasks_client")


def main(argv: list[str]) -> int:
    spec: dict[str, Any] = orjson.loads(argv[0])
    module_name, _, function_name = str(spec["fn"]).partition(".")
    if module_name not in ALLOWED_MODULES:
        print(f"unknown measurement module {module_name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{module_name}")
    function = getattr(module, function_name)
    try:
        result = run_loop(function(**spec.get("kwargs", {})))
    except BaseException as exc:
        traceback.print_exc()
        emit_result({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    emit_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
