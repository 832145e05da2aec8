"""Command-line runs for the tests without paying for the imports each time.

Most tests run `python -m routetune.cli ...` in a child process: a separate process is the only
way to see exit statuses, one-line errors, signals and SIGKILLs at chosen points as a user sees
them. Importing torch, transformers and peft takes 8-10 s of CPU on a small machine, far more
than the tiny runs themselves, and the suite starts more than a hundred such processes. So each
test worker starts one server process that imports them once and then forks a child per
command: the child is a real process (own pid, exit status, signals, files) that starts with
the modules loaded, takes the caller's stdin/stdout/stderr, environment and working directory,
and runs the module as `python -m` does. It ends as multiprocessing's children do (threads
joined, exit handlers run, buffers flushed, then os._exit, skipping the module teardown).

What a fork cannot change is what an interpreter reads once as it starts: the hash seed, the
thread count of the OpenMP runtime, torch's CPU capability and allocator switches. A command
whose environment differs from the server's in one of those runs in a fresh interpreter
instead, and so does every command when ROUTETUNE_TEST_FRESH=1, on systems other than Linux
(where forking a process that has loaded system frameworks is not safe) and on machines with
a CUDA GPU (CUDA cannot be used in a child forked from a process that has initialised it). Tests of what a
fresh interpreter does (imports, start-up) call subprocess themselves.

No library offers this for arbitrary commands (multiprocessing's forkserver runs Python
functions, not `python -m` entry points with their own stdio and exit status), hence this file.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading

# read once by an interpreter (or its OpenMP / ATen / allocator libraries) as it starts
AT_START = ("PYTHONHASHSEED", "PYTHONPATH", "PYTHONHOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "THP_MEM_ALLOC_ENABLE",
            "PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "LD_PRELOAD", "MALLOC_CONF")
PRELOAD = ("routetune.cli", "routetune.workflow", "routetune.runs", "routetune.evaluate.tasks",
           "routetune.serve.predictor", "routetune.serve.server", "routetune.continual", "routetune.export",
           "routetune.sweep.study", "routetune.sweep.run", "routetune.training.setup", "peft", "sklearn.metrics",
           "seqeval.metrics", "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.modeling_auto", "uvicorn", "optuna", "httpx")


class Completed:
    """What subprocess.run returns, as far as the tests read it."""

    def __init__(self, args, returncode, stdout, stderr):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr


class Child:
    """What subprocess.Popen returns, as far as the tests use it, for a child forked by the server.
    stdin/stdout/stderr: None (this process's own), subprocess.DEVNULL, subprocess.PIPE,
    subprocess.STDOUT (stderr only), a file descriptor or a file."""

    def __init__(self, path: str, module: str, args: list[str], env: dict, stdin=None, stdout=None, stderr=None,
                 text: bool = False):
        self.args, self.returncode = [module, *args], None
        self.stdin = self.stdout = self.stderr = None
        mine, theirs = [], []  # our ends of the pipes; the descriptors the child gets (closed here after)

        def end(spec, number, mode):
            if spec is None:
                return number
            if spec == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                theirs.append(fd)
                return fd
            if spec == subprocess.PIPE:
                read, write = os.pipe()
                ours, child = (write, read) if mode == "w" else (read, write)
                theirs.append(child)
                mine.append(os.fdopen(ours, mode if text else mode + "b"))
                return child
            return spec if isinstance(spec, int) else spec.fileno()

        fds = [end(stdin, 0, "w")]
        if stdin == subprocess.PIPE:
            self.stdin = mine[-1]
        fds.append(end(stdout, 1, "r"))
        if stdout == subprocess.PIPE:
            self.stdout = mine[-1]
        fds.append(fds[1] if stderr == subprocess.STDOUT else end(stderr, 2, "r"))
        if stderr == subprocess.PIPE:
            self.stderr = mine[-1]
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._conn.connect(path)
            request = json.dumps({"module": module, "args": args, "env": env, "cwd": os.getcwd()}).encode()
            socket.send_fds(self._conn, [request], fds)
            self.pid = int(self._conn.recv(64))
        finally:
            for fd in theirs:
                os.close(fd)

    def poll(self):
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                self._read_status()
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._read_status()
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _read_status(self) -> None:
        self.returncode = int(self._conn.recv(64))  # -N for signal N, as subprocess
        self._conn.close()

    def send_signal(self, sig) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout=None):
        """Both pipes read to their end on threads (as subprocess does), then the status."""
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        got = {}
        readers = [threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f.read()), daemon=True)
                   for k, f in (("out", self.stdout), ("err", self.stderr)) if f is not None]
        for t in readers:
            t.start()
        for t in readers:
            t.join(timeout)
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        return got.get("out"), got.get("err")


class _Server:
    def __init__(self, env: dict):
        self.env = dict(env)
        # an abstract socket (Linux): no file to clean up, no limit from a long TMPDIR
        name = f"routetune-forkserver-{os.getpid()}-{os.urandom(4).hex()}"
        self.path = "\0" + name
        self.proc = subprocess.Popen([sys.executable, __file__, name], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the test fork server did not start: {line!r}")
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_servers: dict[tuple, _Server] = {}  # by the values of AT_START they were started with
MAX_SERVERS = 2  # e.g. before and after `import routetune` set THP_MEM_ALLOC_ENABLE in this process


def _server_for(env: dict) -> _Server | None:
    """The server whose start-up environment matches ENV (started if need be), or None: start a
    fresh interpreter."""
    import torch

    # fork after importing torch: Linux only, and not where CUDA is (a CUDA context does not survive a fork)
    if os.environ.get("ROUTETUNE_TEST_FRESH") == "1" or sys.platform != "linux" or torch.cuda.is_available():
        return None
    key = tuple(env.get(k) for k in AT_START)
    if key not in _servers and len(_servers) < MAX_SERVERS:
        _servers[key] = _Server(env)
    return _servers.get(key)


def _sigint_default() -> None:
    """A child's Ctrl-C as a terminal gives it, even when the tests were started in the background
    (a shell starts background jobs with SIGINT ignored, and an inherited SIG_IGN stays)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(module: str, args: list[str], env: dict, **streams) -> Child | subprocess.Popen:
    """`python -m MODULE ARGS` with ENV, as subprocess.Popen would start it (stdin, stdout,
    stderr, text as there)."""
    server = _server_for(env)
    if server is None:
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, preexec_fn=_sigint_default,
                                **streams)
    return Child(server.path, module, args, env, **streams)


def run(module: str, args: list[str], env: dict, timeout: float = 300, input: bytes | None = None) -> Completed:
    """`python -m MODULE ARGS` with ENV, as subprocess.run(capture_output=True, text=True) would
    (with `input`, bytes on its stdin)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as given:
        given.write(input or b"")
        given.seek(0)
        proc = popen(module, args, env, stdin=given, stdout=out, stderr=err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out.seek(0), err.seek(0)
        return Completed([module, *args], proc.returncode, out.read().decode(errors="replace"),
                         err.read().decode(errors="replace"))


def _serve(path: str) -> dict:
    """The server: import once, then fork a child per request and report its exit status to the
    caller; returns only in a child, with its request."""
    import gc
    import importlib
    import select

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the imported objects stay out of the children's collections (their pages stay shared)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    parent, children = os.getppid(), {}  # pid -> the caller's connection
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener], [], [], 0.02 if children else 1.0)
        if ready:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in [conn, *children.values()]:
                    other.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                for fd in set(fds) - {0, 1, 2}:
                    os.close(fd)
                return json.loads(message)
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            try:
                conn.send(str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:  # the caller has gone
                pass
            conn.close()
        if os.getppid() != parent:  # the test worker is gone: so is its server
            os._exit(0)


def _exit_as_multiprocessing_does(code) -> None:
    """End a forked child as multiprocessing ends its own: threads joined, exit handlers run,
    buffers flushed, then os._exit (not the seconds-long teardown of every imported module)."""
    import atexit

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _child(request: dict) -> None:
    """Run the request's module as `python -m` would, in this forked child."""
    import runpy

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, as a new interpreter has it
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["module"], *request["args"]]
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first, not this file's folder
    try:
        if request["module"] == "routetune.cli":  # imported already: run its `if __name__ == "__main__"` part
            from routetune import cli

            sys.argv[0] = cli.__file__
            cli.main()
        else:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        _exit_as_multiprocessing_does(stop.code)
    except KeyboardInterrupt:  # as the interpreter does: end by the signal itself
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # as the interpreter does: the traceback, then status 1
        import traceback

        traceback.print_exc()
        _exit_as_multiprocessing_does(1)
    _exit_as_multiprocessing_does(0)


if __name__ == "__main__":
    _child(_serve("\0" + sys.argv[1]))
