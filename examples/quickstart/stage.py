"""The quickstart's stage: converts each reading from Celsius to Fahrenheit.

    python examples/quickstart/stage.py BROKER ORCHESTRATOR

with DCP_AGENT_TOKEN set to a token issued to "converter" (docs/quickstart.md).
"""

import argparse
import asyncio
import json
import logging
import os

import dcp

parser = argparse.ArgumentParser(description="offers the capability 'fahrenheit', a stage")
parser.add_argument("broker", help="the broker to attach to, e.g. dcp://127.0.0.1:7401")
parser.add_argument("orchestrator", help="the orchestrator to register with, e.g. dcp://127.0.0.1:7300")
args = parser.parse_args()

agent = dcp.DataAgent("converter", broker=args.broker, orchestrator=args.orchestrator, token=os.environ["DCP_AGENT_TOKEN"])


# A stage is `async def f(msg, params)`: called with each frame of the topics it consumes;
# what it returns (a payload, a list of payloads, or None for nothing) is published on
# the topic the spec names (`emits`).
@agent.capability("fahrenheit")
async def fahrenheit(msg, params):
    reading = json.loads(msg.payload)
    reading["fahrenheit"] = round(reading["celsius"] * 9 / 5 + 32, 1)
    return json.dumps(reading).encode()


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
