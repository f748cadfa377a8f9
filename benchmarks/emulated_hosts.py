"""Hosts emulated on one machine: network namespaces cabled to a switch, so that the
tf.data service's traffic crosses real (virtual) links that can be slowed, made lossy,
measured and cut. Used by benchmarks/service_wire.py and tests/test_emulated_hosts.py.

    with EmulatedHosts(["dispatcher", "worker1", "worker2", "trainer"]) as hosts:
        hosts.shape("trainer", rate_mbit=1000)
        worker = hosts.popen("worker1", [sys.executable, "-m", "simsiam_tf.data_service", ...])
        hosts.counters("trainer")  # {"rx_bytes": ..., "tx_bytes": ...} of its eth0

The layout: every host is a network namespace of its own with one interface, `eth0`,
at 10.201.0.N/24 (N = 1, 2, ... in the order given; `address(name)`), cabled by a
veth pair to a Linux bridge in one more namespace, the switch. No namespace has a route
beyond 10.201.0.0/24, and the root namespace holds no end of any link, so the traffic
never leaves these namespaces.

What a link can be made to do, on each host's link (both directions):
- `shape(host, rate_mbit=...)`: a bandwidth cap, a token bucket (`tc qdisc ... tbf`) on
  the host's eth0 (what it sends) and on its switch port (what it receives);
- `shape(host, loss_pct=...)`: packets lost at random on arrival at the host, by an
  nftables rule (`numgen random`), with the `nft` command (Debian's nftables);
- `shape(host, delay_ms=...)`: latency, with `tc qdisc ... netem` where the kernel has
  it (`can_delay`); the kernel of this project's machines is built without sch_netem
  (`Error: Specified qdisc kind is unknown`), so there this raises Unsupported;
- `cut(host)` / `restore(host)`: `ip link set eth0 down` / `up` inside the host.

Cleanup, even when the process that made the hosts is killed: the namespaces are not
named (no `ip netns add`, whose mounts outlive their maker): each is held by a `sleep`
started in it with `unshare --net`, and every process started in one (`popen`, `run`)
carries PR_SET_PDEATHSIG = SIGKILL. When the maker dies, by SIGKILL too, the kernel
kills all of them, and a namespace left with no process is destroyed with its links.
`close()` does the same at once. (The death signal follows the thread that started a
process: start them from the main thread or another that outlives them.)

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `unshare` and `nsenter` (util-linux),
`ip` and `tc` (iproute2).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import time

SUBNET = "10.201.0"
PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0


class Unsupported(RuntimeError):
    """This machine cannot emulate what was asked (not root, a missing tool or qdisc)."""


def _die_with_parent():
    """preexec_fn: SIGKILL this process when the thread that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def why_unsupported() -> str | None:
    """Why hosts cannot be emulated here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and tc)"
    missing = [tool for tool in ("unshare", "nsenter", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux, iproute2)"
    return None


class EmulatedHosts:
    """Hosts, each a network namespace with one link to a switch (see the module doc)."""

    def __init__(self, names: list[str]):
        reason = why_unsupported()
        if reason:
            raise Unsupported(reason)
        if len(set(names)) != len(names) or not 0 < len(names) < 250:
            raise ValueError(f"host names must be distinct, 1 to 249 of them: {names}")
        self.names = list(names)
        self._holders: dict[str, subprocess.Popen] = {}
        self._started: list[subprocess.Popen] = []
        self._nft_hosts: set[str] = set()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- layout ------------------------------------------------------------------

    def _hold(self, name: str) -> None:
        holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], preexec_fn=_die_with_parent)
        self._holders[name] = holder
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # until unshare has made the namespace and exec'd sleep in it
            try:
                if os.readlink(f"/proc/{holder.pid}/ns/net") != mine:
                    return
            except FileNotFoundError:
                pass
            if holder.poll() is not None or time.monotonic() > deadline:
                raise Unsupported(f"unshare --net did not make a namespace (exit {holder.poll()})")
            time.sleep(0.01)

    def _build(self) -> None:
        self._hold("switch")
        self.run("switch", "ip", "link", "set", "lo", "up")
        self.run("switch", "ip", "link", "add", "br0", "type", "bridge")
        for i, name in enumerate(self.names):
            self._hold(name)
            # Both ends made inside the switch's namespace, one end moved to the host's:
            # the root namespace never holds either.
            self.run("switch", "ip", "link", "add", self.port(name), "type", "veth", "peer", "name", "eth0",
                     "netns", str(self._holders[name].pid))
            self.run("switch", "ip", "link", "set", self.port(name), "master", "br0", "up")
            self.run(name, "ip", "link", "set", "lo", "up")
            self.run(name, "ip", "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
            self.run(name, "ip", "link", "set", "eth0", "up")
        self.run("switch", "ip", "link", "set", "br0", "up")

    def address(self, name: str) -> str:
        """The host's IPv4 address, which exists only inside these namespaces."""
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def port(self, name: str) -> str:
        """The switch's end of the host's link."""
        return f"p{self.names.index(name) + 1}"

    # -- running things in a host ---------------------------------------------------

    def command(self, name: str, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self._holders[name].pid}/ns/net", "--", *argv]

    def run(self, name: str, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """A short command in the host's namespace (bounded by COMMAND_TIMEOUT_S)."""
        result = subprocess.run(self.command(name, list(argv)), input=input, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT_S, preexec_fn=_die_with_parent)
        if check and result.returncode != 0:
            raise RuntimeError(f"in {name}: {' '.join(argv)}: {result.stderr.strip() or result.returncode}")
        return result

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process in the host's namespace, killed by close() or with this process."""
        proc = subprocess.Popen(self.command(name, argv), preexec_fn=_die_with_parent, **kwargs)
        self._started.append(proc)
        return proc

    # -- the links -----------------------------------------------------------------

    @property
    def can_delay(self) -> bool:
        probe = self.run("switch", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
        if probe.returncode == 0:
            self.run("switch", "tc", "qdisc", "del", "dev", "lo", "root")
        return probe.returncode == 0

    def shape(self, name: str, rate_mbit: float | None = None, delay_ms: float | None = None,
              loss_pct: float | None = None) -> None:
        """Set the host's link: a bandwidth cap both ways (None: unlimited), added latency
        each way, random loss of arriving packets. Replaces what was set before."""
        for end, where in ((name, "eth0"), ("switch", self.port(name))):
            self.run(end, "tc", "qdisc", "del", "dev", where, "root", check=False)
            if delay_ms:
                netem = ["netem", "delay", f"{delay_ms / 2}ms"] + (["rate", f"{rate_mbit}mbit"] if rate_mbit else [])
                if self.run(end, "tc", "qdisc", "add", "dev", where, "root", *netem, check=False).returncode:
                    raise Unsupported("tc netem is not in this kernel (CONFIG_NET_SCH_NETEM): no added latency")
            elif rate_mbit:
                bytes_per_s = rate_mbit * 1e6 / 8
                burst = max(64 * 1024, int(bytes_per_s / 100))  # 10 ms of the rate, at least one GSO packet
                self.run(end, "tc", "qdisc", "add", "dev", where, "root", "tbf", "rate", f"{rate_mbit}mbit",
                         "burst", str(burst), "latency", "100ms")
        self._set_loss(name, loss_pct or 0.0)

    def _set_loss(self, name: str, loss_pct: float) -> None:
        if name in self._nft_hosts:
            self.run(name, "nft", "delete", "table", "inet", "emulated_loss")
            self._nft_hosts.discard(name)
        if not loss_pct:
            return
        if shutil.which("nft") is None:
            raise Unsupported("packet loss needs the nft command (Debian's nftables)")
        per_million = int(round(loss_pct * 1e4))
        rules = (
            "table inet emulated_loss {\n"
            "  chain arriving { type filter hook prerouting priority 0; policy accept;\n"
            f"    numgen random mod 1000000 < {per_million} counter drop\n"
            "  }\n"
            "}\n"
        )
        result = self.run(name, "nft", "-f", "-", input=rules, check=False)
        if result.returncode:
            raise Unsupported(f"nft could not add the loss rule: {result.stderr.strip()}")
        self._nft_hosts.add(name)

    def dropped(self, name: str) -> int:
        """Packets the loss rule has dropped on arrival at the host (0 without one)."""
        if name not in self._nft_hosts:
            return 0
        listing = json.loads(self.run(name, "nft", "-j", "list", "table", "inet", "emulated_loss").stdout)
        return sum(item["rule"]["expr"][-2]["counter"]["packets"] for item in listing["nftables"] if "rule" in item)

    def cut(self, name: str) -> None:
        """Take the host's interface down: nothing reaches it or leaves it."""
        self.run(name, "ip", "link", "set", "eth0", "down")

    def restore(self, name: str) -> None:
        self.run(name, "ip", "link", "set", "eth0", "up")

    def counters(self, name: str) -> dict:
        """Bytes and packets through the host's eth0 so far (the kernel's counters)."""
        out = json.loads(self.run(name, "ip", "-s", "-j", "link", "show", "eth0").stdout)[0]["stats64"]
        return {"rx_bytes": out["rx"]["bytes"], "tx_bytes": out["tx"]["bytes"],
                "rx_packets": out["rx"]["packets"], "tx_packets": out["tx"]["packets"],
                "rx_dropped": out["rx"]["dropped"]}

    def routes(self, name: str) -> list[str]:
        return [line.strip() for line in self.run(name, "ip", "route").stdout.splitlines() if line.strip()]

    # -- the end ---------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process started in the hosts, then the namespaces' holders: the
        kernel removes the namespaces and their links."""
        for proc in self._started + list(self._holders.values()):
            if proc.poll() is None:
                proc.kill()
        for proc in self._started + list(self._holders.values()):
            try:
                proc.wait(timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._started.clear()
        self._holders.clear()

    def __enter__(self) -> "EmulatedHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
