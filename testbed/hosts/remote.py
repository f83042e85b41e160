"""Reaching a host as a remote machine: SSH (paramiko) and libvirt over ``qemu+ssh``.

The lab logs in as root with the lab key and checks the host key against the lab's
known_hosts, which holds exactly the keys the lab generated (paramiko's
``RejectPolicy``: an unknown or changed host key is refused, never learned). The host
agent runs in an ``exec`` channel (:class:`SshAgentTransport`), which goes back to the
session's pool once a request completed (:class:`PooledChannel`): one agent process
serves the requests of one session. :class:`testbed.cluster.agent.AgentClient` and
:func:`attestation.registrar.register` work over SSH unchanged. libvirt goes through the
ssh command of :func:`testbed.hosts.sshkeys.write_libvirt_ssh` (OpenSSH,
``StrictHostKeyChecking yes``, the same known_hosts), which runs ``virt-ssh-helper``
inside the host.
"""

from __future__ import annotations

import contextlib
import importlib
import select
import shlex
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, urlencode

import paramiko

from testbed.cluster.agent import AgentClient
from testbed.hosts.layout import HostsError, LabPaths

__all__ = [
    "AGENT_COMMAND",
    "HostKeyRefused",
    "HostUnreachable",
    "PooledChannel",
    "SshAgentTransport",
    "SshSession",
    "SshTcpTransport",
    "forward_once",
    "libvirt_uri",
    "libvirt_version",
]

AGENT_COMMAND = (sys.executable, "-m", "testbed.hosts.agent")
"""What the host runs for the agent (the project installed on the host; here, this one)."""
SSH_TIMEOUT_S = 15.0


class HostUnreachable(HostsError):
    """The host does not answer over SSH, or the SSH session broke."""


class HostKeyRefused(HostUnreachable):
    """The host's SSH key is not the one the lab generated for it."""


class PooledChannel:
    """An agent channel lent to one request: ``with`` returns it to its session's pool
    when the request completed, and closes it otherwise (after an error or a timeout
    the stream may be mid-frame, so it is never reused)."""

    def __init__(self, channel: paramiko.Channel, session: SshSession, command: str) -> None:
        self.channel = channel
        self._session = session
        self._command = command

    def __enter__(self) -> PooledChannel:
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        if exc_type is None and self._session.give_back(self.channel, self._command):
            return
        self.channel.close()

    def sendall(self, data: bytes) -> None:
        self.channel.sendall(data)

    def recv(self, size: int) -> bytes:
        return self.channel.recv(size)

    def settimeout(self, timeout: float | None) -> None:
        self.channel.settimeout(timeout)

    def close(self) -> None:
        self.channel.close()


@dataclass
class SshSession:
    """One SSH connection to a host, opened on first use, reused, closed by the owner;
    with the idle agent channels it keeps (one agent process serves many requests)."""

    address: str
    lab: LabPaths
    port: int = 22
    _client: paramiko.SSHClient | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _idle: dict[str, list[paramiko.Channel]] = field(default_factory=dict)

    def borrow(self, command: str, timeout: float) -> PooledChannel:
        """An idle channel already running ``command``, else a new one."""
        with self._lock:
            idle = self._idle.setdefault(command, [])
            while idle:
                channel = idle.pop()
                if not (channel.closed or channel.exit_status_ready() or channel.eof_received):
                    channel.settimeout(timeout)
                    return PooledChannel(channel, self, command)
                channel.close()
        return PooledChannel(self.exec(command, timeout), self, command)

    def give_back(self, channel: paramiko.Channel, command: str) -> bool:
        with self._lock:
            if self._client is None or channel.closed or channel.exit_status_ready():
                return False
            self._idle.setdefault(command, []).append(channel)
            return True

    def client(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is None or not self._alive(self._client):
                self._client = self._connect()
            return self._client

    @staticmethod
    def _alive(client: paramiko.SSHClient) -> bool:
        transport = client.get_transport()
        return transport is not None and transport.is_active()

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.lab.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        where = f"{self.address}:{self.port}"
        try:
            client.connect(self.address, port=self.port, username="root",
                           key_filename=str(self.lab.lab_key), look_for_keys=False,
                           allow_agent=False, timeout=SSH_TIMEOUT_S,
                           banner_timeout=SSH_TIMEOUT_S, auth_timeout=SSH_TIMEOUT_S)
        except paramiko.BadHostKeyException:
            client.close()
            raise HostKeyRefused(f"host {where} showed another SSH host key than the one "
                                 f"the lab made for it ({self.lab.known_hosts}): refused"
                                 ) from None
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyRefused(f"host {where}: its SSH host key is not in "
                                     f"{self.lab.known_hosts}: refused") from None
            raise HostUnreachable(f"SSH to {where} failed: {exc}") from None
        except OSError as exc:
            client.close()
            raise HostUnreachable(f"SSH to {where} failed: {exc.strerror or exc}; is the "
                                  "host up? (`testbed hosts status`)") from None
        return client

    def exec(self, command: str, timeout: float) -> paramiko.Channel:
        """A new channel running ``command`` on the host."""
        transport = self.client().get_transport()
        if transport is None:
            raise HostUnreachable(f"SSH to {self.address}: no transport")
        try:
            channel = transport.open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError) as exc:
            raise HostUnreachable(f"SSH to {self.address}: cannot run the agent: {exc}") \
                from None
        return channel

    def close(self) -> None:
        """The connection and every channel on it: each idle agent sees its end and exits."""
        with self._lock:
            self._idle.clear()
            if self._client is not None:
                self._client.close()
                self._client = None


@dataclass(frozen=True)
class SshAgentTransport:
    """An :class:`~testbed.cluster.agent.AgentTransport`: the host agent per SSH channel."""

    session: SshSession
    command: tuple[str, ...] = AGENT_COMMAND

    def connect(self, timeout: float) -> socket.socket:
        try:
            channel = self.session.borrow(shlex.join(self.command), timeout)
        except HostUnreachable as exc:
            raise ConnectionError(str(exc)) from None
        # What AgentClient uses of a socket: sendall, recv (b"" at the end, socket.timeout
        # on a timeout), settimeout, close, and `with` (which gives the channel back).
        return cast(socket.socket, channel)

    def describe(self) -> str:
        return f"ssh root@{self.session.address} {shlex.join(self.command)}"


# What a host runs to relay one TCP connection to a port on its loopback (stdin/stdout):
# only the standard library, so that it starts fast.
_RELAY = """\
import os, select, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 10)
s.settimeout(None)
i, o = sys.stdin.fileno(), sys.stdout.fileno()
reading = [i, s]
while True:
    ready = select.select(reading, [], [])[0]
    if i in ready:
        data = os.read(i, 65536)
        if data:
            s.sendall(data)
        else:
            reading.remove(i)
            s.shutdown(socket.SHUT_WR)
    if s in ready:
        data = s.recv(65536)
        if not data:
            break
        while data:
            data = data[os.write(o, data):]
"""
# (stdin's end is passed on as a half-close: the service may still answer; the relay
# ends with the service's end.)


@dataclass(frozen=True)
class SshTcpTransport:
    """An :class:`~testbed.cluster.agent.AgentTransport` to a TCP port on a host's
    loopback (a placed VM's guest agent, forwarded there by QEMU): each connection is an
    SSH ``exec`` channel running a relay on the host. Nothing of the VM listens on the
    lab network; the lab key is the only way in. What the caller gets is one end of a
    TCP socket pair on the lab's loopback whose other end a thread copies to and from
    the channel: a real TCP socket (timeouts, TCP_NODELAY, non-blocking use, selectors:
    the host's relay of Trusted Passages records between two guests splices two of
    them), reachable by no other process."""

    session: SshSession
    port: int

    def open_channel(self, timeout: float) -> paramiko.Channel:
        command = shlex.join([sys.executable, "-c", _RELAY, str(self.port)])
        try:
            return self.session.exec(command, timeout)
        except HostUnreachable as exc:
            raise ConnectionError(str(exc)) from None

    def connect(self, timeout: float) -> socket.socket:
        channel = self.open_channel(timeout)
        try:
            ours, theirs = _tcp_pair(timeout)
        except OSError as exc:
            channel.close()
            raise ConnectionError(f"no loopback socket pair: {exc}") from None
        threading.Thread(target=_relay_and_close, args=(theirs, channel), daemon=True,
                         name=f"ssh-relay-{self.port}").start()
        return ours

    def describe(self) -> str:
        return f"ssh root@{self.session.address} -> 127.0.0.1:{self.port}"


def _tcp_pair(timeout: float) -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on the loopback (Linux has no AF_INET socketpair). The
    listener lives for this call only, and only our own connection is taken: another
    process that connects meanwhile is closed, never relayed."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(timeout)
        ours = socket.create_connection(listener.getsockname(), timeout)
        try:
            while True:
                theirs, peer = listener.accept()
                if peer == ours.getsockname():
                    return ours, theirs
                theirs.close()
        except OSError:
            ours.close()
            raise


def _relay_and_close(local: socket.socket, channel: paramiko.Channel,
                     on_close: Callable[[], None] | None = None) -> None:
    try:
        with local, contextlib.closing(channel), \
                contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            _pump(local, channel)
    finally:
        if on_close is not None:
            with contextlib.suppress(Exception):
                on_close()


FORWARD_ACCEPT_S = 15.0  # the lab-side listener waits this long for its one connection
_PUMP_BYTES = 65536
HALF_CLOSE_GRACE_S = 30.0  # after our end, how long the service may take to end its own


def forward_once(transport: SshTcpTransport, timeout: float = FORWARD_ACCEPT_S,
                 *, on_close: Callable[[], None] | None = None) -> tuple[str, int]:
    """A listener on the lab's loopback (an ephemeral port) for **one** connection,
    relayed to ``transport``'s port on its host (an SSH ``exec`` channel running the
    relay, opened first: a host that does not answer is a HostUnreachable here, not a
    reset connection later): what a client that can only dial TCP (the CVM1 client)
    uses to reach a service of a placed VM. The listener closes after its one accept or
    ``timeout``; the relay ends when either side closes, then ``on_close`` runs (e.g.
    closing the SSH session). Returns the listener's (address, port)."""
    try:
        channel = transport.open_channel(timeout)
    except ConnectionError as exc:
        if on_close is not None:
            on_close()
        raise HostUnreachable(str(exc)) from None
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout)
    address = listener.getsockname()
    threading.Thread(target=_serve_once, args=(listener, channel, on_close),
                     name=f"forward-{address[1]}", daemon=True).start()
    return address[0], address[1]


def _serve_once(listener: socket.socket, channel: paramiko.Channel,
                on_close: Callable[[], None] | None) -> None:
    with listener:
        try:
            local, _ = listener.accept()
        except OSError:  # nobody came in time: nothing to relay
            local = None
    if local is None:
        channel.close()
        if on_close is not None:
            with contextlib.suppress(Exception):
                on_close()
        return
    _relay_and_close(local, channel, on_close)


def _pump(local: socket.socket, channel: paramiko.Channel) -> None:
    """Bytes both ways (no timeout: the client sets its own), ends passed on as
    half-closes, until the host's side ends (or, once ours ended, a grace period)."""
    local.settimeout(None)
    channel.settimeout(None)
    ours, theirs = local.fileno(), channel.fileno()  # a Channel's fileno: a pipe it signals
    reading = [ours, theirs]
    grace: float | None = None
    while True:
        ready = select.select(reading, [], [], grace)[0]
        if not ready:
            return  # we ended long ago and the service never did
        if ours in ready:
            data = local.recv(_PUMP_BYTES)
            if data:
                channel.sendall(data)
            else:
                reading.remove(ours)
                channel.shutdown_write()
                grace = HALF_CLOSE_GRACE_S
        if theirs in ready:
            data = channel.recv(_PUMP_BYTES)
            if not data:
                return
            local.sendall(data)


def agent_client(session: SshSession, host: str, timeout: float = 30.0) -> AgentClient:
    return AgentClient(SshAgentTransport(session), node=host, timeout=timeout)


def libvirt_uri(lab: LabPaths, address: str) -> str:
    """``qemu+ssh://root@ADDR/system`` through the lab's ssh (host key checking on)."""
    query = urlencode({"keyfile": str(lab.lab_key), "command": str(lab.ssh_command),
                       "no_tty": "1"}, quote_via=quote)  # %20, not "+": libvirt keeps "+"
    return f"qemu+ssh://root@{address}/system?{query}"


def libvirt_version(uri: str) -> str:
    """The remote libvirtd's version (``major.minor.micro``), or HostUnreachable."""
    try:  # as testbed.qemu.libvirtd.load_libvirt, which sits above this room
        libvirt: Any = importlib.import_module("libvirt")
    except ImportError:
        raise HostUnreachable("the libvirt Python module is missing (pip install "
                              "libvirt-python; docs/qemu.md)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostUnreachable(f"libvirt at {uri.split('?')[0]}: {exc}") from None
    try:
        number = int(conn.getLibVersion())
    finally:
        conn.close()
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
