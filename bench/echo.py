"""The HTTP floor: a bare FastAPI endpoint served exactly as the services are (`python -m bench.echo`, PORT)."""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/echo")
async def echo(body: dict[str, Any]) -> dict[str, Any]:
    return body


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_config=None, access_log=False)
