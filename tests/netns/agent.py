#!/usr/bin/env python3
"""Test-host agent run inside network namespaces by svcproxy's packet tests and demo.

  agent.py http NAME IP PORT       serve HTTP; every GET answers "NAME <client-ip>"
  agent.py udp NAME IP PORT        UDP echo; every datagram answers "NAME <client-ip>"
  agent.py udp-ask IP PORT [SRCPORT]  send one datagram, print the answer (exit 1 on timeout)

Only ever binds to or talks to addresses inside the test's own namespaces.
"""
import http.server
import socket
import sys


def serve_http(name, ip, port):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"{name} {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        allow_reuse_address = True

    Server((ip, int(port)), Handler).serve_forever()


def serve_udp(name, ip, port):
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((ip, int(port)))
    while True:
        _, peer = s.recvfrom(2048)
        s.sendto(f"{name} {peer[0]}\n".encode(), peer)


def udp_ask(ip, port, src_port=0):
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if int(src_port):
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(src_port)))
    s.settimeout(1.0)
    s.sendto(b"ping", (ip, int(port)))
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        sys.exit(1)
    sys.stdout.write(data.decode())


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"http": serve_http, "udp": serve_udp, "udp-ask": udp_ask}[cmd](*args)
