"""Routing cost per tree size; the code lives in ``dcp.bench.routing_cost`` (also ``dcp bench routing``)."""

from dcp.bench.routing_cost import main

if __name__ == "__main__":
    raise SystemExit(main())
