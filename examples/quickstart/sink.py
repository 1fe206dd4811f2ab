"""The quickstart's sink: prints each converted reading.

    python examples/quickstart/sink.py BROKER ORCHESTRATOR

with DCP_AGENT_TOKEN set to a token issued to "display" (docs/quickstart.md).
"""

import argparse
import asyncio
import json
import logging
import os

import dcp

parser = argparse.ArgumentParser(description="offers the capability 'show', a sink")
parser.add_argument("broker", help="the broker to attach to, e.g. dcp://127.0.0.1:7400")
parser.add_argument("orchestrator", help="the orchestrator to register with, e.g. dcp://127.0.0.1:7300")
args = parser.parse_args()

agent = dcp.DataAgent("display", broker=args.broker, orchestrator=args.orchestrator, token=os.environ["DCP_AGENT_TOKEN"])


# A sink is `async def f(msg, params)` too, and returns nothing.
@agent.capability("show")
async def show(msg, params):
    reading = json.loads(msg.payload)
    print(f"reading {reading['n']}: {reading['celsius']} C = {reading['fahrenheit']} F")


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
