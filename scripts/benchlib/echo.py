"""The echo app: a bare ASGI app on the model server's HTTP stack, the ceiling for it."""

from __future__ import annotations


async def echo_app(scope, receive, send):
    """Parse the JSON body like the model server does; answer one fixed prediction per row."""
    from serving.server.jsoncodec import dumps, loads

    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] == "/invocations":
        rows = loads(body)["dataframe_split"]["data"]
        out = dumps({"predictions": [{"prediction": 0.0} for _ in rows]})
    else:
        out = b"\n"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})


def run_echo_server(port: int) -> None:
    import uvicorn

    from serving.server.runner import uvicorn_options

    uvicorn.run(
        echo_app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        **uvicorn_options(),
    )
