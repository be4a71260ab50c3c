"""A real proxyless gRPC client (grpcio) and the servers it calls: the
example of README's "Proxyless gRPC", and what tests/e2e/proxyless.rs
drives over stdin/stdout.

    GRPC_XDS_BOOTSTRAP=examples/grpc/bootstrap.json .venv/bin/python \
        examples/grpc/echo.py --servers 127.0.0.21:50051,127.0.0.22:50051 \
        --targets xds:///echo.grpc.svc.cluster.local:50051

Starts one gRPC server per address (method /meshreg.test.Echo/Who answers
with the server's own address), opens one channel per target (resolved by
grpcio's xDS resolver from the bootstrap in GRPC_XDS_BOOTSTRAP), prints
"ready", then for each line "call N" on stdin makes N calls on every
channel and prints one JSON object: calls answered per server address,
and "errors" (with the last error in "last_error").
"""

import argparse
import json
import sys
from concurrent import futures

import grpc

METHOD = "/meshreg.test.Echo/Who"


def serve(address):
    def who(request, context):
        return address.encode()

    handler = grpc.method_handlers_generic_handler(
        "meshreg.test.Echo",
        {"Who": grpc.unary_unary_rpc_method_handler(who)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    server.start()
    return server


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", required=True)
    parser.add_argument("--targets", required=True)
    args = parser.parse_args()
    servers = [serve(a) for a in args.servers.split(",")]
    channels = [grpc.insecure_channel(t) for t in args.targets.split(",")]
    calls = [c.unary_unary(METHOD) for c in channels]
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] != ["call"]:
            continue
        counts = {"errors": 0}
        for _ in range(int(words[1])):
            for call in calls:
                try:
                    who = call(b"", timeout=5, wait_for_ready=True).decode()
                    counts[who] = counts.get(who, 0) + 1
                except grpc.RpcError as e:
                    counts["errors"] += 1
                    counts["last_error"] = f"{e.code()}: {e.details()}"
        print(json.dumps(counts), flush=True)
    for s in servers:
        s.stop(0)


if __name__ == "__main__":
    main()
