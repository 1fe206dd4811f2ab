"""X bytes and forward-decision cost per fan-out, key layouts beside one key per broker;
the code lives in ``dcp.bench.layout_cost``."""

from dcp.bench.layout_cost import main

if __name__ == "__main__":
    raise SystemExit(main())
