#!/usr/bin/env python3
"""Figures for the denial-of-service findings of issue 10, against any roster binary, so that
two builds can be measured side by side in one sitting:

  scripts/dos-figures.py target/release/roster [OTHER_BINARY ...]

1. admin accept loop out of descriptors: CPU of the admin thread over 2 s (open-files limit 96,
   150 silent sockets on the client port, 3 on the admin port);
2. /healthz checks answered (of 80, one per 100 ms) while an attacker holds 200 idle admin
   sockets and reopens any the server closes;
3. descriptors the server holds for 3,000 silent upgrade requests from one address, with
   --max-conns-per-ip 10 --max-connections 100.

Loopback only; every part is bounded in count and time, and only processes this script started
are ended, by their PID.
"""

import os
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, args, fd_limit=None):
    port, admin = free_port(), free_port()
    cmd = [binary, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"] + args
    if fd_limit:
        cmd = ["sh", "-c", f"ulimit -n {fd_limit} && exec \"$0\" \"$@\""] + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", admin), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.3)
    return p, port, admin


def stop(p):
    p.kill()
    p.wait()


def admin_ticks(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if open(f"/proc/{pid}/task/{tid}/comm").read().strip() != "roster-admin":
                continue
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def healthz(admin, timeout=1.0):
    try:
        s = socket.create_connection(("127.0.0.1", admin), timeout=timeout)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def out_of_fds(binary):
    p, port, admin = start(binary, [], fd_limit=96)
    hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
    time.sleep(0.5)
    waiting = [socket.create_connection(("127.0.0.1", admin)) for _ in range(3)]
    time.sleep(0.2)
    t0 = admin_ticks(p.pid)
    time.sleep(2)
    cpu = (admin_ticks(p.pid) - t0) / 2.0  # ticks per second = % of one core
    for s in waiting + hogs:
        s.close()
    stop(p)
    return f"admin thread {cpu:.0f}% of a core out of descriptors"


def idle_admin(binary):
    p, _, admin = start(binary, [])
    idle = [socket.create_connection(("127.0.0.1", admin)) for _ in range(200)]
    for s in idle:
        s.setblocking(False)
    ok = 0
    for _ in range(80):
        if healthz(admin):
            ok += 1
        # The attacker reopens whatever the server closed.
        for i, s in enumerate(idle):
            try:
                if s.recv(4096) == b"":
                    raise OSError
            except BlockingIOError:
                continue
            except OSError:
                pass
            s.close()
            try:
                idle[i] = socket.create_connection(("127.0.0.1", admin))
                idle[i].setblocking(False)
            except OSError:
                pass
        time.sleep(0.1)
    for s in idle:
        s.close()
    stop(p)
    return f"{ok} of 80 /healthz answered beside 200 idle admin sockets"


def silent_upgrades(binary):
    p, port, _ = start(binary, ["--max-conns-per-ip", "10", "--max-connections", "100"])
    base = len(os.listdir(f"/proc/{p.pid}/fd"))
    held = []
    for _ in range(3000):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        held.append(s)
    time.sleep(1)
    fds = len(os.listdir(f"/proc/{p.pid}/fd")) - base
    for s in held:
        s.close()
    stop(p)
    return f"{fds} descriptors held for 3000 silent upgrades from one address"


def main():
    binaries = sys.argv[1:] or ["target/release/roster"]
    for b in binaries:
        print(b)
        for part in (out_of_fds, idle_admin, silent_upgrades):
            print("  " + part(b))


if __name__ == "__main__":
    main()
