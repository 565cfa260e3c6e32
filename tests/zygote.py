"""`python -m stillroom ...` for the tests without paying its imports every time.

Most of a tiny command's time is importing torch and transformers (seconds each, hundreds of
commands in the suite). The zygote imports them once, then forks a fresh child per command, which
runs stillroom's own entry point with the command's argv, environment and working folder, its
stdout and stderr in files: to the test it is a subprocess (exit code, -9 for a SIGKILL, output).
A fork before any torch op is safe: no thread pool exists yet. Commands that need a real process
of their own (signals sent from the test, `accelerate launch`) still start one.

Server: `python tests/zygote.py SOCKET`. Each connection gets a handler (forked, so commands run
at once when a test runs several) that forks the command, sends its pid, waits, sends its status.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _recv(conn) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("zygote connection closed")
        data += chunk
    return json.loads(data)


def _send(conn, obj):
    conn.sendall(json.dumps(obj).encode() + b"\n")


def _command(req):
    """In the forked child: become `python -m stillroom ARGV` and exit with its code."""
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import stillroom
    sys.argv = [str(Path(stillroom.__file__).parent / "__main__.py"), *req["argv"]]
    code = 1
    try:
        from stillroom.cli import main
        code = main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
    os._exit(code or 0)


def serve(path: str):
    import torch  # noqa: F401  what every command imports, once
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import stillroom.cli  # noqa: F401
    import stillroom.run.distill  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # handlers are reaped by the system
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        if os.fork():
            conn.close()
            continue
        srv.close()   # the handler: fork the command, report its pid, then its status
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        req = _recv(conn)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _command(req)
        _send(conn, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send(conn, {"code": os.waitstatus_to_exitcode(status)})
        os._exit(0)


class Zygote:
    """The client: `run(argv, env, timeout)` -> subprocess.CompletedProcess, like subprocess.run."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="stillroom-zygote-")
        self.path = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], env=dict(os.environ),
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "log"), "w"))
        until = time.time() + 300
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.time() > until:
                raise RuntimeError("the test zygote did not start: " + open(os.path.join(self.dir, "log")).read())
            time.sleep(0.1)

    def run(self, argv, env=None, timeout=600, cwd=None):
        argv = [str(a) for a in argv]
        out, err = (os.path.join(self.dir, f"{os.getpid()}-{time.monotonic_ns()}.{n}") for n in ("out", "err"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            _send(conn, {"argv": argv, "env": dict(env if env is not None else os.environ),
                         "cwd": str(cwd or os.getcwd()), "stdout": out, "stderr": err})
            pid = _recv(conn)["pid"]
            conn.settimeout(timeout)
            try:
                code = _recv(conn)["code"]
            except socket.timeout:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(["stillroom", *argv], timeout) from None
        texts = []
        for p in (out, err):
            with open(p, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
            os.unlink(p)
        return subprocess.CompletedProcess([sys.executable, "-m", "stillroom", *argv], code, texts[0], texts[1])

    def close(self):
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
