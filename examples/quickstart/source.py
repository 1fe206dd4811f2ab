"""The quickstart's source: a thermometer (made-up readings, one every interval_s).

    python examples/quickstart/source.py BROKER ORCHESTRATOR

with DCP_AGENT_TOKEN set to a token issued to "sensor" (docs/quickstart.md).
"""

import argparse
import asyncio
import json
import logging
import os

import dcp

parser = argparse.ArgumentParser(description="offers the capability 'temperature', a source")
parser.add_argument("broker", help="the broker to attach to, e.g. dcp://127.0.0.1:7400")
parser.add_argument("orchestrator", help="the orchestrator to register with, e.g. dcp://127.0.0.1:7300")
args = parser.parse_args()

agent = dcp.DataAgent("sensor", broker=args.broker, orchestrator=args.orchestrator, token=os.environ["DCP_AGENT_TOKEN"])


# A source is an async generator taking the spec's params: each item it yields is a
# payload, published on the topic the spec names (`emits`). Not `async def f(msg, params)`:
# that is a stage or a sink.
@agent.capability("temperature")
async def temperature(params):
    n = 0
    while True:
        await asyncio.sleep(params.get("interval_s", 1.0))
        yield json.dumps({"n": n, "celsius": 20.0 + n % 5}).encode()
        n += 1


async def main():
    try:
        await agent.run()  # attach, register, then run what the orchestrator assigns until stopped
    finally:
        await agent.stop()  # on Ctrl-C too: flush and close


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
